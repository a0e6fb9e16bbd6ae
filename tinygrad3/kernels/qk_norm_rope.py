"""Attention's q/k RMSNorm, head transpose and RoPE in one kernel each way, for float16 x.

Per row x of D features (one head of one token; x is (B, T, H, D), rows in that order), with
r = (mean(x^2) + eps)^(-1/2), u = x r (1 + w) and the row's angle tables c, s (position t):

    y_i     = u_i c_i - u_{i+D/2} s_i        y_{i+D/2} = u_{i+D/2} c_i + u_i s_i

written at (b, h, t) of a (B, H, T, D) output: the three ops of the reference path (RMSNorm,
transpose, RoPE), with u kept in float32 instead of rounded to float16 in between.

Backward (derived in QKNormRoPE.backward below): g = the rotation of gy by the opposite angle
(RoPE's backward), then RMSNorm's backward of g: with h = g (1 + w) and n = x r,

    dx = r (h - n mean(h n)),    dw = sum over rows of g n.

Vector kernels (qk_norm_rope_{fwd,bwd}_v{1,2,4}): rows of D = 8k features
---------------------------------------------------------------------------
Both kernels are memory-bound: per row the backward reads gy and x and writes dx (3 x 2D
bytes), the forward reads x and writes y; the cos/sin tables are shared by the H rows of a
position and by the batch, so they come from L2. What limits such a kernel is how many bytes
each SM has requested and not yet received. A layout with one block per row, 2-byte loads and
a block-wide sum (two __syncthreads) per row keeps few requests open: every warp of the block
waits at the barriers for the slowest one, between rows nothing is loaded.

Here a row belongs to a "segment" of L lanes of one warp (L = 32 for D >= 256, fewer for
narrow rows, so one warp takes 32 / L rows at a time). Features are taken in groups of four
pairs: group q is the features 4q..4q+3 of the first half and their partners 4q..4q+3 + D/2
of the second (the two features one rotation mixes), D/8 groups per row. Lane l of a segment
holds the groups l, l + L, ..., G groups at most (G = 1, 2 or 4 by D, a compile-time
constant, so everything stays in registers). A group is two 8-byte loads of x (uint2: four
float16), two of gy, one float4 of cos and of sin, and two 8-byte stores: a warp's request is
a contiguous, fully used 256-byte (or 512-byte for the tables) span, and a lane has all of a
row's loads in flight at once. The row's sums (of x^2; of h n) are a shuffle reduction within
the segment: no shared memory, no __syncthreads in the row loop, so each of a block's 8 warps
runs ahead on its own rows. Both kernels loop over rows (grid stride by warps, the trip count
the same for all segments of a warp, so every shuffle has all 32 lanes), with (1 + w) loaded
into registers once per thread instead of once per row. A row's position (b, t, h) comes from two
32-bit divisions (QKPos; the vector kernels take fewer than 2^31 rows): the 64-bit divisions and
remainders of the plain formula were more instructions than the row's own arithmetic.

For D = 256 (the 270M model): L = 32, G = 1, one row per warp and iteration, 64 bytes of
loads in flight per lane for the backward (2 KB per warp).

The backward's dw: each lane adds its groups' g n over its rows in registers; at the end the
segments of a warp are added by shuffles and the 8 warps of a block one after another in
shared memory (8 barriers, once per block, always in the same order, so dw is deterministic),
giving one (D,) partial sum per block, which rmsnorm.py's rms_norm_dw kernel adds up (this
source is compiled after rmsnorm's, for that kernel and its helpers). Each vector kernel
declares (__launch_bounds__) how many of its blocks an SM must hold, which caps its registers,
and its grid is that many blocks per SM (GROUPS_PER_LANE): one wave, and for D = 256 (4 blocks
per SM) about half a MB of partials against the ~100 MB the rows of a training step move.

gy is (B, H, T, D) through strides gs0..gs3 (attention's backward may hand a transposed
view): its vector loads are used when gs3 == 1 and every row start is 8-byte aligned
(gy_vec = 1, decided on the host); otherwise the same kernel reads gy element by element.

Fallback: the per-row block kernels qk_norm_rope_fwd/bwd
---------------------------------------------------------
D not a multiple of 8 (D even, up to MAX_DIM), or x not 8-byte aligned, or cos/sin not
16-byte aligned (a slice of a larger buffer at an odd offset), takes the first design: blocks
as rmsnorm.py's (THREADS threads), each thread holding pairs (i, i + D/2), rows of up to
MAX_DIM = 2 THREADS PAIRS features. Forward: one block per row. Backward: a grid-stride loop
over rows with a block sum per row and per-block dw partial sums, as above.
r is saved (float32, one per row) by either forward for the backward.
"""
import functools

