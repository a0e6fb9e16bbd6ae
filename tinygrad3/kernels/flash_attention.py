"""Flash attention: fused forward and backward that never hold the T x T scores.

Shapes as F.attention: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), float16; query head h reads kv
head h // G, G = Hq / Hkv. Query row i sits at absolute position pos = q_offset + i and sees keys
j with lo <= j <= pos, lo = max(0, pos - window + 1) with a window, else 0. S = scale Q K^T.

The output O and its gradient dO are (B, Hq, Tq, D) too, or with out_layout="bthd" (B, Tq, Hq, D),
the layout the output projection wants (reshaped to (B, Tq, Hq D) for free): the forward writes O
there and the backward reads O and dO there, so the model needs no transpose copy either way. Every
kernel touches O and dO one row (query position) of one head at a time, so the layout is only an
address: row t of head h of batch b starts at b Hq Tq D + h ohs + t ots halves, (ohs, ots) =
(Tq D, D) or (D, Hq D), passed as kernel arguments (o_head in SOURCE). All else (Q, K, V, L, Drow,
dQ, dK, dV) stays (B, H, T, .).

What the `attention` family (attention.py) does with cuBLAS, S and P = softmax(S) as whole
(G Tq x Tk) matrices in memory, is done here tile by tile in on-chip memory: a block takes a
tile of queries and streams the key tiles past it, or a tile of keys and streams the query
tiles past it. A tile pair that the mask hides completely (keys after the last query of a
causal tile, keys before a sliding window) is never visited, so a window of W costs O(T W),
not O(T^2), and the memory is O(T) per row: the output and one float32 per row.

Forward (FlashAttention-2): the online softmax
----------------------------------------------
softmax needs the row maximum and the row sum before any probability is final. The forward keeps,
per query row, a running maximum m, a running sum l = sum_j exp(S_ij - m) and a running
unnormalised output acc = sum_j exp(S_ij - m) V_j over the key tiles seen so far. A new tile with
scores s raises the maximum to m' = max(m, max_j s_j); everything gathered so far is rescaled by
alpha = exp(m - m'), and the tile's terms are added:

    l'   = alpha l   + sum_j exp(s_j - m')
    acc' = alpha acc + sum_j exp(s_j - m') V_j

After the last tile O = acc / l, exactly softmax(S) V. The kernel works in base 2 (exp2 is one
instruction): it scales the scores by scale * log2(e), so its m is log2(e) times the natural-log
one. It also writes the row logsumexp

    L_i = log sum_j exp(S_ij) = (m + log2 l) ln 2           (float32, B x Hq x Tq)

for the backward. A row whose first visited tile is entirely masked has m = -inf there; the
kernel then subtracts 0 instead of m (exp(-inf - 0) = 0), where exp(-inf - (-inf)) would be NaN.

Backward: recompute P from L, and the Drow identity
---------------------------------------------------
The backward of attention is derived in tinygrad3/nn_ops/attention.py (Attention.backward):

    dV = P^T dO,   dP = dO V^T,   dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik),
    dQ = scale dS K,   dK = scale dS^T Q

(in the grouped view, the sums over the G query heads of a kv head included). Two facts make it
possible without the T x T matrices:

1. P is recomputed, tile by tile, from the saved row logsumexp: P_ij = exp(S_ij - L_i), one
   exponential per entry and no running maximum, since L_i is already the final normaliser.

2. The row term sum_k P_ik dP_ik needs a whole row of P and dP, but it equals a sum over D only:

       sum_k P_ik dP_ik = sum_k P_ik sum_d dO_id V_kd = sum_d dO_id sum_k P_ik V_kd
                        = sum_d dO_id O_id = Drow_i

   so a small kernel computes Drow = rowsum(dO * O) (float32) before the tiles are visited.

Then dS is known tile by tile, and every product is a sum over tiles:
  * flash_bwd_dkdv, one block per key tile of a kv head: it owns dK_j and dV_j in registers and
    loops over the query tiles of every query head of its group that can see it; no atomics.
  * flash_bwd_dq, one block per query tile of a query head: it owns dQ_i and loops over its
    visible key tiles (the forward's loop, with P and dS instead of the online softmax).
The dK/dV kernel computes four tile products (S, dV, dP, dK), the dQ kernel three (S and dP
again, then dQ): 7 per visible tile pair where 5 would do, in exchange for no float32 atomics
(dQ accumulated across key tiles) and each gradient written once, in float16.

Precision, as the tensor cores need it: products of float16 operands accumulated in float32.
P (forward, dV) and dS (dQ, dK) are rounded to float16 to become operands, everything else
(scores, softmax statistics, Drow, accumulators) is float32; outputs are rounded once. dS is
rounded after the multiplication by scale, as in the `attention` family.

Tiles: forward 64 queries (4 warps of 16 rows) x 64 keys; dQ 64 queries x 32 keys; dK/dV
64 keys (4 warps of 16 keys) x 32 queries. For D > 128 the dK/dV block has 8 warps: two warps
share 16 keys, each owns half of the D columns of dK and dV (128 float32 accumulators per
thread instead of 256), and they add their halves of the D-contractions S^T and dP^T through
shared memory. Shared-memory rows are padded by 8 halves so that the 8 rows an `ldmatrix` reads
fall in 8 different bank groups.

`supports` says which shapes the kernels take: float16, D a multiple of 16 up to 256 (v's too),
at least one query and key; anything else takes the `attention` family or the reference path.
The NumPy reference below runs the same tiles in the same order with the same roundings.

On Hopper (compute capability 9.0) and D a multiple of 64, `forward` and `backward` launch the
wgmma kernels of flash_attention_sm90.py instead: the same algorithm, arguments and outputs, with
128-query forward and dQ tiles; the Drow kernel here serves both.
"""
import functools

import numpy as np

from .. import backend
from ..nn_ops.attention import Attention, causal_mask
from . import flash_attention_sm90 as sm90
from .cuda import ASYNC_COPY_PTX, QUAD_REDUCE, kernel

FWD_BQ, FWD_BK, FWD_THREADS = 64, 64, 128  # forward: queries x keys per tile, threads per block
DQ_BQ, DQ_BK, DQ_THREADS = 64, 32, 128     # dQ: queries x keys
KV_BK, KV_BQ = 64, 32                      # dK/dV: keys x queries
DROW_ROWS = 4                              # Drow: rows per block (one warp each)
MAX_DIM = 256


def kv_split(d):
    """Warps that share one 16-key slice of dK/dV, each with D / kv_split columns."""
    return 2 if d > 128 else 1


def _padded(d):
    return d + 8


