"""Gemma RMSNorm, forward and backward, for rows of up to MAX_DIM features.

x, w and y are each float16 or float32: the model normalises its float32 residual stream
straight to float16, and float16 activations, with float32 (or float16) weights. The source is
compiled once per combination, with the element types x_t, w_t and y_t defined in front of it;
gy has y's type, dx x's and dw w's. All arithmetic is float32.

Per row x of D features, with r = (mean(x^2) + eps)^(-1/2) and n = x r:

    y = n (1 + w)

Backward (derived in nn_ops/norm.py): with h = g (1 + w),

    dx = r (h - n mean(h n)),    dw = sum over rows of g n.

With a residual (float32 h of x's shape, y float32), the forward writes y = h + y16, where
y16 is the normalised row rounded to x's dtype first, and the backward rounds g to x's dtype
before using it: exactly the unfused `h + rms_norm(x, w)` of the model's residual stream (the
norm's output in the branch's float16, its gradient cast to float16 by the engine), in one
pass each way instead of three (norm, add; cast, norm backward).

Forward: one block per row; each thread keeps its columns (c = thread + j * THREADS) in
registers, so x is read once: a block sum of x^2 gives r, then y is written. r is saved
(float32, one per row) for the backward.

Backward: a grid-stride loop over rows. Each block handles rows b, b + blocks, ... ; per row
a block sum gives mean(h n), then dx is written; the dw terms g n of the block's rows are
added up in registers, column by column, and written once per block. A second small kernel
sums those (blocks, D) partial sums over blocks and writes dw in w's dtype: no atomics, and
no CuPy reduction and cast to pay for on the host (they cost more host time than the kernel).
"""
import functools

import numpy as np

from .cuda import grid_stride_blocks, kernel

THREADS = 128
COLS = 8                   # columns per thread
MAX_DIM = THREADS * COLS   # wider rows take the reference path
DW_LANES = 16              # threads down the per-block partial sums, per column of dw
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))  # of x, w and y
C_TYPES = {np.dtype(np.float16): "half_t", np.dtype(np.float32): "float"}

SOURCE = r"""
#define THREADS 128
#define COLS 8
#define DW_LANES 16

__device__ __forceinline__ float to_float(half_t v) { return h2f(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ void store(half_t* p, float v) { *p = f2h(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
// v rounded to the precision of the pointer's element type (and back to float).
__device__ __forceinline__ float round_like(const half_t*, float v) { return h2f(f2h(v)); }
__device__ __forceinline__ float round_like(const float*, float v) { return v; }

// residual: nullptr, or a float32 array of x's shape added to the row rounded to x's type.
extern "C" __global__ void rms_norm_fwd(const x_t* __restrict__ x, const w_t* __restrict__ w,
                                        y_t* __restrict__ y, float* __restrict__ rstd,
                                        int D, float eps, const float* __restrict__ residual) {
    __shared__ float sh[32];
    const size_t base = (size_t)blockIdx.x * D;
    float xs[COLS];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
        const int c = threadIdx.x + j * THREADS;
        xs[j] = c < D ? to_float(x[base + c]) : 0.f;
        ss += xs[j] * xs[j];
    }
    const float r = 1.f / sqrtf(block_sum(ss, sh) / (float)D + eps);
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
        const int c = threadIdx.x + j * THREADS;
        if (c >= D) continue;
        const float v = xs[j] * r * (1.f + to_float(w[c]));
        store(y + base + c, residual ? residual[base + c] + round_like(x, v) : v);
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

extern "C" __global__ void rms_norm_bwd(const y_t* __restrict__ gy, const x_t* __restrict__ x,
                                        const w_t* __restrict__ w, const float* __restrict__ rstd,
                                        x_t* __restrict__ gx, float* __restrict__ gw_part,
                                        long long rows, int D, int round_gy, int add_gx) {
    __shared__ float sh[32];
    float wp[COLS], acc[COLS];
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
        const int c = threadIdx.x + j * THREADS;
        wp[j] = c < D ? 1.f + to_float(w[c]) : 0.f;
        acc[j] = 0.f;
    }
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t base = (size_t)row * D;
        const float r = rstd[row];
        float n[COLS], h[COLS];
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < COLS; ++j) {
            const int c = threadIdx.x + j * THREADS;
            float g = c < D ? to_float(gy[base + c]) : 0.f;
            if (round_gy) g = round_like(x, g);  // the residual form: g as the branch's type
            n[j] = c < D ? to_float(x[base + c]) * r : 0.f;
            h[j] = g * wp[j];
            dot += h[j] * n[j];
            acc[j] += g * n[j];
        }
        const float mean = block_sum(dot, sh) / (float)D;
#pragma unroll
        for (int j = 0; j < COLS; ++j) {
            const int c = threadIdx.x + j * THREADS;
            if (c >= D) continue;
            const float v = r * (h[j] - n[j] * mean);
            // add_gx: gx holds another use's gradient; add ours rounded to x's type first, which is
            // exactly the engine's sum of the two separate gradients (__fadd_rn: never contracted
            // with v's product into an FMA, which would round differently)
            store(gx + base + c, add_gx ? __fadd_rn(to_float(gx[base + c]), round_like(x, v)) : v);
        }
    }
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
        const int c = threadIdx.x + j * THREADS;
        if (c < D) gw_part[(size_t)blockIdx.x * D + c] = acc[j];
    }
}

// dw[c] = sum over b < parts of gw_part[b][c] (add_dw: dw[c] += that sum, rounded to w's type
// first). A block of (32, DW_LANES) threads takes 32 columns: each of the DW_LANES lanes of a
// column adds the parts lane, lane + DW_LANES, ... (a warp reads 32 adjacent floats of one
// part), then lane 0 adds the lanes' sums.
extern "C" __global__ void rms_norm_dw(const float* __restrict__ gw_part, w_t* __restrict__ dw,
                                       int parts, int D, int add_dw) {
    __shared__ float sh[DW_LANES][32];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < D)
        for (int b = threadIdx.y; b < parts; b += DW_LANES) s += gw_part[(size_t)b * D + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < D) {
        for (int k = 1; k < DW_LANES; ++k) s += sh[k][threadIdx.x];
        store(dw + c, add_dw ? __fadd_rn(to_float(dw[c]), round_like(dw, s)) : s);
    }
}
"""