import numpy as np

from . import rmsnorm, rope
from ..backend import address, get_array_module
from ..nn_ops.rope import rope_tables
from ..tensor import ADDED, Function
from .cuda import VECTOR_IO, grid_stride_blocks, kernel

THREADS = rmsnorm.THREADS
PAIRS = rmsnorm.COLS // 2          # feature pairs per thread
MAX_DIM = 2 * THREADS * PAIRS      # wider rows take the reference path
W_DTYPES = rmsnorm.DTYPES          # w float16 or float32; x, y float16
VEC_WARPS = 8                      # warps per block of the vector kernels (QK_WARPS in VEC_SOURCE)

SOURCE = r"""
#define PAIRS (COLS / 2)

extern "C" __global__ void qk_norm_rope_fwd(const x_t* __restrict__ x, const w_t* __restrict__ w,
                                            const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                            y_t* __restrict__ y, float* __restrict__ rstd,
                                            int T, int H, int D, float eps) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const int h = (int)(row % H), t = (int)((row / H) % T);
    const long long b = row / ((long long)H * T);
    const int half_d = D / 2;
    const size_t in = (size_t)row * D, out = ((size_t)(b * H + h) * T + t) * D;
    float lo[PAIRS], hi[PAIRS];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < PAIRS; ++j) {
        const int i = threadIdx.x + j * THREADS;
        lo[j] = i < half_d ? to_float(x[in + i]) : 0.f;
        hi[j] = i < half_d ? to_float(x[in + i + half_d]) : 0.f;
        ss += lo[j] * lo[j] + hi[j] * hi[j];
    }
    const float r = 1.f / sqrtf(block_sum(ss, sh) / (float)D + eps);
#pragma unroll
    for (int j = 0; j < PAIRS; ++j) {
        const int i = threadIdx.x + j * THREADS;
        if (i < half_d) {
            const float a = lo[j] * r * (1.f + to_float(w[i])), z = hi[j] * r * (1.f + to_float(w[i + half_d]));
            const float c = cos_t[(size_t)t * D + i], s = sin_t[(size_t)t * D + i];
            store(y + out + i, a * c - z * s);
            store(y + out + i + half_d, z * c + a * s);
        }
    }
    if (threadIdx.x == 0) rstd[row] = r;
}

// gy (B, H, T, D) through its strides gs0..gs3; gx (B, T, H, D) dense like x.
extern "C" __global__ void qk_norm_rope_bwd(const y_t* __restrict__ gy, const x_t* __restrict__ x,
                                            const w_t* __restrict__ w, const float* __restrict__ cos_t,
                                            const float* __restrict__ sin_t, const float* __restrict__ rstd,
                                            x_t* __restrict__ gx, float* __restrict__ gw_part,
                                            long long rows, int T, int H, int D,
                                            long long gs0, long long gs1, long long gs2, long long gs3) {
    __shared__ float sh[32];
    const int half_d = D / 2;
    float wlo[PAIRS], whi[PAIRS], acc_lo[PAIRS], acc_hi[PAIRS];
#pragma unroll
    for (int j = 0; j < PAIRS; ++j) {
        const int i = threadIdx.x + j * THREADS;
        wlo[j] = i < half_d ? 1.f + to_float(w[i]) : 0.f;
        whi[j] = i < half_d ? 1.f + to_float(w[i + half_d]) : 0.f;
        acc_lo[j] = acc_hi[j] = 0.f;
    }
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const int h = (int)(row % H), t = (int)((row / H) % T);
        const long long b = row / ((long long)H * T);
        const size_t in = (size_t)row * D;
        const long long go = b * gs0 + h * gs1 + t * gs2;
        const float r = rstd[row];
        float nlo[PAIRS], nhi[PAIRS], hlo[PAIRS], hhi[PAIRS];
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < PAIRS; ++j) {
            const int i = threadIdx.x + j * THREADS;
            const bool on = i < half_d;
            const float c = on ? cos_t[(size_t)t * D + i] : 0.f, s = on ? sin_t[(size_t)t * D + i] : 0.f;
            const float ylo = on ? to_float(gy[go + i * gs3]) : 0.f;
            const float yhi = on ? to_float(gy[go + (i + half_d) * gs3]) : 0.f;
            const float glo = ylo * c + yhi * s, ghi = yhi * c - ylo * s;  // rotation by -angle
            nlo[j] = on ? to_float(x[in + i]) * r : 0.f;
            nhi[j] = on ? to_float(x[in + i + half_d]) * r : 0.f;
            hlo[j] = glo * wlo[j];
            hhi[j] = ghi * whi[j];
            dot += hlo[j] * nlo[j] + hhi[j] * nhi[j];
            acc_lo[j] += glo * nlo[j];
            acc_hi[j] += ghi * nhi[j];
        }
        const float mean = block_sum(dot, sh) / (float)D;
#pragma unroll
        for (int j = 0; j < PAIRS; ++j) {
            const int i = threadIdx.x + j * THREADS;
            if (i < half_d) {
                store(gx + in + i, r * (hlo[j] - nlo[j] * mean));
                store(gx + in + i + half_d, r * (hhi[j] - nhi[j] * mean));
            }
        }
    }
#pragma unroll
    for (int j = 0; j < PAIRS; ++j) {
        const int i = threadIdx.x + j * THREADS;
        if (i < half_d) {
            gw_part[(size_t)blockIdx.x * D + i] = acc_lo[j];
            gw_part[(size_t)blockIdx.x * D + i + half_d] = acc_hi[j];
        }
    }
}
"""


