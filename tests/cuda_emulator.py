"""Runs a kernel family's CUDA source on the CPU, so kernels that use tensor cores can be tested
without a GPU (tests/test_flash_attention.py runs flash_attention's kernels through it).

The source is compiled with g++ as C++, unchanged except for its PTX helper section (between the
PTX_HELPERS_BEGIN and PTX_HELPERS_END markers), which is replaced by C++ versions below; the
CUDA prelude (h2f, f2h, neg_inf) is replaced too. Each block runs as one cooperative fiber per
thread, switched at every barrier: __syncthreads waits for the block, and the warp-wide
instructions (ldmatrix, mma, shuffles, __syncwarp) wait for the 32 lanes of the warp, which then
exchange their registers exactly as the PTX ISA says the instruction does. So the index
arithmetic of the fragment layouts, the padding, the masks and the tile loops are all exercised
as written; what is not exercised is timing (nothing runs in parallel) and the PTX text itself
(which nvcc checks).

Two options make races show up as wrong results:
  * deferred=True: a cp.async copy lands only when its group is waited for (or at the end of
    the thread), so reading a tile before cp.async.wait_group + __syncthreads reads stale data;
    deferred=False: it lands at once, so a copy issued while other warps still read the buffer
    overwrites what they read.
  * warps run one at a time, each as far as it can (to its next __syncthreads), warp 0 first,
    or the last warp first with reverse=True: a missing barrier between one warp's write and
    another's read (or a copy into a buffer another warp still reads) shows in one of the two
    orders.
Shared memory is filled with NaN bit patterns before each block, so a read of a shared entry
nobody wrote gives NaN.

x86-64 only (the fiber switch is a few lines of assembly); tests skip when g++ is missing.
"""
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile

import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

typedef unsigned short half_t;
struct emu_dim3 { unsigned x, y, z; };

// ----- fibers: one per CUDA thread, switched by hand (callee-saved registers + stack pointer)
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

struct EmuCopy { void* dst; const void* src; int bytes; bool valid; };
struct EmuThread {
    void* sp;
    bool at_barrier;   // waiting in __syncthreads
    emu_dim3 tid;
    bool done;
    std::vector<EmuCopy> open;                  // issued, not yet committed
    std::vector<std::vector<EmuCopy>> groups;   // committed, not yet landed
};

static const int EMU_STACK = 128 * 1024, EMU_MAX_THREADS = 1024;
static char* emu_stacks;
static EmuThread emu_threads[EMU_MAX_THREADS];
static EmuThread* emu_cur;
static void* emu_sched_sp;
static int emu_nthreads, emu_live;
static emu_dim3 emu_block, emu_grid, emu_bdim;
static std::function<void()> emu_body;
static int emu_deferred, emu_reverse;
static long emu_progress;
static long emu_block_arrived, emu_block_gen;
static long emu_warp_arrived[32], emu_warp_gen[32];
static int emu_warp_op[32];

alignas(16) unsigned char smem[228 * 1024];
static size_t emu_smem_bytes;

#define threadIdx (emu_cur->tid)
#define blockIdx emu_block
#define gridDim emu_grid
#define blockDim emu_bdim
static inline int emu_linear() { return (int)(emu_cur->tid.x + emu_cur->tid.y * emu_bdim.x); }

static void emu_fail(const char* what) {
    fprintf(stderr, "cuda emulator: %s (block %u,%u,%u thread %u)\n", what, emu_block.x, emu_block.y,
            emu_block.z, emu_cur ? emu_cur->tid.x : 0u);
    abort();
}

static void emu_yield() { emu_switch(&emu_cur->sp, emu_sched_sp); }

static void emu_land(std::vector<EmuCopy>& copies) {
    for (const EmuCopy& c : copies) {
        if (c.valid) memcpy(c.dst, c.src, c.bytes);
        else memset(c.dst, 0, c.bytes);
    }
    copies.clear();
}

static void emu_entry() {
    emu_body();
    for (auto& g : emu_cur->groups) emu_land(g);
    emu_cur->groups.clear();
    emu_land(emu_cur->open);
    emu_cur->done = true;
    --emu_live;
    ++emu_progress;
    emu_yield();
    emu_fail("a finished fiber was resumed");
}

void __syncthreads() {
    const long gen = emu_block_gen;
    ++emu_progress;
    if (++emu_block_arrived == emu_live) { emu_block_arrived = 0; ++emu_block_gen; }
    emu_cur->at_barrier = true;
    while (emu_block_gen == gen) emu_yield();
    emu_cur->at_barrier = false;
}