@functools.lru_cache(maxsize=None)
def typed_source(x_dtype, w_dtype, y_dtype):
    """SOURCE for one combination of element types (the same string object on every call)."""
    types = zip(("x_t", "w_t", "y_t"), (x_dtype, w_dtype, y_dtype))
    return "".join(f"typedef {C_TYPES[np.dtype(d)]} {name};\n" for name, d in types) + SOURCE


def supports(x, out_dtype):
    """Rows the kernels handle, written in a dtype they write (x's and w's are checked by use_fast)."""
    return 0 < x.shape[-1] <= MAX_DIM and np.dtype(out_dtype) in DTYPES


def forward(x, w, eps, out_dtype, residual=None):
    """y (x's shape, out_dtype) and r (float32, one per row) for CuPy x (..., D) and w (D,);
    with a float32 residual of x's shape, y = residual + the row rounded to x's dtype (float32)."""
    import cupy
    x = cupy.ascontiguousarray(x)
    d = x.shape[-1]
    rows = x.size // d
    if residual is not None:
        if residual.dtype != np.float32 or residual.shape != x.shape or np.dtype(out_dtype) != np.float32:
            raise ValueError("rmsnorm.forward: the residual and y must be float32 arrays of x's shape")
        residual = cupy.ascontiguousarray(residual)
    y = cupy.empty(x.shape, out_dtype)
    rstd = cupy.empty(rows, np.float32)
    if rows:
        kernel(typed_source(x.dtype, w.dtype, y.dtype), "rms_norm_fwd")(
            (rows,), (THREADS,), (x, cupy.ascontiguousarray(w), y, rstd, np.int32(d), np.float32(eps),
                                  np.uint64(0) if residual is None else residual))
    return y, rstd


def accepts_target(target, like):
    """True when the kernels can add into `target`: a C-contiguous CuPy array of like's dtype and shape."""
    return (target is not None and type(target) is type(like) and target.dtype == like.dtype
            and target.shape == like.shape and target.flags.c_contiguous)


def backward(gy, x, w, rstd, round_gy=False, gx_into=None, dw_into=None):
    """dx (x's dtype and shape) and dw (w's dtype, (D,)) from gy (y's dtype) and the forward's x, w, r;
    round_gy: round gy to x's dtype first (the residual form's backward). gx_into / dw_into: arrays
    that `accepts_target` took, which dx / dw are added into (and returned) instead of new arrays."""
    import cupy
    gy, x, w = cupy.ascontiguousarray(gy), cupy.ascontiguousarray(x), cupy.ascontiguousarray(w)
    d = x.shape[-1]
    rows = x.size // d
    gx = cupy.empty_like(x) if gx_into is None else gx_into
    if not rows:
        return gx, cupy.zeros(d, w.dtype) if dw_into is None else dw_into
    source = typed_source(x.dtype, w.dtype, gy.dtype)
    blocks = grid_stride_blocks(rows, 1, per_sm=8)
    part = cupy.empty((blocks, d), np.float32)
    kernel(source, "rms_norm_bwd")((blocks,), (THREADS,), (gy, x, w, rstd, gx, part, np.int64(rows), np.int32(d),
                                                          np.int32(round_gy), np.int32(gx_into is not None)))
    return gx, sum_partials(source, part, w.dtype, dw_into)


def sum_partials(source, part, w_dtype, into=None):
    """dw (D,), in w_dtype: per-block partial sums (blocks, D) added up over blocks by the
    rms_norm_dw kernel of `source` (a typed_source, or one that starts with it); with `into`
    (a contiguous (D,) array of w_dtype) the sum is added into it instead."""
    import cupy
    blocks, d = part.shape
    dw = cupy.empty(d, w_dtype) if into is None else into
    kernel(source, "rms_norm_dw")((-(-d // 32),), (32, DW_LANES), (part, dw, np.int32(blocks), np.int32(d),
                                                                   np.int32(into is not None)))
    return dw


# ----- NumPy reference: the same steps, float32 math, rounded to the same dtypes at the same points
# (dw's float32 sum over rows runs in another order than the kernels' per block, then over blocks)

def reference_forward(x, w, eps, out_dtype):
    xf = x.astype(np.float32).reshape(-1, x.shape[-1])
    r = (1 / np.sqrt((xf * xf).mean(axis=-1) + np.float32(eps))).astype(np.float32)
    y = xf * r[:, None] * (1 + w.astype(np.float32))
    return y.astype(out_dtype).reshape(x.shape), r


def reference_backward(gy, x, w, rstd):
    d = x.shape[-1]
    g = gy.astype(np.float32).reshape(-1, d)
    n = x.astype(np.float32).reshape(-1, d) * rstd[:, None]
    h = g * (1 + w.astype(np.float32))
    gx = rstd[:, None] * (h - n * (h * n).mean(axis=-1, keepdims=True))
    return gx.astype(x.dtype).reshape(x.shape), (g * n).sum(axis=0).astype(w.dtype)