VEC_SOURCE = r"""
#define QK_WARPS 8
#define QK_MAX_DIM (2 * THREADS * PAIRS)

""" + VECTOR_IO + r"""
// Sum over the `lanes` lanes (a power of two) of an aligned segment of the warp; all 32 lanes call it.
__device__ __forceinline__ float segment_sum(float v, int lanes) {
    for (int o = lanes >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Where a lane's rows are: segment `seg` of the block (lanes threads each), rows seg0 + k stride + (segment
// within the warp); the loop runs on the row of the warp's first segment, so all lanes of a warp iterate alike.
struct QKRows {
    int lanes, sub, in_warp;
    long long first, stride;
    __device__ __forceinline__ QKRows(int lanes_) : lanes(lanes_) {
        const int per_warp = 32 / lanes, lane = threadIdx.x & 31;
        sub = lane & (lanes - 1);
        in_warp = lane / lanes;
        first = ((long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * per_warp;
        stride = (long long)gridDim.x * (blockDim.x >> 5) * per_warp;
    }
};

// (b, t, h) of row (b T + t) H + h by two 32-bit divisions (the vector kernels take fewer than 2^31 rows):
// the 64-bit divisions and remainders of the plain formula cost more instructions than the row's arithmetic.
struct QKPos {
    int b, t, h;
    __device__ __forceinline__ QKPos(long long row, int T, int H) {
        const unsigned r = (unsigned)row, bt = r / (unsigned)H, bb = bt / (unsigned)T;
        h = (int)(r - bt * (unsigned)H);
        t = (int)(bt - bb * (unsigned)T);
        b = (int)bb;
    }
};

template <int G>
__device__ __forceinline__ void qk_fwd_vec(const x_t* __restrict__ x, const w_t* __restrict__ w,
                                           const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                           y_t* __restrict__ y, float* __restrict__ rstd,
                                           long long rows, int T, int H, int D, float eps, int lanes) {
    const QKRows at(lanes);
    const int half_d = D >> 1, groups = D >> 3;
    float wlo[G][4], whi[G][4];
#pragma unroll
    for (int k = 0; k < G; ++k) {
        const int q = at.sub + k * lanes;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            wlo[k][e] = q < groups ? 1.f + to_float(w[4 * q + e]) : 0.f;
            whi[k][e] = q < groups ? 1.f + to_float(w[half_d + 4 * q + e]) : 0.f;
        }
    }
    for (long long r0 = at.first; r0 < rows; r0 += at.stride) {
        const long long row = r0 + at.in_warp;
        const bool live = row < rows;
        const QKPos p(live ? row : 0, T, H);
        const int t = p.t;
        const size_t in = (size_t)(live ? row : 0) * D, out = (((size_t)p.b * H + p.h) * T + t) * D;
        float lo[G][4], hi[G][4];
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < G; ++k) {
            const int q = at.sub + k * lanes;
            if (live && q < groups) {
                load4(x + in + 4 * q, lo[k]);
                load4(x + in + half_d + 4 * q, hi[k]);
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) lo[k][e] = hi[k][e] = 0.f;
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) ss += lo[k][e] * lo[k][e] + hi[k][e] * hi[k][e];
        }
        const float r = 1.f / sqrtf(segment_sum(ss, lanes) / (float)D + eps);
#pragma unroll
        for (int k = 0; k < G; ++k) {
            const int q = at.sub + k * lanes;
            if (live && q < groups) {
                float c[4], s[4], ya[4], yb[4];
                load4(cos_t + (size_t)t * D + 4 * q, c);
                load4(sin_t + (size_t)t * D + 4 * q, s);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float a = lo[k][e] * r * wlo[k][e], z = hi[k][e] * r * whi[k][e];
                    ya[e] = a * c[e] - z * s[e];
                    yb[e] = z * c[e] + a * s[e];
                }
                store4(y + out + 4 * q, ya);
                store4(y + out + half_d + 4 * q, yb);
            }
        }
        if (live && at.sub == 0) rstd[row] = r;
    }
}

template <int G>
__device__ __forceinline__ void qk_bwd_vec(const y_t* __restrict__ gy, const x_t* __restrict__ x,
                                           const w_t* __restrict__ w, const float* __restrict__ cos_t,
                                           const float* __restrict__ sin_t, const float* __restrict__ rstd,
                                           x_t* __restrict__ gx, float* __restrict__ gw_part,
                                           long long rows, int T, int H, int D,
                                           long long gs0, long long gs1, long long gs2, long long gs3,
                                           int gy_vec, int lanes) {
    __shared__ float sh[QK_MAX_DIM];
    const QKRows at(lanes);
    const int half_d = D >> 1, groups = D >> 3;
    float wlo[G][4], whi[G][4], acc_lo[G][4], acc_hi[G][4];
#pragma unroll
    for (int k = 0; k < G; ++k) {
        const int q = at.sub + k * lanes;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            wlo[k][e] = q < groups ? 1.f + to_float(w[4 * q + e]) : 0.f;
            whi[k][e] = q < groups ? 1.f + to_float(w[half_d + 4 * q + e]) : 0.f;
            acc_lo[k][e] = acc_hi[k][e] = 0.f;
        }
    }
    for (long long r0 = at.first; r0 < rows; r0 += at.stride) {
        const long long row = r0 + at.in_warp;
        const bool live = row < rows;
        const QKPos p(live ? row : 0, T, H);
        const int t = p.t;
        const size_t in = (size_t)(live ? row : 0) * D;
        const long long go = p.b * gs0 + p.h * gs1 + t * gs2;
        const float r = live ? rstd[row] : 0.f;
        float nlo[G][4], nhi[G][4], hlo[G][4], hhi[G][4];
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < G; ++k) {
            const int q = at.sub + k * lanes;
            if (live && q < groups) {
                float c[4], s[4], ya[4], yb[4], xa[4], xb[4];
                if (gy_vec) {
                    load4(gy + go + 4 * q, ya);
                    load4(gy + go + half_d + 4 * q, yb);
                } else {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        ya[e] = to_float(gy[go + (4 * q + e) * gs3]);
                        yb[e] = to_float(gy[go + (half_d + 4 * q + e) * gs3]);
                    }
                }
                load4(x + in + 4 * q, xa);
                load4(x + in + half_d + 4 * q, xb);
                load4(cos_t + (size_t)t * D + 4 * q, c);
                load4(sin_t + (size_t)t * D + 4 * q, s);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float glo = ya[e] * c[e] + yb[e] * s[e], ghi = yb[e] * c[e] - ya[e] * s[e];  // by -angle
                    nlo[k][e] = xa[e] * r;
                    nhi[k][e] = xb[e] * r;
                    hlo[k][e] = glo * wlo[k][e];
                    hhi[k][e] = ghi * whi[k][e];
                    dot += hlo[k][e] * nlo[k][e] + hhi[k][e] * nhi[k][e];
                    acc_lo[k][e] += glo * nlo[k][e];
                    acc_hi[k][e] += ghi * nhi[k][e];
                }
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) nlo[k][e] = nhi[k][e] = hlo[k][e] = hhi[k][e] = 0.f;
            }
        }
        const float mean = segment_sum(dot, lanes) / (float)D;
#pragma unroll
        for (int k = 0; k < G; ++k) {
            const int q = at.sub + k * lanes;
            if (live && q < groups) {
                float da[4], db[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    da[e] = r * (hlo[k][e] - nlo[k][e] * mean);
                    db[e] = r * (hhi[k][e] - nhi[k][e] * mean);
                }
                store4(gx + in + 4 * q, da);
                store4(gx + in + half_d + 4 * q, db);
            }
        }
    }
    // dw: the warp's segments hold the same columns at the same sub-lane; add them, then the warps in order.
#pragma unroll
    for (int k = 0; k < G; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            for (int o = lanes; o < 32; o <<= 1) {
                acc_lo[k][e] += __shfl_xor_sync(0xffffffffu, acc_lo[k][e], o);
                acc_hi[k][e] += __shfl_xor_sync(0xffffffffu, acc_hi[k][e], o);
            }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int v = 0; v < (int)(blockDim.x >> 5); ++v) {
        if (warp == v && lane < lanes) {
#pragma unroll
            for (int k = 0; k < G; ++k) {
                const int q = at.sub + k * lanes;
                if (q < groups)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = 4 * q + e;
                        sh[i] = (v ? sh[i] : 0.f) + acc_lo[k][e];
                        sh[half_d + i] = (v ? sh[half_d + i] : 0.f) + acc_hi[k][e];
                    }
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) gw_part[(size_t)blockIdx.x * D + i] = sh[i];
}

"""

