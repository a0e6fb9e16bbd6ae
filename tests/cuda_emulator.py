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

wgmma (tinygrad3/kernels/wgmma.py; a warpgroup is the threads 128 g .. 128 g + 127 of a block): an
issued wgmma_ss / wgmma_rs only records the operation (its descriptors, scale-d flag, the
thread's accumulator pointer, and for RS its A registers, copied at issue); nothing is computed
until a wgmma_wait<N> completes the groups older than the N most recent. The wait is a barrier of
the 128 threads; then each thread computes its own fragment entries of those operations, in issue
order, reading the shared operands as they are at the wait, and writes them through its saved
pointer; a second barrier follows. So accumulators read before the wait are stale, and a shared
operand overwritten before it is read overwritten. Descriptors are decoded as the PTX ISA gives
them (start, LBO, SBO in 16-byte units; base offset 0 and layout 128B swizzle, else a failure),
addresses are byte offsets in `smem` (which is 1024-aligned, so offsets and alignment agree), and
the 128B swizzle maps an address a to a ^ (((a >> 7) & 7) << 4). The threads of a warpgroup must
issue the same operations (kind, N, descriptors, scale-d), fences, groups and waits, issue a
wgmma_fence before their first wgmma, and commit and wait for every operation before they end.
bar_sync(id, n) is a named barrier (ids 1-15) that releases its arrivals once n have arrived.

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
    // wgmma: operations issued, completed (absolute counts in the warpgroup's sequence), the
    // ends of the committed groups not yet completed, fences executed
    long wg_issued, wg_done, wg_fences;
    std::vector<long> wg_groups;
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

alignas(1024) unsigned char smem[228 * 1024];   // so that offsets and alignment agree
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

static void emu_wgmma_check_done();

static void emu_entry() {
    emu_body();
    emu_wgmma_check_done();
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

// Each lane of the warp receives v of lane from(lane).
template <class T, class From>
static T emu_shuffle(unsigned mask, T v, From from) {
    if (mask != 0xffffffffu) emu_fail("partial warp masks are not emulated");
    static_assert(sizeof(T) <= 8, "shuffle of a large type");
    const int w = emu_linear() >> 5, l = emu_linear() & 31;
    memcpy(emu_words[w][l], &v, sizeof(T));
    emu_warp_barrier(2);
    T r;
    memcpy(&r, emu_words[w][from(l) & 31], sizeof(T));
    emu_warp_barrier(2);
    return r;
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int offset) { return emu_shuffle(mask, v, [=](int l) { return l ^ offset; }); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src) { return emu_shuffle(mask, v, [=](int) { return src; }); }

__device__ __forceinline__ float h2f(half_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
__device__ __forceinline__ half_t f2h(float x) { _Float16 f = (_Float16)x; half_t h; memcpy(&h, &f, 2); return h; }
__device__ __forceinline__ float neg_inf() { return -INFINITY; }
__device__ __forceinline__ float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
__device__ __forceinline__ float __expf(float x) { return expf(x); }
__device__ __forceinline__ float __fadd_rn(float a, float b) { return a + b; }  // g++ never contracts a lone add
__device__ __forceinline__ float __fmul_rn(float a, float b) { return a * b; }  // nor a lone product
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
__device__ __forceinline__ void cp_async16_at(unsigned dst, const void* src, bool valid) {
    if (dst + 16 > sizeof(smem)) emu_fail("cp_async16_at outside shared memory");
    emu_cp_async(smem + dst, src, 16, valid);
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

// The 32-bit shared-state-space address of p: its byte offset in smem.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    const unsigned char* c = (const unsigned char*)p;
    if (c < smem || c > smem + sizeof(smem)) emu_fail("smem_u32 of a pointer outside shared memory");
    return (unsigned)(c - smem);
}

// Every copy lands in the one memory the tensor cores read too: nothing to order.
__device__ __forceinline__ void fence_async_smem() {}

// bar.sync id, threads: the arriving threads wait until `threads` have arrived at barrier `id`.
static long emu_bar_arrived[16], emu_bar_gen[16];
static int emu_bar_count[16];
__device__ __forceinline__ void bar_sync(int id, int threads) {
    if (id < 1 || id > 15) emu_fail("named barrier id outside 1..15 (0 is __syncthreads')");
    if (threads <= 0 || threads % 32 || threads > emu_nthreads) emu_fail("named barrier thread count");
    const long gen = emu_bar_gen[id];
    ++emu_progress;
    if (emu_bar_arrived[id] == 0) emu_bar_count[id] = threads;
    else if (emu_bar_count[id] != threads) emu_fail("a named barrier used with different thread counts");
    if (++emu_bar_arrived[id] == threads) { emu_bar_arrived[id] = 0; ++emu_bar_gen[id]; }
    while (emu_bar_gen[id] == gen) emu_yield();
}

// ----- wgmma: warpgroup (128 consecutive threads) matrix products, completed at wait_group ----
struct EmuWgOp {
    int rs, n, accumulate;              // kind (A from registers), N, scale-d
    unsigned long long da, db;          // descriptors (da unused for rs)
    float* d[128];                      // each thread's accumulators
    unsigned a[128][4];                 // each thread's A registers (rs), copied at issue
};
static const int EMU_WG = EMU_MAX_THREADS / 128;
static std::vector<EmuWgOp> emu_wg_ops[EMU_WG];   // issued, not completed; entry i is op base + i
static long emu_wg_base[EMU_WG];
static long emu_wg_arrived[EMU_WG], emu_wg_gen[EMU_WG];
static int emu_wg_op[EMU_WG];
static long emu_wg_sig_issued[EMU_WG], emu_wg_sig_fences[EMU_WG];
static std::vector<long> emu_wg_sig_groups[EMU_WG];

static int emu_wg() {
    const int wg = emu_linear() >> 7;
    if (128 * wg + 128 > emu_nthreads) emu_fail("wgmma in a warpgroup of fewer than 128 threads");
    return wg;
}

// All 128 threads of the warpgroup arrive (at the same point `op`) before any leaves.
static void emu_wg_barrier(int op) {
    const int wg = emu_wg();
    const long gen = emu_wg_gen[wg];
    ++emu_progress;
    if (emu_wg_arrived[wg] == 0) emu_wg_op[wg] = op;
    else if (emu_wg_op[wg] != op) emu_fail("threads of a warpgroup are at different wgmma waits (or wait_group N)");
    if (++emu_wg_arrived[wg] == 128) { emu_wg_arrived[wg] = 0; ++emu_wg_gen[wg]; }
    while (emu_wg_gen[wg] == gen) emu_yield();
}

struct EmuDesc { unsigned start, lbo, sbo; };
static EmuDesc emu_desc(unsigned long long desc) {
    if ((desc >> 49) & 7) emu_fail("wgmma descriptor with a nonzero base offset");
    if ((desc >> 62) != 1) emu_fail("wgmma descriptor layout other than 128B swizzle");
    EmuDesc r{(unsigned)(desc & 0x3FFF) << 4, (unsigned)((desc >> 16) & 0x3FFF) << 4,
              (unsigned)((desc >> 32) & 0x3FFF) << 4};
    if (r.start >= emu_smem_bytes) emu_fail("wgmma descriptor start outside the dynamic allocation");
    return r;
}

// The float16 at unswizzled shared byte address addr of a 128B-swizzled operand.
static float emu_sw128(unsigned addr) {
    const unsigned phys = addr ^ (((addr >> 7) & 7) << 4);
    if (phys + 2 > emu_smem_bytes) emu_fail("wgmma operand outside the dynamic allocation");
    half_t h;
    memcpy(&h, smem + phys, 2);
    return h2f(h);
}
// K-major operand, row r (m of A, n of B), k < 16.
static float emu_kmajor(const EmuDesc& s, int r, int k) {
    return emu_sw128(s.start + (r >> 3) * s.sbo + (r & 7) * 128 + 2 * k);
}
// MN-major B (trans-b), column n, k < 16.
static float emu_mnmajor(const EmuDesc& s, int n, int k) {
    return emu_sw128(s.start + (n >> 6) * s.lbo + (k >> 3) * s.sbo + (k & 7) * 128 + 2 * (n & 63));
}

// This thread's fragment of op i of its warpgroup: D (+)= A B, through its saved d pointer.
static void emu_wgmma_complete(int wg, long i) {
    const EmuWgOp& op = emu_wg_ops[wg][i - emu_wg_base[wg]];
    const int t = emu_linear() & 127, w = t >> 5, g = (t & 31) >> 2, c = t & 3;
    float A[2][16];   // rows 16 w + g and 16 w + g + 8
    for (int h = 0; h < 2; ++h) {
        const int m = 16 * w + g + 8 * h;
        for (int k = 0; k < 16; ++k) {
            if (op.rs) {   // register h + 2 (k / 8) of lane 4 g + (k % 8) / 2 of warp w, half k % 2
                const unsigned r = op.a[32 * w + 4 * g + ((k & 7) >> 1)][h + 2 * (k >> 3)];
                A[h][k] = (k & 1) ? emu_hi(r) : emu_lo(r);
            } else {
                A[h][k] = emu_kmajor(emu_desc(op.da), m, k);
            }
        }
    }
    const EmuDesc b = emu_desc(op.db);
    float* d = op.d[t];
    for (int j = 0; j < op.n / 8; ++j)
        for (int e = 0; e < 4; ++e) {
            const int n = 8 * j + 2 * c + (e & 1);
            float s = 0.f;
            for (int k = 0; k < 16; ++k) s += A[e >> 1][k] * (op.rs ? emu_mnmajor(b, n, k) : emu_kmajor(b, n, k));
            d[4 * j + e] = (op.accumulate ? d[4 * j + e] : 0.f) + s;
        }
}

static void emu_wgmma_issue(int rs, int n, unsigned long long da, unsigned long long db, int accumulate, float* d,
                            const unsigned* a) {
    EmuThread& me = *emu_cur;
    const int wg = emu_wg(), t = emu_linear() & 127;
    if (me.wg_fences == 0) emu_fail("wgmma before the first wgmma_fence");
    std::vector<EmuWgOp>& ops = emu_wg_ops[wg];
    const size_t i = (size_t)(me.wg_issued++ - emu_wg_base[wg]);
    if (i == ops.size()) {   // the first thread to issue it
        if (!rs) emu_desc(da);
        emu_desc(db);
        ops.emplace_back();
        EmuWgOp& op = ops.back();
        op.rs = rs; op.n = n; op.accumulate = accumulate != 0; op.da = rs ? 0 : da; op.db = db;
    }
    EmuWgOp& op = ops[i];
    if (op.rs != rs || op.n != n || op.accumulate != (accumulate != 0) || op.db != db || (!rs && op.da != da))
        emu_fail("threads of a warpgroup issued different wgmma operations (kind, N, descriptors, scale-d)");
    op.d[t] = d;
    if (rs) memcpy(op.a[t], a, sizeof(op.a[t]));
}

static void emu_wgmma_wait(int pending) {
    EmuThread& me = *emu_cur;
    const int wg = emu_wg();
    // The first arrival's sequence (ops, groups, fences) is the one every thread must have issued.
    if (emu_wg_arrived[wg] == 0) {
        emu_wg_sig_issued[wg] = me.wg_issued;
        emu_wg_sig_fences[wg] = me.wg_fences;
        emu_wg_sig_groups[wg] = me.wg_groups;
    } else if (emu_wg_sig_issued[wg] != me.wg_issued || emu_wg_sig_fences[wg] != me.wg_fences ||
               emu_wg_sig_groups[wg] != me.wg_groups) {
        emu_fail("threads of a warpgroup issued different wgmma sequences before a wait");
    }
    emu_wg_barrier(16 + pending);   // the op code holds N: threads waiting for different N differ
    if ((int)me.wg_groups.size() > pending) {
        const size_t close = me.wg_groups.size() - pending;
        const long end = me.wg_groups[close - 1];
        for (long i = me.wg_done; i < end; ++i) emu_wgmma_complete(wg, i);
        me.wg_done = end;
        me.wg_groups.erase(me.wg_groups.begin(), me.wg_groups.begin() + close);
    }
    emu_wg_barrier(1);   // every thread has its results before the table changes
    if (me.wg_done > emu_wg_base[wg]) {   // completed for all 128: drop (once, by the first to leave)
        std::vector<EmuWgOp>& ops = emu_wg_ops[wg];
        ops.erase(ops.begin(), ops.begin() + (me.wg_done - emu_wg_base[wg]));
        emu_wg_base[wg] = me.wg_done;
    }
}

static void emu_wgmma_check_done() {
    const EmuThread& me = *emu_cur;
    const long committed = me.wg_groups.empty() ? me.wg_done : me.wg_groups.back();
    if (committed != me.wg_issued) emu_fail("a thread ended with wgmma operations it never committed");
    if (me.wg_done != me.wg_issued) emu_fail("a thread ended with wgmma groups it never waited for");
}

__device__ __forceinline__ void wgmma_fence() { emu_wg(); ++emu_cur->wg_fences; }
__device__ __forceinline__ void wgmma_commit() { emu_wg(); emu_cur->wg_groups.push_back(emu_cur->wg_issued); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { emu_wgmma_wait(N); }
template <int N>
__device__ __forceinline__ void reg_fence(float*) {}
template <int N>
__device__ void wgmma_ss(float* d, unsigned long long da, unsigned long long db, int accumulate) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
    emu_wgmma_issue(0, N, da, db, accumulate, d, nullptr);
}
template <int N>
__device__ void wgmma_rs(float* d, const unsigned* a, unsigned long long db, int accumulate) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
    emu_wgmma_issue(1, N, 0, db, accumulate, d, a);
}

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
                for (int g = 0; g < EMU_WG; ++g) { emu_wg_arrived[g] = 0; emu_wg_ops[g].clear(); emu_wg_base[g] = 0; }
                for (int i = 0; i < 16; ++i) emu_bar_arrived[i] = 0;
                for (int t = 0; t < threads; ++t) {
                    EmuThread& th = emu_threads[t];
                    th.tid = {(unsigned)(t % bx), (unsigned)(t / bx), 0};
                    th.done = false;
                    th.at_barrier = false;
                    th.open.clear();
                    th.groups.clear();
                    th.wg_issued = th.wg_done = th.wg_fences = 0;
                    th.wg_groups.clear();
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
