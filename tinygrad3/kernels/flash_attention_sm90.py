"""Flash attention on Hopper's warpgroup tensor cores (wgmma, sm_90a): the algorithm of
flash_attention.py (its docstring derives it: online softmax, P recomputed from the row
logsumexp, the Drow identity), with every tile product one `wgmma` per 16-wide k-step of a
warpgroup (128 threads, 64 rows) instead of mma.sync per warp (16 rows), operands read by the
tensor cores straight from shared memory (kernels/wgmma.py: 128-byte swizzled tiles, descriptors).

The blocks are 256 threads, two warpgroups:
  * forward: 128 queries, warpgroup g owns queries 64 g .. 64 g + 63 and visits the key tiles
    (64 keys, double-buffered) its own rows see: S = Q K^T (SS, n64), online softmax in
    registers, O += P V (RS, n = D);
  * dQ: 128 queries, 64-key tiles (K double-buffered, V single), per warpgroup S = Q K^T and
    dP = dO V^T (SS, n64), dS = P (dP - Drow) scale, dQ += dS K (RS);
  * dK/dV: 64 keys, 64-query steps over every query head of the group; warpgroup 0 computes
    S^T = K Q^T, P^T, dV += P^T dO; warpgroup 1 computes S^T and P^T too, dP^T = V dO^T, dS^T
    and dK += dS^T Q, with no exchange between the two: each holds one D-wide accumulator
    (128 registers a thread).
The forward's 64-row warpgroup tiles and 64-key tiles are the NumPy reference's
(flash_attention.reference_*); dQ's 64-key tiles are two of the reference's 32-key ones. Every
probability and dS is computed element by element as there, so the kernels differ from the
reference only in the order of float32 sums.

Used on compute capability 9.0 for D a multiple of 64 up to 256 (`supports`); the mma.sync kernels
of flash_attention.py take every other GPU and shape. The row-sum kernel (Drow) is theirs.
"""
import functools

from . import wgmma
from .cuda import QUAD_REDUCE, kernel_sm90a

THREADS = 256
FWD_BQ, FWD_BK = 128, 64
DQ_BQ, DQ_BK = 128, 64
KV_BK, KV_BQ = 64, 64


def smem_bytes(d):
    """Dynamic shared memory of each kernel for head size d (1 KB for 1024-alignment)."""
    row = 2 * d
    return {
        "flash_fwd_sm90": 1024 + (FWD_BQ + 4 * FWD_BK) * row,
        "flash_bwd_dq_sm90": 1024 + (2 * DQ_BQ + 3 * DQ_BK) * row,   # Q, dO; K twice; V once
        # K, V; Q, dO twice; L, Drow twice
        "flash_bwd_dkdv_sm90": 1024 + (2 * KV_BK + 4 * KV_BQ) * row + 4 * KV_BQ * 4,
    }