// Every live lane of warp w waits in __syncthreads (or has finished).
static bool emu_parked(int w) {
    for (int t = 32 * w; t < 32 * w + 32; ++t)
        if (!emu_threads[t].done && !emu_threads[t].at_barrier) return false;
    return true;
}

// All 32 lanes of the warp arrive (with the same operation `op`) before any leaves.
static void emu_warp_barrier(int op) {
    const int w = emu_linear() >> 5;
    const long gen = emu_warp_gen[w];
    ++emu_progress;
    if (emu_warp_arrived[w] == 0) emu_warp_op[w] = op;
    else if (emu_warp_op[w] != op) emu_fail("lanes of a warp are at different warp-wide instructions");
    if (++emu_warp_arrived[w] == 32) { emu_warp_arrived[w] = 0; ++emu_warp_gen[w]; }
    while (emu_warp_gen[w] == gen) emu_yield();
}

void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu_fail("partial warp masks are not emulated");
    emu_warp_barrier(1);
}

static uint32_t emu_words[32][32][6];    // [warp][lane] registers handed to a warp instruction
static const void* emu_ptrs[32][32];

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
    if (mask != 0xffffffffu) emu_fail("partial warp masks are not emulated");
    static_assert(sizeof(T) <= 8, "shuffle of a large type");
    const int w = emu_linear() >> 5, l = emu_linear() & 31;
    memcpy(emu_words[w][l], &v, sizeof(T));
    emu_warp_barrier(2);
    T r;
    memcpy(&r, emu_words[w][l ^ offset], sizeof(T));
    emu_warp_barrier(2);
    return r;
}

__device__ __forceinline__ float h2f(half_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
__device__ __forceinline__ half_t f2h(float x) { _Float16 f = (_Float16)x; half_t h; memcpy(&h, &f, 2); return h; }
__device__ __forceinline__ float neg_inf() { return -INFINITY; }
__device__ __forceinline__ float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
__device__ __forceinline__ float __expf(float x) { return expf(x); }
__device__ __forceinline__ float __fadd_rn(float a, float b) { return a + b; }  // g++ never contracts a lone add
// Fibers run one at a time, so a plain read-add-write is atomic.
__device__ __forceinline__ float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }

static void emu_check_smem(const void* p, int bytes, int align) {
    const unsigned char* c = (const unsigned char*)p;
    if (c < smem || c + bytes > smem + emu_smem_bytes) emu_fail("shared-memory access outside the dynamic allocation");
    if ((uintptr_t)c % align) emu_fail("misaligned shared-memory access");
}

// ----- the PTX helpers, as the PTX ISA defines them ---------------------------------------
static void emu_ldmatrix(unsigned r[4], const half_t* p, bool trans) {
    emu_check_smem(p, 16, 16);
    const int w = emu_linear() >> 5, l = emu_linear() & 31;
    emu_ptrs[w][l] = p;
    emu_warp_barrier(trans ? 4 : 3);
    for (int m = 0; m < 4; ++m) {
        half_t lo, hi;
        if (!trans) {   // row l / 4 of matrix m, halves 2 (l % 4), 2 (l % 4) + 1
            const half_t* row = (const half_t*)emu_ptrs[w][8 * m + (l >> 2)];
            lo = row[2 * (l & 3)];
            hi = row[2 * (l & 3) + 1];
        } else {        // column l / 4 of matrix m, rows 2 (l % 4), 2 (l % 4) + 1
            lo = ((const half_t*)emu_ptrs[w][8 * m + 2 * (l & 3)])[l >> 2];
            hi = ((const half_t*)emu_ptrs[w][8 * m + 2 * (l & 3) + 1])[l >> 2];
        }
        r[m] = (unsigned)lo | ((unsigned)hi << 16);
    }
    emu_warp_barrier(trans ? 4 : 3);
}

__device__ __forceinline__ void ldsm_x4(unsigned r[4], const half_t* p) { emu_ldmatrix(r, p, false); }
__device__ __forceinline__ void ldsm_x4_t(unsigned r[4], const half_t* p) { emu_ldmatrix(r, p, true); }

static float emu_lo(uint32_t w) { return h2f((half_t)(w & 0xffff)); }
static float emu_hi(uint32_t w) { return h2f((half_t)(w >> 16)); }

