"""Hopper's warpgroup tensor-core instruction (`wgmma`, sm_90a) for the kernel families that use it.

One `wgmma.mma_async` instruction is issued by a warpgroup (4 warps, 128 threads, the threads
128 g .. 128 g + 127 of a block) and computes D (64 x N, float32) += A (64 x 16, float16) B (16 x N,
float16). B is always read from shared memory through a 64-bit *matrix descriptor*; A either
through a descriptor too ("SS") or from registers ("RS"). The instruction is asynchronous: it
only starts the work. `wgmma.commit_group` closes the instructions issued so far into a group,
`wgmma.wait_group N` waits until at most N groups are still running; only then may the
accumulators be read, or the A registers and the shared operands be changed.
`wgmma.fence` must come before the first wgmma of a batch whose accumulator or A registers were
written by ordinary instructions (a rescale, a pack).

Fragments (thread t of the warpgroup, warp w = t / 32, lane l, g = l / 4, c = l % 4), as the
PTX ISA gives them for m64nNk16:
  D: N / 2 floats d[4 j + e], j < N / 8: row 16 w + g + 8 (e >> 1), column 8 j + 2 c + (e & 1);
     the layout of mma.m16n8 accumulators, one 16-row slice per warp;
  A (RS): 4 registers of 2 halves, those of mma.m16n8k16's A for rows 16 w .. 16 w + 15:
     a0 = A[g][2c, 2c+1], a1 = A[g+8][2c, 2c+1], a2 = A[g][2c+8, 2c+9], a3 = A[g+8][2c+8, 2c+9].
So, as with mma.sync, the accumulators of a score tile are, rounded to float16, the A registers
of the next product.

Shared tiles: 128-byte swizzle
------------------------------
A tile of R rows (keys or queries) by D columns (D a multiple of 64), float16, is stored as D / 64
panels of R rows x 64 halves (128 bytes a row), panel after panel; 8 consecutive rows of a panel
(1024 bytes, 1024-aligned) form one swizzle atom, in which the 16-byte chunk c of row r sits at
chunk position c ^ (r % 8). The XOR spreads the 8 rows of any 16-byte column over all 32 banks,
and it is the layout "128B swizzle" (descriptor layout type 1) the tensor cores read: the hardware
applies the same XOR to the address bits 4-6 from bits 7-9, so a descriptor names unswizzled
offsets. `sw(R, r, c)` is the offset in halves of element (r, c).

Descriptor (bits): start address / 16 (0-13), leading-dimension byte offset (LBO) / 16 (16-29),
stride byte offset (SBO) / 16 (32-45), base offset 0 (49-51: every atom is 1024-aligned), layout
type 1 = 128B swizzle (62-63).
  * K-major operand (the contracted index k runs along a tile row): A in Q K^T, B = K^T there.
    Rows r0 .. r0 + 63 (A) or .. r0 + N - 1 (B), columns k0 .. k0 + 15: start at element
    (r0, k0) of its panel, SBO = 1024 (from 8 rows to the next 8), LBO unused (16).
  * MN-major B (k runs down the tile rows, n along them: V in P V, trans-b = 1): rows
    k0 .. k0 + 15, all N = D columns: start at row k0 of panel 0, LBO = R 128 bytes (from one
    64-column panel to the next along n), SBO = 1024 (from 8 rows of k to the next 8).
tests/test_wgmma.py checks each form against NumPy on the GPU and on the CPU emulator.

Everything between PTX_HELPERS_BEGIN and PTX_HELPERS_END is inline PTX, which the CPU emulator
(tests/cuda_emulator.py) replaces with C++ that does what the PTX ISA says.
"""
import functools

from .cuda import ASYNC_COPY_PTX


def _wgmma_ss(n):
    """C++ of wgmma_ss<n>: D (64 x n) (+)= A B, A and B K-major through descriptors."""
    d = n // 2
    regs = ", ".join(f"%{i}" for i in range(d))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(d))
    return (f"template <> __device__ __forceinline__ void wgmma_ss<{n}>(float* d, unsigned long long da, "
            f"unsigned long long db, int accumulate) {{\n"
            f'    asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{d + 2}, 0; '
            f'wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{regs}}}, %{d}, %{d + 1}, p, 1, 1, 0, 0; }}"\n'
            f'                 : {outs}\n'
            f'                 : "l"(da), "l"(db), "r"(accumulate) : "memory");\n}}\n')