# G of the compiled vector kernels -> blocks per SM that each must fit (their __launch_bounds__, so the
# register count allows it), forward and backward: the grids are that many blocks per SM, one wave.
GROUPS_PER_LANE = {1: (6, 4), 2: (3, 2), 4: (2, 1)}

# The extern "C" entry points for one G (plain text per kernel, so each is greppable and parsable).
VEC_ENTRY = r"""
extern "C" __global__ void __launch_bounds__(QK_WARPS * 32, {FWD_BLOCKS}) qk_norm_rope_fwd_v{G}(
        const x_t* __restrict__ x, const w_t* __restrict__ w, const float* __restrict__ cos_t,
        const float* __restrict__ sin_t, y_t* __restrict__ y, float* __restrict__ rstd,
        long long rows, int T, int H, int D, float eps, int lanes) {{
    qk_fwd_vec<{G}>(x, w, cos_t, sin_t, y, rstd, rows, T, H, D, eps, lanes);
}}

extern "C" __global__ void __launch_bounds__(QK_WARPS * 32, {BWD_BLOCKS}) qk_norm_rope_bwd_v{G}(
        const y_t* __restrict__ gy, const x_t* __restrict__ x, const w_t* __restrict__ w,
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, const float* __restrict__ rstd,
        x_t* __restrict__ gx, float* __restrict__ gw_part, long long rows, int T, int H, int D,
        long long gs0, long long gs1, long long gs2, long long gs3, int gy_vec, int lanes) {{
    qk_bwd_vec<{G}>(gy, x, w, cos_t, sin_t, rstd, gx, gw_part, rows, T, H, D, gs0, gs1, gs2, gs3, gy_vec, lanes);
}}
"""