__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    const int w = emu_linear() >> 5, l = emu_linear() & 31;
    for (int i = 0; i < 4; ++i) emu_words[w][l][i] = a[i];
    emu_words[w][l][4] = b0;
    emu_words[w][l][5] = b1;
    emu_warp_barrier(5);
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        const int g = L >> 2, t = L & 3;
        const uint32_t* r = emu_words[w][L];
        A[g][2 * t] = emu_lo(r[0]);          A[g][2 * t + 1] = emu_hi(r[0]);
        A[g + 8][2 * t] = emu_lo(r[1]);      A[g + 8][2 * t + 1] = emu_hi(r[1]);
        A[g][2 * t + 8] = emu_lo(r[2]);      A[g][2 * t + 9] = emu_hi(r[2]);
        A[g + 8][2 * t + 8] = emu_lo(r[3]);  A[g + 8][2 * t + 9] = emu_hi(r[3]);
        B[2 * t][g] = emu_lo(r[4]);          B[2 * t + 1][g] = emu_hi(r[4]);
        B[2 * t + 8][g] = emu_lo(r[5]);      B[2 * t + 9][g] = emu_hi(r[5]);
    }
    const int g = l >> 2, t = l & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float s = 0.f;
        for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
        c[e] += s;
    }
    emu_warp_barrier(5);
}

static void emu_cp_async(void* dst, const void* src, int bytes, bool valid) {
    emu_check_smem(dst, bytes, bytes);
    EmuCopy c{dst, src, bytes, valid};
    if (emu_deferred) emu_cur->open.push_back(c);
    else { std::vector<EmuCopy> one{c}; emu_land(one); }
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    emu_cp_async(dst, src, 16, valid);
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) { emu_cp_async(dst, src, 4, valid); }
__device__ __forceinline__ void cp_async_commit() {
    emu_cur->groups.push_back(emu_cur->open);
    emu_cur->open.clear();
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    auto& g = emu_cur->groups;
    while ((int)g.size() > N) { emu_land(g.front()); g.erase(g.begin()); }
}
__device__ __forceinline__ float ex2(float x) { return exp2f(x); }

// ----- running a grid ------------------------------------------------------------------------
static void emu_run(int gx, int gy, int gz, int bx, int by, int smem_bytes, std::function<void()> body) {
    const int threads = bx * by;   // a 2-D block: thread t is (t % bx, t / bx), warps of 32 consecutive t
    if (threads > EMU_MAX_THREADS || threads % 32) emu_fail("block size");
    if (smem_bytes > (int)sizeof(smem)) emu_fail("too much shared memory");
    if (!emu_stacks) emu_stacks = (char*)aligned_alloc(64, (size_t)EMU_STACK * EMU_MAX_THREADS);
    emu_body = body;
    emu_grid = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
    emu_bdim = {(unsigned)bx, (unsigned)by, 1};
    emu_smem_bytes = smem_bytes;
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                emu_block = {(unsigned)x, (unsigned)y, (unsigned)z};
                memset(smem, 0xff, sizeof(smem));   // NaN in float16 and float32
                emu_nthreads = emu_live = threads;
                emu_block_arrived = 0;
                for (int w = 0; w < 32; ++w) emu_warp_arrived[w] = 0;
                for (int t = 0; t < threads; ++t) {
                    EmuThread& th = emu_threads[t];
                    th.tid = {(unsigned)(t % bx), (unsigned)(t / bx), 0};
                    th.done = false;
                    th.at_barrier = false;
                    th.open.clear();
                    th.groups.clear();
                    // A fresh stack that emu_switch "returns" into emu_entry from.
                    void** top = (void**)(emu_stacks + (size_t)EMU_STACK * (t + 1) - 64);
                    top[0] = (void*)&emu_entry;   // return address, at a 16-byte boundary
                    th.sp = (void*)(top - 6);     // six callee-saved registers below it
                }
                // Warp by warp, each as far as it can go (to its next __syncthreads, or its end),
                // so warps drift as far apart as a block barrier allows.
                const int warps = threads / 32;
                while (emu_live > 0) {
                    const long before = emu_progress;
                    for (int i = 0; i < warps; ++i) {
                        const int w = emu_reverse ? warps - 1 - i : i;
                        long mark;
                        do {
                            mark = emu_progress;
                            for (int t = 32 * w; t < 32 * w + 32; ++t) {
                                EmuThread& th = emu_threads[t];
                                if (th.done) continue;
                                emu_cur = &th;
                                emu_switch(&emu_sched_sp, th.sp);
                            }
                        } while (emu_progress != mark && !emu_parked(w));
                    }
                    if (emu_progress == before) { emu_cur = nullptr; emu_fail("deadlock: every thread waits"); }
                }
                emu_cur = nullptr;
            }
}