def smem_bytes(d):
    """Dynamic shared memory of each kernel for head size d (the layouts in SOURCE)."""
    row = 2 * _padded(d)
    split = kv_split(d)
    return {
        "flash_fwd": (FWD_BQ + 2 * FWD_BK) * row,
        "flash_bwd_dq": (2 * DQ_BQ + 2 * DQ_BK) * row,
        # K, V; Q, dO twice; L, Drow twice (float32); with the split, two exchange buffers of
        # 8 warps x 16 accumulators x 32 lanes (float32)
        "flash_bwd_dkdv": (2 * KV_BK + 4 * KV_BQ) * row + 4 * KV_BQ * 4 + (2 * 8 * 16 * 32 * 4 if split == 2 else 0),
        "flash_bwd_drow": 0,
    }


SOURCE = r"""
// HEAD_DIM (D) is defined in front of this source: one compilation per head size.
#define SROW (HEAD_DIM + 8)   // shared-memory row stride in halves (padding: see ldsm_x4)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

#define FWD_BQ 64
#define FWD_BK 64
#define FWD_THREADS 128
#define DQ_BQ 64
#define DQ_BK 32
#define DQ_THREADS 128
#define KV_BK 64
#define KV_BQ 32
#define KV_SPLIT (HEAD_DIM > 128 ? 2 : 1)
#define KV_THREADS (128 * KV_SPLIT)
#define KV_DP (HEAD_DIM / KV_SPLIT)   // columns of dK and dV per warp

struct __align__(16) chunk16 { unsigned x, y, z, w; };   // 8 halves, one 16-byte copy

// ----- tensor-core helpers (inline PTX; the only architecture-specific code) ------------------
//
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: one warp computes C (16x8, float32) +=
// A (16x16, float16) B (16x8, float16). Each matrix is spread over the 32 lanes in registers;
// with g = lane / 4 (0..7) and t = lane % 4 (0..3) a lane holds:
//   A: 4 registers of 2 halves: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//      a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]  (lower column in the low 16 bits)
//   B: 2 registers: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]  (two rows k of column n = g)
//   C: 4 floats: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// So the accumulators of two neighbouring 16x8 tiles C (columns 0-7 and 8-15) hold exactly
// the A registers of a 16x16 tile, (c0 c1 | c2 c3) of the left tile being a0 | a1 and of
// the right one a2 | a3: a score tile computed by one product is, rounded to float16, the
// A operand of the next product with no data movement.
//
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: loads four 8x8 matrices of halves from shared
// memory. Lane 8 m + r gives the address of row r of matrix m (16 contiguous bytes); lane L
// receives, from each matrix m, in register m, the two halves at row L / 4, columns 2 (L % 4)
// and 2 (L % 4) + 1: the A and B layouts above. With .trans each matrix arrives transposed:
// lane L gets rows 2 (L % 4) and 2 (L % 4) + 1 of column L / 4, so a B operand whose k index
// runs down the rows of shared memory (V, and Q, dO, K where they are B) needs .trans, and one
// whose k index runs along the rows (K in S = Q K^T) does not.
//
// A shared row holds D halves plus 8 of padding: the 8 rows of one 8x8 matrix then start
// 2 D + 16 bytes apart, i.e. an odd number of 16-byte units apart (D is a multiple of 16), so
// they land in 8 different groups of 4 banks and one ldmatrix phase has no bank conflict.
//
// cp.async.cg.shared.global [dst], [src], 16, n: copies n (16 or 0) bytes from global to
// shared memory without passing through registers and fills the rest of the 16 with zeros;
// commit_group closes the copies issued so far into a group, wait_group N waits until at most
// the N most recent groups are still in flight (for this thread's own copies: a __syncthreads
// after it makes every thread's copies visible).
//
// PTX_HELPERS_BEGIN (the CPU emulator in tests replaces this section with C++ equivalents)
""" + ASYNC_COPY_PTX + r"""
__device__ __forceinline__ void ldsm_x4(unsigned r[4], const half_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_t(unsigned r[4], const half_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// PTX_HELPERS_END

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    return (unsigned)f2h(lo) | ((unsigned)f2h(hi) << 16);
}

// Query row i (pos = q_offset + i) sees key j. Rows past tq (the end of a partial tile) see
// nothing; j <= pos < tk keeps keys past tk (zero-filled tile rows) out too.
__device__ __forceinline__ bool visible(int i, int j, int tq, int q_offset, int window) {
    const int pos = q_offset + i;
    return i < tq && j <= pos && (window <= 0 || j > pos - window);
}

// Every query row of [i0, i0 + rows) sees every key of [j0, j0 + keys) (all rows < tq, all
// keys < tk): a tile inside the mask, whose entries need no visible() test.
__device__ __forceinline__ bool all_visible(int i0, int rows, int j0, int keys, int tq, int tk, int q_offset,
                                            int window) {
    return i0 + rows <= tq && j0 + keys <= tk && j0 + keys - 1 <= q_offset + i0 &&
           (window <= 0 || j0 > q_offset + i0 + rows - 1 - window);
}

// Rows [row0, row0 + ROWS) of an (n, D) float16 matrix whose rows start `stride` halves apart
// (HEAD_DIM: row-major) into a padded shared tile, asynchronously; rows at or past n become zeros
// (so a partial tile adds nothing, not NaN).
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void load_tile(half_t* dst, const half_t* src, int row0, int n, int stride) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const bool valid = row0 + r < n;
        cp_async16(dst + r * SROW + col, src + (size_t)(valid ? row0 + r : 0) * stride + col, valid);
    }
}

// Entries [i0, i0 + N) of a float vector of length n into shared memory (zeros past n).
template <int N, int NTHREADS>
__device__ __forceinline__ void load_row_stats(float* dst, const float* src, int i0, int n) {
    for (int t = threadIdx.x; t < N; t += NTHREADS) cp_async4(dst + t, src + (i0 + t < n ? i0 + t : 0), i0 + t < n);
}

// C[16 x 8 NT] += A B for one warp: A is 16 rows of a shared tile (row-major, k along the
// row, at `a`: the warp's first row, column k0), B^T is 8 NT rows of a shared tile (k along
// the row, at `bt`: first row, column k0); K16 steps of 16 along k. This is Q K^T, dO V^T,
// K Q^T and V dO^T: both operands are stored with the contracted index along the row.
template <int NT, int K16>
__device__ __forceinline__ void mma_abt(float c[][4], const half_t* a, const half_t* bt, int lane) {
    const half_t* pa = a + (lane & 15) * SROW + (lane >> 4) * 8;
    const half_t* pb = bt + ((lane & 7) + ((lane >> 4) << 3)) * SROW + ((lane >> 3) & 1) * 8;
#pragma unroll 4
    for (int kk = 0; kk < K16; ++kk) {
        unsigned af[4];
        ldsm_x4(af, pa + kk * 16);
#pragma unroll
        for (int n = 0; n < NT / 2; ++n) {
            unsigned bf[4];  // b0, b1 of key tile 2n, then of 2n + 1
            ldsm_x4(bf, pb + n * 16 * SROW + kk * 16);
            mma16816(c[2 * n], af, bf[0], bf[1]);
            mma16816(c[2 * n + 1], af, bf[2], bf[3]);
        }
    }
}

// C[16 x 8 NT] += P B for one warp, where P (16 x 16 K16) is in registers as the accumulators
// of a previous product (p[2 kk], p[2 kk + 1] are the 16 columns of step kk; rounded to float16
// here) and B is a shared tile with k down its rows (at `b`: row of k = 0, first column).
// This is P V, dS K, P^T dO and dS^T Q.
template <int NT, int K16>
__device__ __forceinline__ void mma_pb(float c[][4], const float p[][4], const half_t* b, int lane) {
    const half_t* pb = b + ((lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < K16; ++kk) {
        const unsigned af[4] = {pack_half2(p[2 * kk][0], p[2 * kk][1]), pack_half2(p[2 * kk][2], p[2 * kk][3]),
                                pack_half2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                                pack_half2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < NT / 2; ++n) {
            unsigned bf[4];  // b0, b1 of column tile 2n, then of 2n + 1
            ldsm_x4_t(bf, pb + kk * 16 * SROW + n * 16);
            mma16816(c[2 * n], af, bf[0], bf[1]);
            mma16816(c[2 * n + 1], af, bf[2], bf[3]);
        }
    }
}

// Writes a warp's 16 x 8 NT float accumulators (times row factors f0 for rows g, f1 for rows
// g + 8), rounded to float16, into a shared tile at `dst` (its first row and column).
template <int NT>
__device__ __forceinline__ void stage(half_t* dst, const float c[][4], float f0, float f1, int lane) {
    half_t* p = dst + (lane >> 2) * SROW + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        *(unsigned*)(p + n * 8) = pack_half2(c[n][0] * f0, c[n][1] * f0);
        *(unsigned*)(p + 8 * SROW + n * 8) = pack_half2(c[n][2] * f1, c[n][3] * f1);
    }
}

// Copies rows [0, rows) of a shared tile to a global (., D) matrix at `dst` whose rows start
// `stride` halves apart, 16 bytes at a time, with `nthreads` threads starting at thread `first`.
__device__ __forceinline__ void store_rows(half_t* dst, const half_t* src, int rows, int first, int nthreads,
                                           int stride) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    for (int c = first; c < rows * CHUNKS; c += nthreads) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        *(chunk16*)(dst + (size_t)r * stride + col) = *(const chunk16*)(src + r * SROW + col);
    }
}

// O and dO share one layout, (B, Hq, Tq, D) or (B, Tq, Hq, D), given to the kernels as two
// strides in halves: row t of head h of batch b starts at b Hq Tq D + h ohs + t ots, with
// (ohs, ots) = (Tq D, D) in the first layout and (D, Hq D) in the second (a batch is Hq Tq D
// halves in both). Q, K, V, L, Drow and the gradients dQ, dK, dV are always (B, H, T, .).
__device__ __forceinline__ size_t o_head(int b, int h, int hq, int tq, int ohs) {
    return (size_t)b * hq * tq * HEAD_DIM + (size_t)h * ohs;
}

""" + QUAD_REDUCE + r"""
// ----- forward ---------------------------------------------------------------------------------
// Grid (Hq, B, query tiles): blocks start in launch order, x fastest, so all the last query
// tiles (the most key tiles to visit under a causal mask) start first and the short ones fill
// in at the end. Warp w owns query rows i0 + 16 w .. + 15; lane (g, t) holds rows g and g + 8 of them.
// Shared: Q tile (FWD_BQ rows), K tile, V tile (FWD_BK rows each). K(j+1) is loaded while the
// softmax and P V of tile j run, V(j+1) while S of tile j+1 runs; Q is read only by the warp
// that owns its rows, which finally reuses them to stage its output.
extern "C" __global__ void __launch_bounds__(FWD_THREADS, 1)
flash_fwd(const half_t* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ v,
          half_t* __restrict__ o, float* __restrict__ lse, int hq, int hkv, int tq, int tk, int q_offset,
          int window, float scale, int ohs, int ots) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sq = (half_t*)smem;
    half_t* sk = sq + FWD_BQ * SROW;
    half_t* sv = sk + FWD_BK * SROW;
    const int h = blockIdx.x, b = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i0 = tile * FWD_BQ;
    const size_t qrow0 = (size_t)(b * hq + h) * tq;                  // row of (b, h, 0) in q, lse
    const size_t krow0 = (size_t)(b * hkv + h / (hq / hkv)) * tk;    // row of (b, kv head, 0) in k, v
    const half_t* kb = k + krow0 * HEAD_DIM;
    const half_t* vb = v + krow0 * HEAD_DIM;

    // Key tiles any row of this tile sees: from the first row's lo to the last row's position.
    const int jlo = window > 0 ? max(0, q_offset + i0 - window + 1) : 0;
    const int jhi = q_offset + min(i0 + FWD_BQ, tq) - 1;
    const int jt0 = jlo / FWD_BK, jt1 = jhi / FWD_BK;

    load_tile<FWD_BQ, FWD_THREADS>(sq, q + qrow0 * HEAD_DIM, i0, tq, HEAD_DIM);
    cp_async_commit();
    load_tile<FWD_BK, FWD_THREADS>(sk, kb, jt0 * FWD_BK, tk, HEAD_DIM);
    cp_async_commit();
    load_tile<FWD_BK, FWD_THREADS>(sv, vb, jt0 * FWD_BK, tk, HEAD_DIM);
    cp_async_commit();

    const float c = scale * LOG2E;
    const int row = i0 + warp * 16 + (lane >> 2);   // this lane's rows: row and row + 8
    const int col = (lane & 3) * 2;                 // and columns col, col + 1 of each 8-wide tile
    float acc[HEAD_DIM / 8][4];
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};

    for (int jt = jt0; jt <= jt1; ++jt) {
        const int j0 = jt * FWD_BK;
        cp_async_wait<1>();   // Q and K(j) have landed; V(j) may still be in flight
        __syncthreads();
        float s[FWD_BK / 8][4];
#pragma unroll
        for (int n = 0; n < FWD_BK / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        mma_abt<FWD_BK / 8, HEAD_DIM / 16>(s, sq + warp * 16 * SROW, sk, lane);
        __syncthreads();      // every warp is done with K(j)
        if (jt < jt1) load_tile<FWD_BK, FWD_THREADS>(sk, kb, j0 + FWD_BK, tk, HEAD_DIM);
        cp_async_commit();    // (an empty group on the last tile keeps the wait counts right)

        // Scores in base 2, -inf where masked (tiles inside the mask skip the test).
        const bool whole = all_visible(i0, FWD_BQ, j0, FWD_BK, tq, tk, q_offset, window);
#pragma unroll
        for (int n = 0; n < FWD_BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] *= c;
                if (!whole && !visible(row + 8 * (e >> 1), j0 + n * 8 + col + (e & 1), tq, q_offset, window))
                    s[n][e] = neg_inf();
            }
        // Online softmax for rows `row` (r = 0: c0, c1) and `row + 8` (r = 1: c2, c3).
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = neg_inf();
#pragma unroll
            for (int n = 0; n < FWD_BK / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            const float m_new = fmaxf(m[r], quad_max(mx));
            const float base = m_new == neg_inf() ? 0.f : m_new;   // fully masked so far: subtract 0
            alpha[r] = ex2(m[r] - base);
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < FWD_BK / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = s[n][2 * r + e];
                    x = ex2(x - base);
                    sum += x;
                }
            l[r] = l[r] * alpha[r] + quad_sum(sum);
            m[r] = m_new;
        }
#pragma unroll
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
            acc[n][0] *= alpha[0]; acc[n][1] *= alpha[0];
            acc[n][2] *= alpha[1]; acc[n][3] *= alpha[1];
        }
        cp_async_wait<1>();   // V(j) has landed; K(j + 1) may still be in flight
        __syncthreads();
        mma_pb<HEAD_DIM / 8, FWD_BK / 16>(acc, s, sv, lane);
        __syncthreads();      // every warp is done with V(j)
        if (jt < jt1) load_tile<FWD_BK, FWD_THREADS>(sv, vb, j0 + FWD_BK, tk, HEAD_DIM);
        cp_async_commit();
    }

    // O = acc / l (rows past tq have l = 0 and are not written); L = (m + log2 l) ln 2.
    if ((lane & 3) == 0)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (row + 8 * r < tq) lse[qrow0 + row + 8 * r] = (m[r] + log2f(l[r])) * LN2;
    half_t* so = sq + warp * 16 * SROW;
    stage<HEAD_DIM / 8>(so, acc, 1.f / l[0], 1.f / l[1], lane);
    __syncwarp();
    const int rows = min(16, tq - (i0 + warp * 16));
    if (rows > 0) store_rows(o + o_head(b, h, hq, tq, ohs) + (size_t)(i0 + warp * 16) * ots, so, rows, lane, 32,
                             ots);
}

// ----- backward: Drow = rowsum(dO * O) ----------------------------------------------------------
// One warp per entry r = (b Hq + h) Tq + t of drow (B, Hq, Tq), reading row t of head h of batch
// b of gy and o (layout: o_head), 8 halves of each a lane at a time (16-byte loads, as the other
// kernels' copies of gy: rows start at multiples of D = 16k halves). (b, h, t) by 32-bit divisions:
// rows < 2^31 (more would be a terabyte of O).
__device__ __forceinline__ float dot2(unsigned a, unsigned b) {
    return h2f((half_t)(a & 0xffffu)) * h2f((half_t)(b & 0xffffu)) + h2f((half_t)(a >> 16)) * h2f((half_t)(b >> 16));
}

extern "C" __global__ void flash_bwd_drow(const half_t* __restrict__ gy, const half_t* __restrict__ o,
                                          float* __restrict__ drow, long long rows, int hq, int tq, int ohs,
                                          int ots) {
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;   // the whole warp leaves together
    const unsigned bh = (unsigned)r / (unsigned)tq, b = bh / (unsigned)hq;
    const size_t row = o_head((int)b, (int)(bh - b * hq), hq, tq, ohs) + (size_t)((unsigned)r - bh * tq) * ots;
    float s = 0.f;
    for (int c = 8 * lane; c < HEAD_DIM; c += 256) {
        const chunk16 a = *(const chunk16*)(gy + row + c), p = *(const chunk16*)(o + row + c);
        s += dot2(a.x, p.x) + dot2(a.y, p.y) + dot2(a.z, p.z) + dot2(a.w, p.w);
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) drow[r] = s;
}

// ----- backward: dQ ---------------------------------------------------------------------------
// Grid (Hq, B, query tiles), as the forward. Per visible key tile j:
//   S = Q K^T, P = exp2(S c - L log2 e) (0 where masked), dP = dO V^T,
//   dS = P (dP - Drow) scale (rounded to float16), dQ += dS K.
// Shared: Q and dO tiles (DQ_BQ rows each, read only by their owning warp, Q finally reused to
// stage dQ), K and V tiles (DQ_BK rows). K(j + 1) and V(j + 1) are loaded after tile j, in two
// groups, so S of tile j + 1 runs while V(j + 1) is still arriving.
extern "C" __global__ void __launch_bounds__(DQ_THREADS, 1)
flash_bwd_dq(const half_t* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ v,
             const half_t* __restrict__ gy, const float* __restrict__ lse, const float* __restrict__ drow,
             half_t* __restrict__ dq, int hq, int hkv, int tq, int tk, int q_offset, int window, float scale,
             int ohs, int ots) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sq = (half_t*)smem;
    half_t* sdo = sq + DQ_BQ * SROW;
    half_t* sk = sdo + DQ_BQ * SROW;
    half_t* sv = sk + DQ_BK * SROW;
    const int h = blockIdx.x, b = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i0 = tile * DQ_BQ;
    const size_t qrow0 = (size_t)(b * hq + h) * tq;
    const size_t krow0 = (size_t)(b * hkv + h / (hq / hkv)) * tk;
    const half_t* kb = k + krow0 * HEAD_DIM;
    const half_t* vb = v + krow0 * HEAD_DIM;
    const int jlo = window > 0 ? max(0, q_offset + i0 - window + 1) : 0;
    const int jhi = q_offset + min(i0 + DQ_BQ, tq) - 1;
    const int jt0 = jlo / DQ_BK, jt1 = jhi / DQ_BK;

    load_tile<DQ_BQ, DQ_THREADS>(sq, q + qrow0 * HEAD_DIM, i0, tq, HEAD_DIM);
    load_tile<DQ_BQ, DQ_THREADS>(sdo, gy + o_head(b, h, hq, tq, ohs), i0, tq, ots);
    load_tile<DQ_BK, DQ_THREADS>(sk, kb, jt0 * DQ_BK, tk, HEAD_DIM);
    cp_async_commit();
    load_tile<DQ_BK, DQ_THREADS>(sv, vb, jt0 * DQ_BK, tk, HEAD_DIM);
    cp_async_commit();

    const float c = scale * LOG2E;
    const int row = i0 + warp * 16 + (lane >> 2), col = (lane & 3) * 2;
    float l2[2], dr[2];   // L log2 e and Drow of rows row, row + 8 (0 past tq: those P are 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool in = row + 8 * r < tq;
        l2[r] = in ? lse[qrow0 + row + 8 * r] * LOG2E : 0.f;
        dr[r] = in ? drow[qrow0 + row + 8 * r] : 0.f;
    }
    float acc[HEAD_DIM / 8][4];
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    for (int jt = jt0; jt <= jt1; ++jt) {
        const int j0 = jt * DQ_BK;
        cp_async_wait<1>();   // Q, dO, K(j)
        __syncthreads();
        float p[DQ_BK / 8][4], dp[DQ_BK / 8][4];
#pragma unroll
        for (int n = 0; n < DQ_BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[n][e] = dp[n][e] = 0.f;
        mma_abt<DQ_BK / 8, HEAD_DIM / 16>(p, sq + warp * 16 * SROW, sk, lane);
        const bool whole = all_visible(i0, DQ_BQ, j0, DQ_BK, tq, tk, q_offset, window);
#pragma unroll
        for (int n = 0; n < DQ_BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                p[n][e] = whole || visible(row + 8 * (e >> 1), j0 + n * 8 + col + (e & 1), tq, q_offset, window)
                              ? ex2(p[n][e] * c - l2[e >> 1]) : 0.f;
        cp_async_wait<0>();   // V(j)
        __syncthreads();
        mma_abt<DQ_BK / 8, HEAD_DIM / 16>(dp, sdo + warp * 16 * SROW, sv, lane);
#pragma unroll
        for (int n = 0; n < DQ_BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[n][e] = p[n][e] * (dp[n][e] - dr[e >> 1]) * scale;   // dS
        mma_pb<HEAD_DIM / 8, DQ_BK / 16>(acc, p, sk, lane);
        __syncthreads();      // every warp is done with K(j) and V(j)
        if (jt < jt1) load_tile<DQ_BK, DQ_THREADS>(sk, kb, j0 + DQ_BK, tk, HEAD_DIM);
        cp_async_commit();
        if (jt < jt1) load_tile<DQ_BK, DQ_THREADS>(sv, vb, j0 + DQ_BK, tk, HEAD_DIM);
        cp_async_commit();
    }

    half_t* so = sq + warp * 16 * SROW;
    stage<HEAD_DIM / 8>(so, acc, 1.f, 1.f, lane);
    __syncwarp();
    const int rows = min(16, tq - (i0 + warp * 16));
    if (rows > 0) store_rows(dq + (qrow0 + i0 + warp * 16) * HEAD_DIM, so, rows, lane, 32, HEAD_DIM);
}

// The Q and dO tiles and the L and Drow entries of query rows [i0, i0 + KV_BQ) of head h.
__device__ __forceinline__ void load_step(half_t* sq, half_t* sdo, float* sl, float* sd, const half_t* q,
                                          const half_t* gy, const float* lse, const float* drow, int b, int hq,
                                          int tq, int ohs, int ots, int h, int i0) {
    const size_t qrow0 = (size_t)(b * hq + h) * tq;
    load_tile<KV_BQ, KV_THREADS>(sq, q + qrow0 * HEAD_DIM, i0, tq, HEAD_DIM);
    load_tile<KV_BQ, KV_THREADS>(sdo, gy + o_head(b, h, hq, tq, ohs), i0, tq, ots);
    load_row_stats<KV_BQ, KV_THREADS>(sl, lse + qrow0, i0, tq);
    load_row_stats<KV_BQ, KV_THREADS>(sd, drow + qrow0, i0, tq);
}

// ----- backward: dK and dV --------------------------------------------------------------------
// Grid (Hkv, B, key tiles): the first key tiles (seen by the most queries under a causal mask)
// start first. Warp w owns keys j0 + 16 (w % 4) .. + 15 and columns KV_DP (w / 4) .. + KV_DP - 1
// of dK and dV. Working on transposed tiles (keys as rows) keeps each product's output rows
// inside one warp; per query tile (of every query head of the group that can see these keys):
//   S^T = K Q^T, P^T = exp2(S^T c - L log2 e), dV += P^T dO,
//   dP^T = V dO^T, dS^T = P^T (dP^T - Drow) scale (float16), dK += dS^T Q.
// With KV_SPLIT = 2 each of the two warps of a key slice contracts S^T and dP^T over its own
// D / 2 columns, and they add the halves through shared memory (xs), in fragment order: lane L
// of one warp holds the same entries as lane L of its partner (warp ^ 4).
// Shared: K, V tiles (KV_BK rows), Q and dO tiles (KV_BQ rows) twice (the next query tile is
// loaded while this one is used), L and Drow of the query tile twice, xs.
extern "C" __global__ void __launch_bounds__(KV_THREADS, 1)
flash_bwd_dkdv(const half_t* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ v,
               const half_t* __restrict__ gy, const float* __restrict__ lse, const float* __restrict__ drow,
               half_t* __restrict__ dk, half_t* __restrict__ dv, int hq, int hkv, int tq, int tk,
               int q_offset, int window, float scale, int ohs, int ots) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sk = (half_t*)smem;
    half_t* sv = sk + KV_BK * SROW;
    half_t* sq = sv + KV_BK * SROW;       // [2][KV_BQ][SROW]
    half_t* sdo = sq + 2 * KV_BQ * SROW;  // [2][KV_BQ][SROW]
    float* sl = (float*)(sdo + 2 * KV_BQ * SROW);   // [2][KV_BQ]: L log2 e is formed on use
    float* sd = sl + 2 * KV_BQ;                     // [2][KV_BQ]
#if KV_SPLIT == 2
    float* xs_s = sd + 2 * KV_BQ;                   // [8 warps][16 entries][32 lanes]
    float* xs_dp = xs_s + 8 * 16 * 32;
#endif
    const int kvh = blockIdx.x, b = blockIdx.y, tile = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int slice = warp & 3, part = warp >> 2;
    const int group = hq / hkv;
    const int j0 = tile * KV_BK;
    const size_t krow0 = (size_t)(b * hkv + kvh) * tk;

    // Query tiles that see any of these keys: from the first query at or after key j0 to the
    // last whose window still reaches the last key.
    const int jlast = min(j0 + KV_BK, tk) - 1;
    const int ilo = max(0, j0 - q_offset);
    const int ihi = window > 0 ? min(tq - 1, jlast + window - 1 - q_offset) : tq - 1;
    const int it0 = ilo / KV_BQ;
    const int tiles = ilo <= ihi ? ihi / KV_BQ - it0 + 1 : 0;
    const int steps = group * tiles;   // (query head, query tile) pairs, head by head

    if (steps > 0) {
        load_tile<KV_BK, KV_THREADS>(sk, k + krow0 * HEAD_DIM, j0, tk, HEAD_DIM);
        load_tile<KV_BK, KV_THREADS>(sv, v + krow0 * HEAD_DIM, j0, tk, HEAD_DIM);
    }
    const float c = scale * LOG2E;
    const int key = j0 + slice * 16 + (lane >> 2), col = (lane & 3) * 2;   // rows key, key + 8
    float adk[KV_DP / 8][4], adv[KV_DP / 8][4];
#pragma unroll
    for (int n = 0; n < KV_DP / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) adk[n][e] = adv[n][e] = 0.f;

    // Step s works on query tile it0 + s % tiles of query head kvh * group + s / tiles, in buffer
    // s & 1; the tiles of step s + 1 are loaded while step s runs.
    if (steps > 0) load_step(sq, sdo, sl, sd, q, gy, lse, drow, b, hq, tq, ohs, ots, kvh * group, it0 * KV_BQ);
    cp_async_commit();
    int h = kvh * group, it = it0;   // of the current step
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        const int nh = it + 1 - it0 < tiles ? h : h + 1, nit = it + 1 - it0 < tiles ? it + 1 : it0;
        if (step + 1 < steps)
            load_step(sq + (buf ^ 1) * KV_BQ * SROW, sdo + (buf ^ 1) * KV_BQ * SROW, sl + (buf ^ 1) * KV_BQ,
                      sd + (buf ^ 1) * KV_BQ, q, gy, lse, drow, b, hq, tq, ohs, ots, nh, nit * KV_BQ);
        cp_async_commit();
        cp_async_wait<1>();   // this step's tiles (and K, V) have landed
        __syncthreads();
        const int i0 = it * KV_BQ;
        h = nh;
        it = nit;
        const half_t* cq = sq + buf * KV_BQ * SROW;
        const half_t* cdo = sdo + buf * KV_BQ * SROW;
        const float* cl = sl + buf * KV_BQ;
        const float* cd = sd + buf * KV_BQ;

        float p[KV_BQ / 8][4], dp[KV_BQ / 8][4];
#pragma unroll
        for (int n = 0; n < KV_BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[n][e] = dp[n][e] = 0.f;
        mma_abt<KV_BQ / 8, KV_DP / 16>(p, sk + slice * 16 * SROW + part * KV_DP, cq + part * KV_DP, lane);
#if KV_SPLIT == 2
#pragma unroll
        for (int n = 0; n < KV_BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) xs_s[(warp * 16 + n * 4 + e) * 32 + lane] = p[n][e];
        __syncthreads();
#pragma unroll
        for (int n = 0; n < KV_BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[n][e] += xs_s[((warp ^ 4) * 16 + n * 4 + e) * 32 + lane];
#endif
        // P^T: entry (key + 8 (e >> 1), query i0 + 8 n + col + (e & 1)).
        const bool whole = all_visible(i0, KV_BQ, j0, KV_BK, tq, tk, q_offset, window);
#pragma unroll
        for (int n = 0; n < KV_BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int iq = n * 8 + col + (e & 1);
                p[n][e] = whole || visible(i0 + iq, key + 8 * (e >> 1), tq, q_offset, window)
                              ? ex2(p[n][e] * c - cl[iq] * LOG2E) : 0.f;
            }
        mma_pb<KV_DP / 8, KV_BQ / 16>(adv, p, cdo + part * KV_DP, lane);
        mma_abt<KV_BQ / 8, KV_DP / 16>(dp, sv + slice * 16 * SROW + part * KV_DP, cdo + part * KV_DP, lane);
#if KV_SPLIT == 2
#pragma unroll
        for (int n = 0; n < KV_BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) xs_dp[(warp * 16 + n * 4 + e) * 32 + lane] = dp[n][e];
        __syncthreads();
#pragma unroll
        for (int n = 0; n < KV_BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[n][e] += xs_dp[((warp ^ 4) * 16 + n * 4 + e) * 32 + lane];
#endif
#pragma unroll
        for (int n = 0; n < KV_BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[n][e] = p[n][e] * (dp[n][e] - cd[n * 8 + col + (e & 1)]) * scale;
        mma_pb<KV_DP / 8, KV_BQ / 16>(adk, p, cq + part * KV_DP, lane);
        __syncthreads();      // every warp is done with this buffer (and xs) before it is refilled
    }

    cp_async_wait<0>();       // nothing may land in sk, sv after they are reused below
    __syncthreads();
    stage<KV_DP / 8>(sk + slice * 16 * SROW + part * KV_DP, adk, 1.f, 1.f, lane);
    stage<KV_DP / 8>(sv + slice * 16 * SROW + part * KV_DP, adv, 1.f, 1.f, lane);
    __syncthreads();
    const int rows = min(KV_BK, tk - j0);
    store_rows(dk + (krow0 + j0) * HEAD_DIM, sk, rows, threadIdx.x, KV_THREADS, HEAD_DIM);
    store_rows(dv + (krow0 + j0) * HEAD_DIM, sv, rows, threadIdx.x, KV_THREADS, HEAD_DIM);
}
"""