SOURCE = r"""
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Query row i (pos = q_offset + i) sees key j (flash_attention.py's rule: j <= pos, and j > pos - window
// with a window) when 0 <= pos - j < span: one unsigned comparison, span = span_of(window).
__device__ __forceinline__ int span_of(int window) { return window > 0 ? window : 0x7fffffff; }
__device__ __forceinline__ bool visible(int i, int j, int tq, int q_offset, int span) {
    return i < tq && (unsigned)(q_offset + i - j) < (unsigned)span;
}

__device__ __forceinline__ bool all_visible(int i0, int rows, int j0, int keys, int tq, int tk, int q_offset,
                                            int window) {
    return i0 + rows <= tq && j0 + keys <= tk && j0 + keys - 1 <= q_offset + i0 &&
           (window <= 0 || j0 > q_offset + i0 + rows - 1 - window);
}

__device__ __forceinline__ size_t o_head(int b, int h, int hq, int tq, int ohs) {
    return (size_t)b * hq * tq * HEAD_DIM + (size_t)h * ohs;
}

""" + QUAD_REDUCE + r"""
// Key tiles [*t0, *t1] that query rows [i0, i0 + 64) see, bk keys a tile (empty: t1 < t0).
__device__ __forceinline__ void key_range(int i0, int tq, int q_offset, int window, int bk, int* t0, int* t1) {
    const int lo = window > 0 ? max(0, q_offset + i0 - window + 1) : 0;
    *t0 = lo / bk;
    *t1 = i0 < tq ? (q_offset + min(i0 + 64, tq) - 1) / bk : *t0 - 1;
}

// ----- forward ---------------------------------------------------------------------------------
// Grid (Hq, B, query tiles of 128), last tiles first. Shared: Q (128 rows), K and V (64 rows) twice.
// Each step: wait for tile jt, barrier (the other buffer is free), prefetch tile jt + 1, and each
// warpgroup whose rows see tile jt: S (16 SS k-steps), mask, online softmax, rescale, O += P V.
extern "C" __global__ void __launch_bounds__(256, 1)
flash_fwd_sm90(const half_t* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ v,
               half_t* __restrict__ o, float* __restrict__ lse, int hq, int hkv, int tq, int tk, int q_offset,
               int window, float scale, int ohs, int ots) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sq = (half_t*)align1024(smem);
    half_t* sk = sq + 128 * HEAD_DIM;   // [2][64][HEAD_DIM]
    half_t* sv = sk + 2 * 64 * HEAD_DIM; // [2][64][HEAD_DIM]
    const int h = blockIdx.x, b = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;
    const int wg = warpgroup(), t = threadIdx.x & 127, lane = threadIdx.x & 31;
    const int i0 = tile * 128, iw = i0 + 64 * wg;   // the block's and this warpgroup's first query
    const size_t qrow0 = (size_t)(b * hq + h) * tq;
    const size_t krow0 = (size_t)(b * hkv + h / (hq / hkv)) * tk;
    const half_t* kb = k + krow0 * HEAD_DIM;
    const half_t* vb = v + krow0 * HEAD_DIM;
    int a0, a1, w0, w1;
    key_range(i0, tq, q_offset, window, 64, &a0, &a1);        // rows i0 .. i0 + 63
    key_range(i0 + 64, tq, q_offset, window, 64, &w0, &w1);   // rows i0 + 64 .. i0 + 127
    const int jt0 = a0, jt1 = max(a1, w1);
    if (wg == 0) { w0 = a0; w1 = a1; }

    load_sw<128, 256>(sq, q + qrow0 * HEAD_DIM, i0, tq, HEAD_DIM, threadIdx.x);
    load_sw<64, 256>(sk, kb, jt0 * 64, tk, HEAD_DIM, threadIdx.x);
    load_sw<64, 256>(sv, vb, jt0 * 64, tk, HEAD_DIM, threadIdx.x);
    cp_async_commit();

    const float c = scale * LOG2E;
    const int span = span_of(window);
    const int row = iw + 16 * (t >> 5) + (lane >> 2), col = 2 * (lane & 3);   // rows row, row + 8
    float acc[HEAD_DIM / 2];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) acc[i] = 0.f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};

    for (int jt = jt0; jt <= jt1; ++jt) {
        const int buf = (jt - jt0) & 1, j0 = jt * 64;
        const half_t* ck = sk + buf * 64 * HEAD_DIM;
        const half_t* cv = sv + buf * 64 * HEAD_DIM;
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();   // tile jt is in; every warpgroup is done with the other buffer
        if (jt < jt1) {
            load_sw<64, 256>(sk + (buf ^ 1) * 64 * HEAD_DIM, kb, j0 + 64, tk, HEAD_DIM, threadIdx.x);
            load_sw<64, 256>(sv + (buf ^ 1) * 64 * HEAD_DIM, vb, j0 + 64, tk, HEAD_DIM, threadIdx.x);
        }
        cp_async_commit();
        if (jt < w0 || jt > w1) continue;   // warpgroup-uniform: no row of this warpgroup sees tile jt

        float s[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
            wgmma_ss<64>(s, kmajor(sq, 128, 64 * wg, 16 * kk), kmajor(ck, 64, 0, 16 * kk), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence<32>(s);

        // Scores in base 2, -inf where masked; s[4 n + e]: row row + 8 (e >> 1), key j0 + 8 n + col + (e & 1).
        const bool whole = all_visible(iw, 64, j0, 64, tq, tk, q_offset, window);
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float& x = s[4 * n + e];
                x *= c;
                if (!whole && !visible(row + 8 * (e >> 1), j0 + 8 * n + col + (e & 1), tq, q_offset, span))
                    x = neg_inf();
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = neg_inf();
#pragma unroll
            for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
            const float m_new = fmaxf(m[r], quad_max(mx));
            const float base = m_new == neg_inf() ? 0.f : m_new;   // fully masked so far: subtract 0
            alpha[r] = ex2(m[r] - base);
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = s[4 * n + 2 * r + e];
                    x = ex2(x - base);
                    sum += x;
                }
            l[r] = l[r] * alpha[r] + quad_sum(sum);
            m[r] = m_new;
        }
#pragma unroll
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
            acc[4 * n] *= alpha[0]; acc[4 * n + 1] *= alpha[0];
            acc[4 * n + 2] *= alpha[1]; acc[4 * n + 3] *= alpha[1];
        }
        unsigned pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) a_regs(pa[kk], s, kk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_rs<HEAD_DIM>(acc, pa[kk], mnmajor(cv, 64, 16 * kk), 1);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence<HEAD_DIM / 2>(acc);
    }
    cp_async_wait<0>();
    if (iw >= tq) return;   // no rows: nothing to write

    // O = acc / l, staged in this warpgroup's rows of the Q tile (only it reads them); L = (m + log2 l) ln 2.
    if ((lane & 3) == 0)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (row + 8 * r < tq) lse[qrow0 + row + 8 * r] = (m[r] + log2f(l[r])) * LN2;
    stage_sw<HEAD_DIM>(sq, 128, 64 * wg, acc, 1.f / l[0], 1.f / l[1], t);
    bar_sync(1 + wg, 128);
    store_sw(o + o_head(b, h, hq, tq, ohs) + (size_t)iw * ots, sq, 128, 64 * wg, min(64, tq - iw), ots, t);
}

// ----- backward: dQ ---------------------------------------------------------------------------
// Grid (Hq, B, query tiles of 128). Shared: Q, dO (128 rows), K (64 rows) twice, V (64 rows) once.
// Per key tile seen by its rows, a warpgroup computes S and dP (32 SS k-steps in one group),
// P = exp2(S c - L log2 e) (0 where masked), dS = P (dP - Drow) scale, dQ += dS K (4 RS k-steps).
// Two barriers a step: after the first tile j's K and V are in (and K of j - 1 is free: K(j + 1)
// is copied), after the second every warpgroup is done with V(j) (V(j + 1) is copied).
extern "C" __global__ void __launch_bounds__(256, 1)
flash_bwd_dq_sm90(const half_t* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ v,
                  const half_t* __restrict__ gy, const float* __restrict__ lse, const float* __restrict__ drow,
                  half_t* __restrict__ dq, int hq, int hkv, int tq, int tk, int q_offset, int window, float scale,
                  int ohs, int ots) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sq = (half_t*)align1024(smem);
    half_t* sdo = sq + 128 * HEAD_DIM;
    half_t* sk = sdo + 128 * HEAD_DIM;    // [2][64][HEAD_DIM]
    half_t* sv = sk + 2 * 64 * HEAD_DIM;  // [64][HEAD_DIM]
    const int h = blockIdx.x, b = blockIdx.y, tile = gridDim.z - 1 - blockIdx.z;
    const int wg = warpgroup(), t = threadIdx.x & 127, lane = threadIdx.x & 31;
    const int i0 = tile * 128, iw = i0 + 64 * wg;
    const size_t qrow0 = (size_t)(b * hq + h) * tq;
    const size_t krow0 = (size_t)(b * hkv + h / (hq / hkv)) * tk;
    const half_t* kb = k + krow0 * HEAD_DIM;
    const half_t* vb = v + krow0 * HEAD_DIM;
    int a0, a1, w0, w1;
    key_range(i0, tq, q_offset, window, 64, &a0, &a1);
    key_range(i0 + 64, tq, q_offset, window, 64, &w0, &w1);
    const int jt0 = a0, jt1 = max(a1, w1);
    if (wg == 0) { w0 = a0; w1 = a1; }

    load_sw<128, 256>(sq, q + qrow0 * HEAD_DIM, i0, tq, HEAD_DIM, threadIdx.x);
    load_sw<128, 256>(sdo, gy + o_head(b, h, hq, tq, ohs), i0, tq, ots, threadIdx.x);
    load_sw<64, 256>(sk, kb, jt0 * 64, tk, HEAD_DIM, threadIdx.x);
    load_sw<64, 256>(sv, vb, jt0 * 64, tk, HEAD_DIM, threadIdx.x);
    cp_async_commit();

    const float c = scale * LOG2E;
    const int span = span_of(window);
    const int row = iw + 16 * (t >> 5) + (lane >> 2), col = 2 * (lane & 3);
    float l2[2], dr[2];   // L log2 e and Drow of rows row, row + 8 (0 past tq: those P are 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool in = row + 8 * r < tq;
        l2[r] = in ? lse[qrow0 + row + 8 * r] * LOG2E : 0.f;
        dr[r] = in ? drow[qrow0 + row + 8 * r] : 0.f;
    }
    float acc[HEAD_DIM / 2];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) acc[i] = 0.f;

    for (int jt = jt0; jt <= jt1; ++jt) {
        const int buf = (jt - jt0) & 1, j0 = jt * 64;
        const half_t* ck = sk + buf * 64 * HEAD_DIM;
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();   // K and V of tile jt are in; K of jt - 1 is read by no one any more
        if (jt < jt1) load_sw<64, 256>(sk + (buf ^ 1) * 64 * HEAD_DIM, kb, j0 + 64, tk, HEAD_DIM, threadIdx.x);
        cp_async_commit();
        const bool cur = jt >= w0 && jt <= w1;   // warpgroup-uniform: its rows see tile jt
        float p[32], dp[32];
        if (cur) {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
                wgmma_ss<64>(dp, kmajor(sdo, 128, 64 * wg, 16 * kk), kmajor(sv, 64, 0, 16 * kk), kk > 0);
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
                wgmma_ss<64>(p, kmajor(sq, 128, 64 * wg, 16 * kk), kmajor(ck, 64, 0, 16 * kk), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence<32>(p);
            reg_fence<32>(dp);
        }
        __syncthreads();   // V of tile jt is read by no one any more
        if (jt < jt1) load_sw<64, 256>(sv, vb, j0 + 64, tk, HEAD_DIM, threadIdx.x);
        cp_async_commit();
        if (!cur) continue;
        const bool whole = all_visible(iw, 64, j0, 64, tq, tk, q_offset, window);
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int x = 4 * n + e;
                const float pe = whole || visible(row + 8 * (e >> 1), j0 + 8 * n + col + (e & 1), tq, q_offset, span)
                                     ? ex2(p[x] * c - l2[e >> 1]) : 0.f;
                p[x] = pe * (dp[x] - dr[e >> 1]) * scale;   // dS
            }
        unsigned da[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) a_regs(da[kk], p, kk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_rs<HEAD_DIM>(acc, da[kk], mnmajor(ck, 64, 16 * kk), 1);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence<HEAD_DIM / 2>(acc);
    }
    cp_async_wait<0>();
    if (iw >= tq) return;
    stage_sw<HEAD_DIM>(sq, 128, 64 * wg, acc, 1.f, 1.f, t);
    bar_sync(1 + wg, 128);
    store_sw(dq + (qrow0 + iw) * HEAD_DIM, sq, 128, 64 * wg, min(64, tq - iw), HEAD_DIM, t);
}

// ----- backward: dK and dV --------------------------------------------------------------------
// Grid (Hkv, B, key tiles of 64), first tiles first. Steps: (query head of the group, query tile
// of 64) pairs that see these keys, head by head; step s + 1's Q, dO, L, Drow load while step s
// runs. Per step, after one barrier (step s is in, step s - 1 is done with the other buffers):
//   both warpgroups: S^T = K Q^T (SS), P^T = exp2(S^T c - L log2 e) (0 where masked);
//   warpgroup 0: dV += P^T dO (RS);
//   warpgroup 1: with dP^T = V dO^T (SS, issued with S^T), dS^T = P^T (dP^T - Drow) scale,
//                dK += dS^T Q (RS).
// Warpgroup 1 computes P^T again instead of receiving warpgroup 0's: a fifth tile product per step
// for no exchange through shared memory and no barrier between the two warpgroups within a step,
// so each runs ahead into the other's tensor-core idle time. Each thread holds one D-wide accumulator.
__device__ __forceinline__ void probs_t(float* x, bool whole, int i0, int key, int col, int tq, int q_offset,
                                        int span, float c, const float* cl) {
    // x[4 n + e]: key key + 8 (e >> 1), query i0 + 8 n + col + (e & 1).
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int iq = 8 * n + col + (e & 1);
            float& pe = x[4 * n + e];
            pe = whole || visible(i0 + iq, key + 8 * (e >> 1), tq, q_offset, span) ? ex2(pe * c - cl[iq] * LOG2E) : 0.f;
        }
}

extern "C" __global__ void __launch_bounds__(256, 1)
flash_bwd_dkdv_sm90(const half_t* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ v,
                    const half_t* __restrict__ gy, const float* __restrict__ lse, const float* __restrict__ drow,
                    half_t* __restrict__ dk, half_t* __restrict__ dv, int hq, int hkv, int tq, int tk,
                    int q_offset, int window, float scale, int ohs, int ots) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sk = (half_t*)align1024(smem);
    half_t* sv = sk + 64 * HEAD_DIM;
    half_t* sq = sv + 64 * HEAD_DIM;            // [2][64][HEAD_DIM]
    half_t* sdo = sq + 2 * 64 * HEAD_DIM;       // [2][64][HEAD_DIM]
    float* sl = (float*)(sdo + 2 * 64 * HEAD_DIM);   // [2][64]
    float* sd = sl + 2 * 64;                    // [2][64]
    const int kvh = blockIdx.x, b = blockIdx.y, j0 = blockIdx.z * 64;
    const int wg = warpgroup(), t = threadIdx.x & 127, lane = threadIdx.x & 31;
    const int group = hq / hkv;
    const size_t krow0 = (size_t)(b * hkv + kvh) * tk;
    const int jlast = min(j0 + 64, tk) - 1;
    const int ilo = max(0, j0 - q_offset);
    const int ihi = window > 0 ? min(tq - 1, jlast + window - 1 - q_offset) : tq - 1;
    const int it0 = ilo / 64;
    const int tiles = ilo <= ihi ? ihi / 64 - it0 + 1 : 0;
    const int steps = group * tiles;

    load_sw<64, 256>(sk, k + krow0 * HEAD_DIM, j0, tk, HEAD_DIM, threadIdx.x);
    load_sw<64, 256>(sv, v + krow0 * HEAD_DIM, j0, tk, HEAD_DIM, threadIdx.x);
    auto load_step = [&](int s, int buf) {
        const int hh = kvh * group + s / tiles, i0 = (it0 + s % tiles) * 64;
        const size_t qrow0 = (size_t)(b * hq + hh) * tq;
        load_sw<64, 256>(sq + buf * 64 * HEAD_DIM, q + qrow0 * HEAD_DIM, i0, tq, HEAD_DIM, threadIdx.x);
        load_sw<64, 256>(sdo + buf * 64 * HEAD_DIM, gy + o_head(b, hh, hq, tq, ohs), i0, tq, ots, threadIdx.x);
        if (threadIdx.x < 64) {
            const bool in = i0 + (int)threadIdx.x < tq;
            const size_t r = qrow0 + (in ? i0 + threadIdx.x : 0);
            cp_async4(sl + buf * 64 + threadIdx.x, lse + r, in);
            cp_async4(sd + buf * 64 + threadIdx.x, drow + r, in);
        }
    };
    if (steps > 0) load_step(0, 0);
    cp_async_commit();

    const float c = scale * LOG2E;
    const int span = span_of(window);
    const int key = j0 + 16 * (t >> 5) + (lane >> 2), col = 2 * (lane & 3);   // keys key, key + 8
    float acc[HEAD_DIM / 2];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) acc[i] = 0.f;

    for (int s = 0; s < steps; ++s) {
        const int buf = s & 1, i0 = (it0 + s % tiles) * 64;
        const half_t* cq = sq + buf * 64 * HEAD_DIM;
        const half_t* cdo = sdo + buf * 64 * HEAD_DIM;
        const float* cl = sl + buf * 64;
        const float* cd = sd + buf * 64;
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();   // step s is in; step s - 1 is done everywhere (its buffers are free)
        if (s + 1 < steps) load_step(s + 1, buf ^ 1);
        cp_async_commit();

        const bool whole = all_visible(i0, 64, j0, 64, tq, tk, q_offset, window);
        float x[32];   // warpgroup 0: P^T; warpgroup 1: dS^T
        if (wg == 0) {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
                wgmma_ss<64>(x, kmajor(sk, 64, 0, 16 * kk), kmajor(cq, 64, 0, 16 * kk), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence<32>(x);
            probs_t(x, whole, i0, key, col, tq, q_offset, span, c, cl);
        } else {
            float p[32];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
                wgmma_ss<64>(p, kmajor(sk, 64, 0, 16 * kk), kmajor(cq, 64, 0, 16 * kk), kk > 0);
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
                wgmma_ss<64>(x, kmajor(sv, 64, 0, 16 * kk), kmajor(cdo, 64, 0, 16 * kk), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence<32>(p);
            reg_fence<32>(x);
            probs_t(p, whole, i0, key, col, tq, q_offset, span, c, cl);
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    x[4 * n + e] = p[4 * n + e] * (x[4 * n + e] - cd[8 * n + col + (e & 1)]) * scale;
        }
        unsigned xa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) a_regs(xa[kk], x, kk);
        const half_t* rb = wg == 0 ? cdo : cq;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_rs<HEAD_DIM>(acc, xa[kk], mnmajor(rb, 64, 16 * kk), 1);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence<HEAD_DIM / 2>(acc);
    }
    cp_async_wait<0>();
    __syncthreads();   // K and V are no longer read (and have landed, for steps = 0)
    half_t* out_tile = wg == 0 ? sv : sk;
    stage_sw<HEAD_DIM>(out_tile, 64, 0, acc, 1.f, 1.f, t);
    bar_sync(1 + wg, 128);
    store_sw((wg == 0 ? dv : dk) + (krow0 + j0) * HEAD_DIM, out_tile, 64, 0, min(64, tk - j0), HEAD_DIM, t);
}
"""


