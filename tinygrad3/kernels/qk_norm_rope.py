"""Attention's q/k RMSNorm, head transpose and RoPE in one kernel each way, for float16 x.

Per row x of D features (one head of one token; x is (B, T, H, D), rows in that order), with
r = (mean(x^2) + eps)^(-1/2), u = x r (1 + w) and the row's angle tables c, s (position t):

    y_i     = u_i c_i - u_{i+D/2} s_i        y_{i+D/2} = u_{i+D/2} c_i + u_i s_i

written at (b, h, t) of a (B, H, T, D) output: the three ops of the reference path (RMSNorm,
transpose, RoPE), with u kept in float32 instead of rounded to float16 in between.

Backward (derived in nn_ops/qk_norm_rope.py): g = the rotation of gy by the opposite angle
(RoPE's backward), then RMSNorm's backward of g: with h = g (1 + w) and n = x r,

    dx = r (h - n mean(h n)),    dw = sum over rows of g n.

Blocks as rmsnorm.py's (THREADS threads), but each thread holds pairs (i, i + D/2), the two
features one rotation mixes, so rows of up to MAX_DIM = 2 THREADS PAIRS features. Forward: one
block per row, r saved (float32) for the backward. Backward: a grid-stride loop over rows that
reads gy through its strides, writes dx in x's layout, and keeps per-block dw partial sums that
rmsnorm.py's rms_norm_dw kernel adds up (the source is compiled after rmsnorm's, for its helpers).
"""
import functools

import numpy as np

from . import rmsnorm, rope
from .cuda import grid_stride_blocks, kernel

THREADS = rmsnorm.THREADS
PAIRS = rmsnorm.COLS // 2          # feature pairs per thread
MAX_DIM = 2 * THREADS * PAIRS      # wider rows take the reference path
W_DTYPES = rmsnorm.DTYPES          # w float16 or float32; x, y float16

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


@functools.lru_cache(maxsize=None)
def typed_source(w_dtype):
    """rmsnorm.py's source for float16 x and y and this w, followed by SOURCE."""
    return rmsnorm.typed_source(np.float16, w_dtype, np.float16) + SOURCE


def supports(x):
    """(B, T, H, D) inputs with an even D of at most MAX_DIM (dtypes are checked by use_fast)."""
    return x.ndim == 4 and 0 < x.shape[-1] <= MAX_DIM and x.shape[-1] % 2 == 0


def forward(x, w, eps, cos, sin):
    """y (B, H, T, D) float16, C-contiguous, and r (float32, one per row of x) for float16 CuPy
    x (B, T, H, D), w (D,) and the float32 tables cos, sin (T, D) of x's positions."""
    import cupy
    x = cupy.ascontiguousarray(x)
    b, t, h, d = x.shape
    y = cupy.empty((b, h, t, d), np.float16)
    rstd = cupy.empty(b * t * h, np.float32)
    if rstd.size:
        kernel(typed_source(w.dtype), "qk_norm_rope_fwd")(
            (rstd.size,), (THREADS,), (x, cupy.ascontiguousarray(w), cupy.ascontiguousarray(cos),
                                       cupy.ascontiguousarray(sin), y, rstd, np.int32(t), np.int32(h),
                                       np.int32(d), np.float32(eps)))
    return y, rstd


def backward(gy, x, w, cos, sin, rstd):
    """dx ((B, T, H, D) float16, dense) and dw (w's dtype) from gy (B, H, T, D), any strides."""
    import cupy
    x, w = cupy.ascontiguousarray(x), cupy.ascontiguousarray(w)
    b, t, h, d = x.shape
    rows = b * t * h
    gx = cupy.empty_like(x)
    if not rows:
        return gx, cupy.zeros(d, w.dtype)
    source = typed_source(w.dtype)
    blocks = grid_stride_blocks(rows, 1, per_sm=8)
    part = cupy.empty((blocks, d), np.float32)
    strides = [np.int64(s // gy.itemsize) for s in gy.strides]
    kernel(source, "qk_norm_rope_bwd")(
        (blocks,), (THREADS,), (gy, x, w, cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin), rstd, gx, part,
                                np.int64(rows), np.int32(t), np.int32(h), np.int32(d), *strides))
    return gx, rmsnorm.sum_partials(source, part, w.dtype)


# ----- NumPy reference: rmsnorm's and rope's references, with u and g left in float32 ----------

def reference_forward(x, w, eps, cos, sin):
    u, r = rmsnorm.reference_forward(x, w, eps, np.float32)
    return rope.reference_rotate(u.transpose(0, 2, 1, 3), cos, sin, 1.0).astype(np.float16), r


def reference_backward(gy, x, w, cos, sin, rstd):
    g = rope.reference_rotate(gy, cos, sin, -1.0).transpose(0, 2, 1, 3)
    return rmsnorm.reference_backward(g, x, w, rstd)