def _wgmma_rs(n):
    """C++ of wgmma_rs<n>: D (64 x n) (+)= A B, A from registers, B MN-major (trans-b = 1)."""
    d = n // 2
    regs = ", ".join(f"%{i}" for i in range(d))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(d))
    return (f"template <> __device__ __forceinline__ void wgmma_rs<{n}>(float* d, const unsigned* a, "
            f"unsigned long long db, int accumulate) {{\n"
            f'    asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{d + 5}, 0; '
            f'wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{regs}}}, '
            f'{{%{d}, %{d + 1}, %{d + 2}, %{d + 3}}}, %{d + 4}, p, 1, 1, 1; }}"\n'
            f'                 : {outs}\n'
            f'                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate)\n'
            f'                 : "memory");\n}}\n')


SS_SHAPES = (32, 64)          # N of the SS products: score tiles
RS_SHAPES = (64, 128, 192, 256)  # N of the RS products: D


@functools.lru_cache(maxsize=None)
def source():
    """The CUDA helpers: PTX section (emulated on the CPU), then the swizzle and descriptors."""
    return PTX_BEGIN + "".join(_wgmma_ss(n) for n in SS_SHAPES) + "".join(_wgmma_rs(n) for n in RS_SHAPES) \
        + PTX_END + LAYOUT


PTX_BEGIN = r"""
struct __align__(16) chunk16 { unsigned x, y, z, w; };   // 8 halves, one 16-byte copy

// PTX_HELPERS_BEGIN (the CPU emulator in tests replaces this section with C++ equivalents)
""" + ASYNC_COPY_PTX + r"""
// Shared memory written by this thread (stores, landed cp.async copies) becomes visible to the
// tensor cores' reads (the async proxy); a barrier after it makes every thread's writes visible.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Named barrier `id` (1-15; 0 is __syncthreads') for `threads` threads (a multiple of 32).
__device__ __forceinline__ void bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }

// Keeps the compiler from moving reads or writes of accumulators across a wgmma wait.
template <int N>
__device__ __forceinline__ void reg_fence(float* d) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

template <int N>
__device__ void wgmma_ss(float* d, unsigned long long da, unsigned long long db, int accumulate);
template <int N>
__device__ void wgmma_rs(float* d, const unsigned* a, unsigned long long db, int accumulate);
"""

PTX_END = r"""
// PTX_HELPERS_END
"""