extern "C" void emu_options(int deferred, int reverse) { emu_deferred = deferred; emu_reverse = reverse; }
"""

C_TYPES = {"float": ctypes.c_float, "int": ctypes.c_int, "long long": ctypes.c_longlong}


def _strip_ptx(source):
    begin, end = source.index("// PTX_HELPERS_BEGIN"), source.index("// PTX_HELPERS_END")
    return source[:begin] + source[end:]


def _kernels(source):
    """[(name, [(type, parameter name)])] of the source's extern "C" kernels."""
    found = []
    for m in re.finditer(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)', source):
        params = []
        for p in m.group(2).split(","):
            p = " ".join(p.replace("__restrict__", "").split())
            ctype, name = p.rsplit(" ", 1)
            if name.startswith("*"):
                ctype, name = ctype + "*", name[1:]
            params.append((ctype, name))
        found.append((m.group(1), params))
    return found


def _argtype(ctype):
    return ctypes.c_void_p if ctype.endswith("*") else C_TYPES[ctype.replace("const ", "")]



# The CUDA vector types the kernels' 8- and 16-byte accesses use, and an alignment check for them:
# a source compiled after this header has every VECTOR_IO access (kernels/cuda.py) checked.
VECTOR_TYPES = r"""
struct uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
static void emu_aligned(const void* p, int bytes) { if ((uintptr_t)p % bytes) emu_fail("misaligned vector access"); }
#define ALIGNED_ACCESS(p, bytes) emu_aligned(p, bytes)
"""

class Emulator:
    """The kernels of `source` compiled for the CPU; `launch(name, grid, threads, args,
    shared_mem)` runs one grid (threads: a count, or (x, y) for a 2-D block), args as for CuPy (NumPy
    arrays, NumPy scalars, and None or np.uint64(0) for a null pointer)."""

    def __init__(self, source, deferred=True, reverse=False):
        self.kernels = dict(_kernels(source))
        wrappers = []
        for name, params in self.kernels.items():
            decl = ", ".join(f"{t} {n}" for t, n in params)
            call = ", ".join(n for _, n in params)
            wrappers.append(f'extern "C" void emu_launch_{name}(int emu_gx, int emu_gy, int emu_gz, int emu_threads, '
                            f'int emu_by, int emu_shared, {decl}) {{ emu_run(emu_gx, emu_gy, emu_gz, emu_threads, '
                            f'emu_by, emu_shared, [=] {{ {name}({call}); }}); }}')
        code = PRELUDE + _strip_ptx(source) + "\n" + "\n".join(wrappers) + "\n"
        self.lib = ctypes.CDLL(_compile(code))
        self.lib.emu_options(int(deferred), int(reverse))

    def options(self, deferred, reverse):
        self.lib.emu_options(int(deferred), int(reverse))

    def launch(self, name, grid, threads, args, shared_mem=0):
        params = self.kernels[name]
        bx, by = (threads, 1) if isinstance(threads, int) else (tuple(threads) + (1,))[:2]
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        values = []
        for (ctype, pname), a in zip(params, args):
            if ctype.endswith("*"):
                if a is None or (isinstance(a, np.integer) and a == 0):   # a null pointer (CuPy: np.uint64(0))
                    values.append(ctypes.c_void_p(None))
                    continue
                if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                    raise TypeError(f"{name}: {pname} must be a C-contiguous NumPy array")
                values.append(ctypes.c_void_p(a.ctypes.data))
            else:
                want = {"int": np.int32, "long long": np.int64, "float": np.float32}[ctype.replace("const ", "")]
                if not isinstance(a, want):
                    raise TypeError(f"{name}: {pname} must be {want.__name__}, got {type(a).__name__}")
                values.append(_argtype(ctype)(a.item()))
        fn = getattr(self.lib, f"emu_launch_{name}")
        fn.argtypes = [ctypes.c_int] * 6 + [_argtype(t) for t, _ in params]
        fn(*grid, bx, by, shared_mem, *values)


def available():
    return shutil.which("g++") is not None and platform.machine() in ("x86_64", "AMD64")


def _compile(code):
    digest = hashlib.sha256(code.encode()).hexdigest()[:20]
    folder = os.path.join(tempfile.gettempdir(), "tinygrad3_cuda_emulator")
    os.makedirs(folder, exist_ok=True)
    lib = os.path.join(folder, f"{digest}.so")
    if not os.path.exists(lib):
        src = os.path.join(folder, f"{digest}.cpp")
        with open(src, "w") as f:
            f.write(code)
        tmp = f"{lib}.{os.getpid()}.tmp"
        subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-w", "-o", tmp, src],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    return lib