def supports(q, k, v, window=None, q_offset=None):
    """True when the kernels take these inputs: float16 (B, H, T, D) arrays with D a multiple of
    16 up to 256 (v's D too), Hq a multiple of Hkv, at least one query and key, and the queries
    within the keys (q_offset + Tq <= Tk; q_offset defaults to Tk - Tq, as in F.attention); on
    a GPU, one with mma.sync, ldmatrix and cp.async (compute capability 8.0 or later)."""
    if any(a.dtype != np.float16 or a.ndim != 4 for a in (q, k, v)):
        return False
    if backend.get_array_module(q) is not np and not _ampere_or_later(q.device.id):
        return False
    (b, hq, tq, d), (bk, hkv, tk, dk) = q.shape, k.shape
    q_offset = tk - tq if q_offset is None else q_offset
    return (v.shape == k.shape and bk == b and dk == d and d % 16 == 0 and 16 <= d <= MAX_DIM
            and min(b, hq, hkv, tq) > 0 and hq % hkv == 0 and 0 <= q_offset and q_offset + tq <= tk
            and max(b, -(-tk // KV_BK)) <= 65535  # grid y and z limits
            and (window is None or window >= 1))


@functools.lru_cache(maxsize=None)
def _ampere_or_later(device_id):
    return int(backend.cupy.cuda.Device(device_id).compute_capability) >= 80


@functools.lru_cache(maxsize=None)
def _kernel(d, name):
    fn = kernel(f"#define HEAD_DIM {d}\n" + SOURCE, name)
    shared = smem_bytes(d)[name]
    if shared > 48 * 1024:  # above the default limit a kernel must opt in
        fn.max_dynamic_shared_size_bytes = shared
    return fn


def _launch(d, name, grid, threads, args):
    """Runs kernel `name` of the head-size-d build (tests swap in a CPU emulator here)."""
    _kernel(d, name)(grid, (threads,), args, shared_mem=smem_bytes(d)[name])


def _use_hopper(q, d):
    """The wgmma kernels (flash_attention_sm90.py) take this call: q on a compute capability 9.0
    GPU and D a multiple of 64 (tests point this at the emulator)."""
    return backend.get_array_module(q) is not np and sm90.supports(q, d)


def _ints(*values):
    return tuple(np.int32(x) for x in values)


def _window(window, tk):
    """The kernels' window argument: 0 for none, and for one of Tk keys or more, which hides
    nothing (and would overflow int32 in the kernels' index arithmetic if huge)."""
    return 0 if window is None or window >= tk else window


def _sizes(hq, hkv, tq, tk, q_offset, window, scale, strides):
    """The attention kernels' arguments after their arrays (both builds take the same)."""
    return _ints(hq, hkv, tq, tk, q_offset, _window(window, tk)) + (np.float32(scale),) + strides


LAYOUTS = ("bhtd", "bthd")


def out_shape(b, h, t, d, out_layout):
    """Shape of O (and dO) in `out_layout`: "bhtd" (B, Hq, Tq, D) or "bthd" (B, Tq, Hq, D)."""
    if out_layout not in LAYOUTS:
        raise ValueError(f"out_layout must be one of {LAYOUTS}, got {out_layout!r}")
    return (b, h, t, d) if out_layout == "bhtd" else (b, t, h, d)


def _o_strides(hq, tq, d, out_layout):
    """The kernels' (ohs, ots): halves from one head of O and dO to the next and from one row
    (query position) to the next; see o_head in SOURCE."""
    return _ints(tq * d, d) if out_layout == "bhtd" else _ints(d, hq * d)


def forward(q, k, v, scale, window, q_offset, out_layout="bhtd"):
    """(O, L): the output float16, (B, Hq, Tq, D), or (B, Tq, Hq, D) with out_layout="bthd"
    (written there directly), and the row logsumexp (B, Hq, Tq) float32."""
    xp = backend.get_array_module(q)
    q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
    (b, hq, tq, d), (hkv, tk) = q.shape, k.shape[1:3]
    out = xp.empty(out_shape(b, hq, tq, d, out_layout), np.float16)
    lse = xp.empty((b, hq, tq), np.float32)
    sizes = _sizes(hq, hkv, tq, tk, q_offset, window, scale, _o_strides(hq, tq, d, out_layout))
    if _use_hopper(q, d):
        sm90.forward(q, k, v, out, lse, sizes)
    else:
        _launch(d, "flash_fwd", (hq, b, -(-tq // FWD_BQ)), FWD_THREADS, (q, k, v, out, lse) + sizes)
    return out, lse


def backward(gy, q, k, v, out, lse, scale, window, q_offset, needs_grad=(True, True, True), out_layout="bhtd"):
    """(dQ, dK, dV) float16, None where `needs_grad` says no gradient is wanted; out and lse are
    the forward's, gy and out in its `out_layout`. Arrays of any strides (the kernels read
    C-contiguous copies: no copy for the usual contiguous inputs)."""
    xp = backend.get_array_module(q)
    gy, q, k, v, out = (xp.ascontiguousarray(a) for a in (gy, q, k, v, out))
    (b, hq, tq, d), (hkv, tk) = q.shape, k.shape[1:3]
    if gy.shape != out_shape(b, hq, tq, d, out_layout) or out.shape != gy.shape:
        raise ValueError(f"flash backward: gy {gy.shape} and out {out.shape} are not {out_layout} for q {q.shape}")
    strides = _o_strides(hq, tq, d, out_layout)
    sizes = _sizes(hq, hkv, tq, tk, q_offset, window, scale, strides)
    drow = xp.empty(lse.shape, np.float32)
    rows = b * hq * tq
    _launch(d, "flash_bwd_drow", (-(-rows // DROW_ROWS),), 32 * DROW_ROWS,
            (gy, out, drow, np.int64(rows)) + _ints(hq, tq) + strides)
    gq = gk = gv = None
    hopper = _use_hopper(q, d)
    if needs_grad[0]:
        gq = xp.empty(q.shape, np.float16)
        if hopper:
            sm90.backward_dq(q, k, v, gy, lse, drow, gq, sizes)
        else:
            _launch(d, "flash_bwd_dq", (hq, b, -(-tq // DQ_BQ)), DQ_THREADS, (q, k, v, gy, lse, drow, gq) + sizes)
    if needs_grad[1] or needs_grad[2]:
        gk, gv = xp.empty(k.shape, np.float16), xp.empty(v.shape, np.float16)
        if hopper:
            sm90.backward_dkdv(q, k, v, gy, lse, drow, gk, gv, sizes)
        else:
            _launch(d, "flash_bwd_dkdv", (hkv, b, -(-tk // KV_BK)), 128 * kv_split(d),
                    (q, k, v, gy, lse, drow, gk, gv) + sizes)
    return gq, gk if needs_grad[1] else None, gv if needs_grad[2] else None


class FlashAttention(Attention):
    """Attention (nn_ops/attention.py) by the flash kernels above: saves the output and the row
    logsumexp, no T x T matrix (F.attention picks it for the inputs `supports` takes)."""

    def forward(self, q, k, v):
        out, self.lse = forward(q, k, v, self.scale, self.window, self.q_offset, self.out_layout)
        self.q, self.k, self.v, self.out = q, k, v, out
        return out

    def backward(self, gy):
        return backward(gy, self.q, self.k, self.v, self.out, self.lse, self.scale, self.window, self.q_offset,
                        self.needs_grad, self.out_layout)


# ----- NumPy reference ------------------------------------------------------------------------
# The kernels' algorithm in array code: the same tiles, visited in the same order, with the same
# roundings (P and dS to the input dtype before they multiply, like the kernels' float16
# operands). float16 inputs are computed in float32; float32 and float64 inputs in their own
# dtype, where the roundings do nothing, so on those the reference equals exact attention up to
# summation order (the CPU tests check it against the engine's reference op).

def _compute_dtype(dtype):
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def all_visible(i0, rows, j0, keys, tq, tk, q_offset, window):
    """Every query of [i0, i0 + rows) sees every key of [j0, j0 + keys), all inside the arrays:
    the kernels then skip the per-entry test (kernel: all_visible(), window 0 for none; the
    per-entry test, visible(), is causal_mask's rule)."""
    return (i0 + rows <= tq and j0 + keys <= tk and j0 + keys - 1 <= q_offset + i0
            and (window is None or j0 > q_offset + i0 + rows - 1 - window))


def key_tiles(i0, tq, q_offset, window, bq, bk):
    """The key tiles (range of tile indices) that query tile [i0, i0 + bq) visits."""
    lo = max(0, q_offset + i0 - window + 1) if window is not None else 0
    hi = q_offset + min(i0 + bq, tq) - 1
    return range(lo // bk, hi // bk + 1)


def query_tiles(j0, tq, tk, q_offset, window, bk, bq):
    """The query tiles that key tile [j0, j0 + bk) is visited by (empty if none sees it)."""
    lo = max(0, j0 - q_offset)
    hi = tq - 1 if window is None else min(tq - 1, min(j0 + bk, tk) - 1 + window - 1 - q_offset)
    return range(lo // bq, hi // bq + 1) if lo <= hi else range(0)


def _kv_heads(x, hq):
    """K or V (B, Hkv, T, D) indexed per query head: (B, Hq, T, D), head h -> kv head h // G."""
    return x[:, np.arange(hq) // (hq // x.shape[1])]


def _as_bhtd(x, out_layout):
    """O or dO in `out_layout` viewed as (B, Hq, Tq, D) (the kernels' o_head strides)."""
    return x if out_layout == "bhtd" else x.transpose(0, 2, 1, 3)


def reference_forward(q, k, v, scale, window, q_offset, out_layout="bhtd"):
    """(O, L) as flash_fwd computes them: per query tile, the online softmax over its visible
    key tiles, in base 2; O written in `out_layout` as the kernel writes it."""
    c = _compute_dtype(q.dtype)
    rnd = lambda x: x.astype(q.dtype).astype(c)  # noqa: E731  (an operand of a float16 product)
    (b, hq, tq, d), tk = q.shape, k.shape[2]
    kh, vh = _kv_heads(k, hq), _kv_heads(v, hq)
    log2e = c.type(np.log2(np.e))
    cs = c.type(scale) * log2e
    result = np.empty(out_shape(b, hq, tq, d, out_layout), q.dtype)
    out = _as_bhtd(result, out_layout)   # a view: tiles land in the layout's rows
    lse = np.empty((b, hq, tq), c)
    for i0 in range(0, tq, FWD_BQ):
        i1 = min(i0 + FWD_BQ, tq)
        qt = q[:, :, i0:i1].astype(c)
        m = np.full((b, hq, i1 - i0), -np.inf, c)
        l = np.zeros((b, hq, i1 - i0), c)
        acc = np.zeros((b, hq, i1 - i0, d), c)
        for jt in key_tiles(i0, tq, q_offset, window, FWD_BQ, FWD_BK):
            j0, j1 = jt * FWD_BK, min((jt + 1) * FWD_BK, tk)
            s = (qt @ kh[:, :, j0:j1].astype(c).swapaxes(-1, -2)) * cs
            s = np.where(causal_mask(np, i1 - i0, j1 - j0, q_offset, window, i0, j0), s, -np.inf)
            m_new = np.maximum(m, s.max(axis=-1))
            base = np.where(m_new == -np.inf, 0, m_new)   # a row masked so far: subtract 0
            alpha = np.exp2(m - base)
            p = np.exp2(s - base[..., None])
            l = l * alpha + p.sum(axis=-1)
            acc = acc * alpha[..., None] + rnd(p) @ vh[:, :, j0:j1].astype(c)
            m = m_new
        out[:, :, i0:i1] = (acc * (1 / l)[..., None]).astype(q.dtype)
        lse[:, :, i0:i1] = (m + np.log2(l)) / log2e
    return result, lse


def reference_backward(gy, q, k, v, out, lse, scale, window, q_offset, out_layout="bhtd"):
    """(dQ, dK, dV) as the three backward kernels compute them; gy and out in `out_layout`."""
    gy, out = _as_bhtd(gy, out_layout), _as_bhtd(out, out_layout)
    c = _compute_dtype(q.dtype)
    rnd = lambda x: x.astype(q.dtype).astype(c)  # noqa: E731
    (b, hq, tq, d), (hkv, tk) = q.shape, k.shape[1:3]
    group = hq // hkv
    log2e = c.type(np.log2(np.e))
    cs, sc = c.type(scale) * log2e, c.type(scale)
    drow = (gy.astype(c) * out.astype(c)).sum(axis=-1)     # flash_bwd_drow
    l2 = lse.astype(c) * log2e

    # flash_bwd_dq: per query tile, its visible key tiles
    kh, vh = _kv_heads(k, hq), _kv_heads(v, hq)
    dq = np.empty(q.shape, q.dtype)
    for i0 in range(0, tq, DQ_BQ):
        i1 = min(i0 + DQ_BQ, tq)
        qt, gt = q[:, :, i0:i1].astype(c), gy[:, :, i0:i1].astype(c)
        acc = np.zeros(qt.shape, c)
        for jt in key_tiles(i0, tq, q_offset, window, DQ_BQ, DQ_BK):
            j0, j1 = jt * DQ_BK, min((jt + 1) * DQ_BK, tk)
            kt, vt = kh[:, :, j0:j1].astype(c), vh[:, :, j0:j1].astype(c)
            p = np.exp2((qt @ kt.swapaxes(-1, -2)) * cs - l2[:, :, i0:i1, None])
            p = np.where(causal_mask(np, i1 - i0, j1 - j0, q_offset, window, i0, j0), p, 0)
            dp = gt @ vt.swapaxes(-1, -2)
            acc += rnd(p * (dp - drow[:, :, i0:i1, None]) * sc) @ kt
        dq[:, :, i0:i1] = acc.astype(q.dtype)

    # flash_bwd_dkdv: per key tile, the visible query tiles of each query head of its group
    qg = q.reshape(b, hkv, group, tq, d)
    gg = gy.reshape(b, hkv, group, tq, d)
    l2g, drg = l2.reshape(b, hkv, group, tq), drow.reshape(b, hkv, group, tq)
    dk, dv = np.empty(k.shape, k.dtype), np.empty(v.shape, v.dtype)
    for j0 in range(0, tk, KV_BK):
        j1 = min(j0 + KV_BK, tk)
        kt, vt = k[:, :, j0:j1].astype(c), v[:, :, j0:j1].astype(c)
        adk, adv = np.zeros(kt.shape, c), np.zeros(vt.shape, c)
        for hh in range(group):
            for it in query_tiles(j0, tq, tk, q_offset, window, KV_BK, KV_BQ):
                i0, i1 = it * KV_BQ, min((it + 1) * KV_BQ, tq)
                qt, gt = qg[:, :, hh, i0:i1].astype(c), gg[:, :, hh, i0:i1].astype(c)
                pt = np.exp2((kt @ qt.swapaxes(-1, -2)) * cs - l2g[:, :, hh, None, i0:i1])
                pt = np.where(causal_mask(np, i1 - i0, j1 - j0, q_offset, window, i0, j0).T, pt, 0)
                adv += rnd(pt) @ gt
                dpt = vt @ gt.swapaxes(-1, -2)
                adk += rnd(pt * (dpt - drg[:, :, hh, None, i0:i1]) * sc) @ qt
        dk[:, :, j0:j1], dv[:, :, j0:j1] = adk.astype(k.dtype), adv.astype(v.dtype)
    return dq, dk, dv