@functools.lru_cache(maxsize=None)
def typed_source(w_dtype):
    """rmsnorm.py's source for float16 x and y and this w, followed by SOURCE (the fallback kernels)
    and VEC_SOURCE with its entry points."""
    entries = "".join(VEC_ENTRY.format(G=g, FWD_BLOCKS=f, BWD_BLOCKS=b) for g, (f, b) in GROUPS_PER_LANE.items())
    return rmsnorm.typed_source(np.float16, w_dtype, np.float16) + SOURCE + VEC_SOURCE + entries


def supports(x):
    """(B, T, H, D) inputs with an even D of at most MAX_DIM (dtypes are checked by use_fast)."""
    return x.ndim == 4 and 0 < x.shape[-1] <= MAX_DIM and x.shape[-1] % 2 == 0


def vector_layout(d):
    """(G, L) of the vector kernels for rows of d features: G groups of 4 pairs per lane, L lanes
    per row (a power of two, so 32 / L rows per warp); None when d is not a multiple of 8."""
    if d % 8 or not 0 < d <= MAX_DIM:
        return None
    groups = d // 8
    if groups <= 32:
        return 1, 1 << (groups - 1).bit_length()
    return (2 if groups <= 64 else 4), 32


# ----- launching: through these three names, which tests/test_qk_norm_rope_emulated.py replaces to run
# the same host code with NumPy arrays on the CPU emulator