def supports(q, d):
    """The Hopper kernels take this head size d on the device of q: compute capability 9.0 and
    d a multiple of 64 up to 256 (flash_attention.supports has checked everything else)."""
    return d % 64 == 0 and d <= 256 and _hopper(q.device.id)


@functools.lru_cache(maxsize=None)
def _hopper(device_id):
    from .. import backend
    return int(backend.cupy.cuda.Device(device_id).compute_capability) == 90


@functools.lru_cache(maxsize=None)
def source(d):
    return f"#define HEAD_DIM {d}\n" + wgmma.source() + SOURCE


def _launch(d, name, grid, args):
    """Runs kernel `name` of the head-size-d build (tests swap in a CPU emulator here)."""
    shared = smem_bytes(d)[name]
    kernel_sm90a(source(d), name, shared)(grid, (THREADS,), args, shared_mem=shared)


def forward(q, k, v, out, lse, sizes):
    """Fills out and lse (flash_attention.forward's arrays); sizes: the kernels' integer and
    scale arguments after the arrays."""
    (b, hq, tq, d) = q.shape
    _launch(d, "flash_fwd_sm90", (hq, b, -(-tq // FWD_BQ)), (q, k, v, out, lse) + sizes)


def backward_dq(q, k, v, gy, lse, drow, gq, sizes):
    (b, hq, tq, d) = q.shape
    _launch(d, "flash_bwd_dq_sm90", (hq, b, -(-tq // DQ_BQ)), (q, k, v, gy, lse, drow, gq) + sizes)


def backward_dkdv(q, k, v, gy, lse, drow, gk, gv, sizes):
    (b, hkv, tk, d) = k.shape
    _launch(d, "flash_bwd_dkdv_sm90", (hkv, b, -(-tk // KV_BK)), (q, k, v, gy, lse, drow, gk, gv) + sizes)