LAYOUT = r"""
// Offset in halves of element (r, c) of a swizzled tile of `rows` rows (see the module docstring).
__device__ __forceinline__ int sw(int rows, int r, int c) {
    return (c >> 6) * rows * 64 + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

// A descriptor's upper word is the same for every tile here (SBO 1024, 128B swizzle), and its lower
// word holds the start address (the low 14 bits, in 16-byte units) and the LBO. The descriptor of a
// k-step is that of the tile's first plus the step's offset in 16-byte units, added to the lower word
// alone: every shared tile lies below 256 KB, so the sum stays in the address field, and with k0 a
// constant of an unrolled loop each step costs one 32-bit add, not a descriptor.
__device__ __forceinline__ unsigned long long sw128_desc(unsigned lower) {
    return (1ull << 62) | ((unsigned long long)(1024 >> 4) << 32) | lower;
}
__device__ __forceinline__ unsigned sw128_lower(const half_t* start, unsigned lbo_bytes) {
    return ((smem_u32(start) & 0x3FFFF) >> 4) | ((lbo_bytes >> 4) << 16);
}

// K-major operand: rows r0 (a multiple of 8) and on of a `rows`-row tile, columns k0 .. k0 + 15.
__device__ __forceinline__ unsigned long long kmajor(const half_t* tile, int rows, int r0, int k0) {
    return sw128_desc(sw128_lower(tile + r0 * 64, 16) + (((k0 >> 6) * rows * 128 + (k0 & 63) * 2) >> 4));
}

// MN-major B: rows k0 .. k0 + 15 (k0 a multiple of 8) of a `rows`-row tile, every column.
__device__ __forceinline__ unsigned long long mnmajor(const half_t* tile, int rows, int k0) {
    return sw128_desc(sw128_lower(tile, rows * 128) + k0 * 8);
}

// This thread's warpgroup, shuffled from lane 0 so that the compiler knows it is the same across
// the warp: the descriptor arithmetic that depends on it then runs in uniform registers.
__device__ __forceinline__ int warpgroup() { return __shfl_sync(0xffffffffu, (int)threadIdx.x >> 7, 0); }

// The first 1024-aligned byte at or after p (swizzle atoms must be 1024-aligned).
__device__ __forceinline__ unsigned char* align1024(unsigned char* p) {
    return p + ((1024 - (smem_u32(p) & 1023)) & 1023);
}

// Rows [row0, row0 + ROWS) of an (n, HEAD_DIM) float16 matrix whose rows start `stride` halves
// apart into a swizzled shared tile, by NTHREADS threads (thread `first` < NTHREADS of them;
// consecutive threads along a row); rows at or past n become zeros. Where NTHREADS is a multiple of
// the row's 16-byte chunks (HEAD_DIM / 8), each thread copies the same chunk of every STEP-th row in
// an unrolled loop: one address computation, then constant steps, and no row test for a whole tile.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void load_sw(half_t* dst, const half_t* src, int row0, int n, int stride, int first) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    const unsigned to = smem_u32(dst);
    if constexpr (NTHREADS % CHUNKS == 0 && ROWS % (NTHREADS / CHUNKS) == 0) {
        constexpr int STEP = NTHREADS / CHUNKS;
        const int r0 = first / CHUNKS, c = (first % CHUNKS) * 8;
        const half_t* from = src + (size_t)(row0 + r0) * stride + c;
        if (row0 + ROWS <= n) {
#pragma unroll
            for (int i = 0; i < ROWS / STEP; ++i)
                cp_async16_at(to + 2 * sw(ROWS, r0 + i * STEP, c), from + (size_t)i * STEP * stride, true);
        } else {
#pragma unroll
            for (int i = 0; i < ROWS / STEP; ++i) {
                const bool valid = row0 + r0 + i * STEP < n;
                const half_t* row = valid ? from + (size_t)i * STEP * stride : src;
                cp_async16_at(to + 2 * sw(ROWS, r0 + i * STEP, c), row, valid);
            }
        }
    } else {
        for (int t = first; t < ROWS * CHUNKS; t += NTHREADS) {
            const int r = t / CHUNKS, c = (t % CHUNKS) * 8;
            const bool valid = row0 + r < n;
            cp_async16_at(to + 2 * sw(ROWS, r, c), src + (size_t)(valid ? row0 + r : 0) * stride + c, valid);
        }
    }
}

// Packs two floats into the two halves of an A register (lower column in the low 16 bits).
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    return (unsigned)f2h(lo) | ((unsigned)f2h(hi) << 16);
}

// The A registers of k-step kk (columns 16 kk .. 16 kk + 15) of a 64 x 16 K16 tile held as
// accumulators x[4 j + e] (rounded to float16).
__device__ __forceinline__ void a_regs(unsigned a[4], const float* x, int kk) {
    const float* p = x + 8 * kk;
    a[0] = pack_half2(p[0], p[1]);
    a[1] = pack_half2(p[2], p[3]);
    a[2] = pack_half2(p[4], p[5]);
    a[3] = pack_half2(p[6], p[7]);
}

// Writes accumulators (64 x N, rows 16 w + g .. of the warpgroup) times row factors f0 (row g)
// and f1 (row g + 8), rounded to float16, into rows r0 .. r0 + 63 of a swizzled `rows`-row tile.
template <int N>
__device__ __forceinline__ void stage_sw(half_t* tile, int rows, int r0, const float* x, float f0, float f1,
                                         int t) {
    const int r = r0 + 16 * (t >> 5) + ((t & 31) >> 2), c = 2 * (t & 3);
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        *(unsigned*)(tile + sw(rows, r, 8 * j + c)) = pack_half2(x[4 * j] * f0, x[4 * j + 1] * f0);
        *(unsigned*)(tile + sw(rows, r + 8, 8 * j + c)) = pack_half2(x[4 * j + 2] * f1, x[4 * j + 3] * f1);
    }
}

// Copies rows r0 .. r0 + n - 1 (n <= 64) of a swizzled tile to a global (., HEAD_DIM) matrix at
// `dst` (its row for r0) whose rows start `stride` halves apart, 16 bytes at a time, by the 128
// threads of a warpgroup (t: the thread's index in it).
__device__ __forceinline__ void store_sw(half_t* dst, const half_t* tile, int rows, int r0, int n, int stride, int t) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    for (int i = t; i < n * CHUNKS; i += 128) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        *(chunk16*)(dst + (size_t)r * stride + c) = *(const chunk16*)(tile + sw(rows, r0 + r, c));
    }
}
"""