def _launch(source, name, blocks, threads, args):
    kernel(source, name)((blocks,), (threads,), args)


def _blocks(rows, rows_per_block, per_sm):
    return grid_stride_blocks(rows, rows_per_block, per_sm=per_sm)


def _sum_partials(source, part, w_dtype, into=None):
    return rmsnorm.sum_partials(source, part, w_dtype, into)



def _vector_ok(x, cos, sin):
    """The vector kernels' layout for x, or None: D = 8k, x 8-byte and the tables 16-byte aligned,
    fewer than 2^31 rows (their row positions are 32-bit)."""
    layout = vector_layout(x.shape[-1])
    aligned = address(x) % 8 == 0 and address(cos) % 16 == 0 and address(sin) % 16 == 0
    return layout if aligned and x.size // x.shape[-1] < 2 ** 31 else None


def forward(x, w, eps, cos, sin):
    """y (B, H, T, D) float16, C-contiguous, and r (float32, one per row of x) for float16 CuPy
    x (B, T, H, D), w (D,) and the float32 tables cos, sin (T, D) of x's positions."""
    xp = get_array_module(x)
    x, w, cos, sin = (xp.ascontiguousarray(a) for a in (x, w, cos, sin))
    b, t, h, d = x.shape
    y = xp.empty((b, h, t, d), np.float16)
    rstd = xp.empty(b * t * h, np.float32)
    if not rstd.size:
        return y, rstd
    source = typed_source(w.dtype)
    layout = _vector_ok(x, cos, sin)
    if layout:
        g, lanes = layout
        threads = VEC_WARPS * 32
        _launch(source, f"qk_norm_rope_fwd_v{g}", _blocks(rstd.size, threads // lanes, GROUPS_PER_LANE[g][0]), threads,
                (x, w, cos, sin, y, rstd, np.int64(rstd.size), np.int32(t), np.int32(h), np.int32(d),
                 np.float32(eps), np.int32(lanes)))
    else:
        _launch(source, "qk_norm_rope_fwd", rstd.size, THREADS,
                (x, w, cos, sin, y, rstd, np.int32(t), np.int32(h), np.int32(d), np.float32(eps)))
    return y, rstd


def backward(gy, x, w, cos, sin, rstd, dw_into=None):
    """dx ((B, T, H, D) float16, dense) and dw (w's dtype) from gy (B, H, T, D), any strides;
    dw_into: a contiguous (D,) array of w's dtype that dw is added into (and returned)."""
    xp = get_array_module(x)
    x, w, cos, sin = (xp.ascontiguousarray(a) for a in (x, w, cos, sin))
    b, t, h, d = x.shape
    rows = b * t * h
    gx = xp.empty_like(x)
    if not rows:
        return gx, xp.zeros(d, w.dtype) if dw_into is None else dw_into
    source = typed_source(w.dtype)
    strides = [s // gy.itemsize for s in gy.strides]
    args = (gy, x, w, cos, sin, rstd, gx)
    tail = (np.int64(rows), np.int32(t), np.int32(h), np.int32(d), *(np.int64(s) for s in strides))
    layout = _vector_ok(x, cos, sin)
    if layout:
        g, lanes = layout
        threads = VEC_WARPS * 32
        # gy's 8-byte loads: unit feature stride and every row start (b, h, t) 8-byte aligned
        gy_vec = strides[3] == 1 and address(gy) % 8 == 0 and \
            all(s % 4 == 0 for s, n in zip(strides[:3], gy.shape[:3]) if n > 1)
        blocks = _blocks(rows, threads // lanes, GROUPS_PER_LANE[g][1])
        part = xp.empty((blocks, d), np.float32)
        _launch(source, f"qk_norm_rope_bwd_v{g}", blocks, threads,
                args + (part,) + tail + (np.int32(gy_vec), np.int32(lanes)))
    else:
        blocks = _blocks(rows, 1, 8)
        part = xp.empty((blocks, d), np.float32)
        _launch(source, "qk_norm_rope_bwd", blocks, THREADS, args + (part,) + tail)
    return gx, _sum_partials(source, part, w.dtype, dw_into)


# ----- the Function of the fast path (F.qk_norm_rope picks it)

class QKNormRoPE(Function):
    """rope(rms_norm(x, w, eps).transpose(0, 2, 1, 3), base, offset) in one kernel each way.

    Only for inputs that `supports` and F.qk_norm_rope's dtype checks accept: every other input
    takes the reference path, the composition of RMSNorm, a transpose and RoPE.
    """

    def __init__(self, eps, base, offset):
        self.eps, self.base, self.offset = eps, base, offset

    def forward(self, x, w):
        t, d = x.shape[1], x.shape[3]
        cos, sin = rope_tables(d, self.base, self.offset + t, get_array_module(x))
        self.cos, self.sin = cos[self.offset:self.offset + t], sin[self.offset:self.offset + t]
        self.x, self.w = x, w
        y, self.rstd = forward(x, w, self.eps, self.cos, self.sin)
        return y

    def backward(self, gy):
        """The chain rule through the three ops, per row (one head of one token), last op first.

        RoPE: y = rotation of u by the row's angle, pairwise (u_i, u_{i+D/2}); a rotation's
        transpose is the rotation by the opposite angle, so dL/du = g, gy rotated by -angle
        (nn_ops/rope.py derives the same as g cos - rotate_half(g sin)).
        Transpose: moves rows, so g belongs to the row of x at (b, t, h) that gy's (b, h, t) came from.
        RMSNorm (derived in nn_ops/rmsnorm.py): with n = x r and h = g (1 + w),
        dL/dx = r (h - n mean(h n)) and dL/dw = sum over rows of g n.
        The kernel does both steps for a row in registers: g is never written out.
        """
        into = self.grad_target(1) if self.needs_grad[1] else None
        into = into if rmsnorm.accepts_target(into, self.w) else None  # w's float32 gradient buffer
        gx, gw = backward(gy, self.x, self.w, self.cos, self.sin, self.rstd, dw_into=into)
        return gx if self.needs_grad[0] else None, None if not self.needs_grad[1] else ADDED if into is not None else gw


# ----- NumPy reference: rmsnorm's and rope's references, with u and g left in float32 ----------

def reference_forward(x, w, eps, cos, sin):
    u, r = rmsnorm.reference_forward(x, w, eps, np.float32)
    return rope.reference_rotate(u.transpose(0, 2, 1, 3), cos, sin, 1.0).astype(np.float16), r


def reference_backward(gy, x, w, cos, sin, rstd):
    g = rope.reference_rotate(gy, cos, sin, -1.0).transpose(0, 2, 1, 3)
    return rmsnorm.reference_backward(g, x, w, rstd)
