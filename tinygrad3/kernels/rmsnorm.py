"""Gemma RMSNorm, forward and backward, for rows of up to MAX_DIM features.

x, w and y are each float16 or float32: the model normalises its float32 residual stream
straight to float16, and float16 activations, with float32 (or float16) weights. The source is
compiled once per combination, with the element types x_t, w_t and y_t defined in front of it;
gy has y's type, dx x's and dw w's. All arithmetic is float32.

Per row x of D features, with r = (mean(x^2) + eps)^(-1/2) and n = x r:

    y = n (1 + w)

Backward (derived in nn_ops/rmsnorm.py): with h = g (1 + w),

    dx = r (h - n mean(h n)),    dw = sum over rows of g n.

With a residual (float32 h of x's shape, y float32), the forward writes y = h + y16, where
y16 is the normalised row rounded to x's dtype first, and the backward rounds g to x's dtype
before using it: exactly the unfused `h + rms_norm(x, w)` of the model's residual stream (the
norm's output in the branch's float16, its gradient cast to float16 by the engine), in one
pass each way instead of three (norm, add; cast, norm backward).

Both directions are memory-bound (per row of 640 features the backward reads gy and x and
writes dx, 6 to 12 bytes per feature), so what counts is bytes in flight per SM.

Vector kernels (rms_norm_{fwd,bwd}_v{G}): D a multiple of 4, every array on a 4-element boundary
-----------------------------------------------------------------------------------------------
A row belongs to one warp: lane l holds the groups of 4 columns q = l, l + 32, ... (G of them at
most, a compile-time constant: G = 5 for D = 640), each moved by one 8-byte (float16) or 16-byte
(float32) load or store, so a warp's access is a contiguous, fully used span. A lane issues all
of its row's loads (x, w and the residual; gy, x and, with add_gx, gx) before any arithmetic, and
the row's sum (of x^2; of h n) is a shuffle reduction within the warp: no shared memory and no
__syncthreads per row, so the 8 warps of a block run on their own rows. Forward: one row per warp,
8 per block. Backward: a grid-stride loop over rows by warps, the grid one wave of the blocks per
SM that its __launch_bounds__ allows (VEC_GROUPS); each lane adds its columns' g n in registers,
and at the end the block's 8 warps add theirs in shared memory one after another (deterministic),
giving one (D,) partial per block. The host picks the kernel: D % 4 == 0 and x, w, y (residual;
gy, gx) each start on a 4-element boundary (CuPy's allocations do; views at odd offsets may not).

Fallback (rms_norm_fwd, rms_norm_bwd): other D (up to MAX_DIM) or misaligned arrays. Forward: one
block per row; each thread keeps its columns (c = thread + j * THREADS) in registers, so x is read
once: a block sum of x^2 gives r, then y is written. Backward: a grid-stride loop over rows, each
block taking rows b, b + blocks, ...; per row a block sum gives mean(h n), then dx is written; the
dw terms g n of the block's rows are added up in registers, column by column, and written once per
block.

Both paths compute each element with the same float32 expressions and roundings; only the order of
the float32 sums (of x^2, h n, and dw's over rows) differs. r is saved (float32, one per row) for
the backward. A second small kernel (rms_norm_dw) sums the (blocks, D) partial sums over blocks and
writes dw in w's dtype: no atomics, and no CuPy reduction and cast to pay for on the host (they
cost more host time than the kernel). qk_norm_rope.py builds on typed_source (the fallback kernels
and rms_norm_dw); this module launches family_source (those and the vector kernels).
"""
import functools

import numpy as np

from ..backend import address, get_array_module
from ..nn_ops.rmsnorm import ResidualRMSNorm, RMSNorm
from ..tensor import ADDED
from .cuda import VECTOR_IO, grid_stride_blocks, kernel

THREADS = 128
COLS = 8                   # columns per thread
MAX_DIM = THREADS * COLS   # wider rows take the reference path
DW_LANES = 16              # threads down the per-block partial sums, per column of dw
VEC_WARPS = 8              # warps (rows at a time) per block of the vector kernels (RN_WARPS in VEC_SOURCE)
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



VEC_SOURCE = r"""
#define RN_WARPS 8

""" + VECTOR_IO + r"""

__device__ __forceinline__ float rn_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per row; lane l holds the groups of 4 columns q = l, l + 32, ..., G of them at most.
template <int G>
__device__ __forceinline__ void rn_fwd_vec(const x_t* __restrict__ x, const w_t* __restrict__ w,
                                           y_t* __restrict__ y, float* __restrict__ rstd, long long rows,
                                           int D, float eps, const float* __restrict__ residual) {
    const int lane = threadIdx.x & 31, groups = D >> 2;
    const long long row = (long long)blockIdx.x * RN_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp: the shuffles below have all 32 lanes
    const size_t base = (size_t)row * D;
    float xs[G][4], ws[G][4], hs[G][4];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < G; ++k) {  // every load of the row first
        const int q = lane + 32 * k;
        if (q < groups) {
            load4(x + base + 4 * q, xs[k]);
            load4(w + 4 * q, ws[k]);
            if (residual) load4(residual + base + 4 * q, hs[k]);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) xs[k][e] = 0.f;
        }
    }
#pragma unroll
    for (int k = 0; k < G; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) ss += xs[k][e] * xs[k][e];
    const float r = 1.f / sqrtf(rn_warp_sum(ss) / (float)D + eps);
#pragma unroll
    for (int k = 0; k < G; ++k) {
        const int q = lane + 32 * k;
        if (q < groups) {
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                v[e] = xs[k][e] * r * (1.f + ws[k][e]);
                if (residual) v[e] = hs[k][e] + round_like(x, v[e]);
            }
            store4(y + base + 4 * q, v);
        }
    }
    if (lane == 0) rstd[row] = r;
}

// A grid-stride loop over rows by warps (RN_WARPS rows per block and step); dw's terms in registers,
// then the block's warps added in shared memory in order (deterministic), one (D,) partial per block.
template <int G>
__device__ __forceinline__ void rn_bwd_vec(const y_t* __restrict__ gy, const x_t* __restrict__ x,
                                           const w_t* __restrict__ w, const float* __restrict__ rstd,
                                           x_t* __restrict__ gx, float* __restrict__ gw_part,
                                           long long rows, int D, int round_gy, int add_gx) {
    __shared__ float shw[THREADS * COLS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, groups = D >> 2;
    float acc[G][4];
#pragma unroll
    for (int k = 0; k < G; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[k][e] = 0.f;
    for (long long row = (long long)blockIdx.x * RN_WARPS + warp; row < rows; row += (long long)gridDim.x * RN_WARPS) {
        const size_t base = (size_t)row * D;
        const float r = rstd[row];
        float n[G][4], h[G][4], old[G][4];
#pragma unroll
        for (int k = 0; k < G; ++k) {  // every load of the row first
            const int q = lane + 32 * k;
            if (q < groups) {
                load4(gy + base + 4 * q, h[k]);
                load4(x + base + 4 * q, n[k]);
                if (add_gx) load4(gx + base + 4 * q, old[k]);
            }
        }
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < G; ++k) {
            const int q = lane + 32 * k;
            if (q < groups) {
                float wv[4];
                load4(w + 4 * q, wv);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float g = h[k][e];
                    if (round_gy) g = round_like(x, g);  // the residual form: g as the branch's type
                    n[k][e] *= r;
                    h[k][e] = g * (1.f + wv[e]);
                    dot += h[k][e] * n[k][e];
                    acc[k][e] += g * n[k][e];
                }
            }
        }
        const float mean = rn_warp_sum(dot) / (float)D;
#pragma unroll
        for (int k = 0; k < G; ++k) {
            const int q = lane + 32 * k;
            if (q < groups) {
                float v[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    v[e] = r * (h[k][e] - n[k][e] * mean);
                    // add_gx: as the scalar kernel, ours rounded to x's type, then added (no FMA)
                    if (add_gx) v[e] = __fadd_rn(old[k][e], round_like(x, v[e]));
                }
                store4(gx + base + 4 * q, v);
            }
        }
    }
    for (int u = 0; u < RN_WARPS; ++u) {
        if (warp == u) {
#pragma unroll
            for (int k = 0; k < G; ++k) {
                const int q = lane + 32 * k;
                if (q < groups)
#pragma unroll
                    for (int e = 0; e < 4; ++e) shw[4 * q + e] = (u ? shw[4 * q + e] : 0.f) + acc[k][e];
            }
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < D; c += blockDim.x) gw_part[(size_t)blockIdx.x * D + c] = shw[c];
}
"""

# G (groups of 4 columns per lane, at most) of the compiled vector kernels -> blocks of RN_WARPS warps
# per SM that the backward must fit (its __launch_bounds__ and its grid: one wave)
VEC_GROUPS = {1: 6, 2: 4, 4: 2, 5: 2, 8: 1}

VEC_ENTRY = r"""
extern "C" __global__ void __launch_bounds__(RN_WARPS * 32) rms_norm_fwd_v{G}(
        const x_t* __restrict__ x, const w_t* __restrict__ w, y_t* __restrict__ y, float* __restrict__ rstd,
        long long rows, int D, float eps, const float* __restrict__ residual) {{
    rn_fwd_vec<{G}>(x, w, y, rstd, rows, D, eps, residual);
}}

extern "C" __global__ void __launch_bounds__(RN_WARPS * 32, {BLOCKS}) rms_norm_bwd_v{G}(
        const y_t* __restrict__ gy, const x_t* __restrict__ x, const w_t* __restrict__ w,
        const float* __restrict__ rstd, x_t* __restrict__ gx, float* __restrict__ gw_part,
        long long rows, int D, int round_gy, int add_gx) {{
    rn_bwd_vec<{G}>(gy, x, w, rstd, gx, gw_part, rows, D, round_gy, add_gx);
}}
"""


@functools.lru_cache(maxsize=None)
def typed_source(x_dtype, w_dtype, y_dtype):
    """SOURCE (the per-row block kernels and rms_norm_dw) for one combination of element types (the
    same string object on every call); qk_norm_rope.py builds on it."""
    types = zip(("x_t", "w_t", "y_t"), (x_dtype, w_dtype, y_dtype))
    return "".join(f"typedef {C_TYPES[np.dtype(d)]} {name};\n" for name, d in types) + SOURCE


@functools.lru_cache(maxsize=None)
def family_source(x_dtype, w_dtype, y_dtype):
    """typed_source followed by VEC_SOURCE and the vector kernels' entry points: what this module launches."""
    entries = "".join(VEC_ENTRY.format(G=g, BLOCKS=b) for g, b in VEC_GROUPS.items())
    return typed_source(x_dtype, w_dtype, y_dtype) + VEC_SOURCE + entries


def supports(x, out_dtype):
    """Rows the kernels handle, written in a dtype they write (x's and w's are checked by use_fast)."""
    return 0 < x.shape[-1] <= MAX_DIM and np.dtype(out_dtype) in DTYPES


def vector_groups(d):
    """G of the vector kernels for rows of d features (the smallest compiled G with 32 G groups of 4
    columns >= d), or None when d is not a multiple of 4 (or too wide)."""
    if d % 4 or not 0 < d <= MAX_DIM:
        return None
    return min(g for g in VEC_GROUPS if 128 * g >= d)


def vector_ok(*arrays):
    """The vector kernels' alignment: each array (None: absent) starts on a 4-element boundary (8 bytes
    for float16, 16 for float32); with D % 4 == 0 so does every row."""
    return all(a is None or address(a) % (4 * a.itemsize) == 0 for a in arrays)


# ----- launching: through these names, which tests/test_vector_kernels_emulated.py replaces to run the same
# host code with NumPy arrays on the CPU emulator

def _launch(source, name, grid, block, args):
    kernel(source, name)(grid, block, args)


def _blocks(rows, rows_per_block, per_sm):
    return grid_stride_blocks(rows, rows_per_block, per_sm=per_sm)



def forward(x, w, eps, out_dtype, residual=None):
    """y (x's shape, out_dtype) and r (float32, one per row) for CuPy x (..., D) and w (D,);
    with a float32 residual of x's shape, y = residual + the row rounded to x's dtype (float32)."""
    xp = get_array_module(x)
    x, w = xp.ascontiguousarray(x), xp.ascontiguousarray(w)
    d = x.shape[-1]
    rows = x.size // d
    if residual is not None:
        if residual.dtype != np.float32 or residual.shape != x.shape or np.dtype(out_dtype) != np.float32:
            raise ValueError("rmsnorm.forward: the residual and y must be float32 arrays of x's shape")
        residual = xp.ascontiguousarray(residual)
    y = xp.empty(x.shape, out_dtype)
    rstd = xp.empty(rows, np.float32)
    if rows:
        source = family_source(x.dtype, w.dtype, y.dtype)
        res = np.uint64(0) if residual is None else residual
        g = vector_groups(d)
        if g and vector_ok(x, w, y, residual):  # a warp per row, 8 rows per block
            _launch(source, f"rms_norm_fwd_v{g}", (-(-rows // VEC_WARPS),), (VEC_WARPS * 32,),
                    (x, w, y, rstd, np.int64(rows), np.int32(d), np.float32(eps), res))
        else:
            _launch(source, "rms_norm_fwd", (rows,), (THREADS,), (x, w, y, rstd, np.int32(d), np.float32(eps), res))
    return y, rstd


def accepts_target(target, like):
    """True when the kernels can add into `target`: a C-contiguous CuPy array of like's dtype and shape."""
    return (target is not None and type(target) is type(like) and target.dtype == like.dtype
            and target.shape == like.shape and target.flags.c_contiguous)


def backward(gy, x, w, rstd, round_gy=False, gx_into=None, dw_into=None):
    """dx (x's dtype and shape) and dw (w's dtype, (D,)) from gy (y's dtype) and the forward's x, w, r;
    round_gy: round gy to x's dtype first (the residual form's backward). gx_into / dw_into: arrays
    that `accepts_target` took, which dx / dw are added into (and returned) instead of new arrays."""
    xp = get_array_module(x)
    gy, x, w = xp.ascontiguousarray(gy), xp.ascontiguousarray(x), xp.ascontiguousarray(w)
    d = x.shape[-1]
    rows = x.size // d
    gx = xp.empty_like(x) if gx_into is None else gx_into
    if not rows:
        return gx, xp.zeros(d, w.dtype) if dw_into is None else dw_into
    source = family_source(x.dtype, w.dtype, gy.dtype)
    flags = (np.int32(round_gy), np.int32(gx_into is not None))
    g = vector_groups(d)
    if g and vector_ok(gy, x, w, gx):  # a warp per row, a grid of one wave
        name, blocks, threads = f"rms_norm_bwd_v{g}", _blocks(rows, VEC_WARPS, VEC_GROUPS[g]), VEC_WARPS * 32
    else:
        name, blocks, threads = "rms_norm_bwd", _blocks(rows, 1, 8), THREADS
    part = xp.empty((blocks, d), np.float32)
    _launch(source, name, (blocks,), (threads,), (gy, x, w, rstd, gx, part, np.int64(rows), np.int32(d)) + flags)
    return gx, sum_partials(source, part, w.dtype, dw_into)


def sum_partials(source, part, w_dtype, into=None):
    """dw (D,), in w_dtype: per-block partial sums (blocks, D) added up over blocks by the
    rms_norm_dw kernel of `source` (a typed_source, or one that starts with it); with `into`
    (a contiguous (D,) array of w_dtype) the sum is added into it instead."""
    xp = get_array_module(part)
    blocks, d = part.shape
    dw = xp.empty(d, w_dtype) if into is None else into
    _launch(source, "rms_norm_dw", (-(-d // 32),), (32, DW_LANES), (part, dw, np.int32(blocks), np.int32(d),
                                                                     np.int32(into is not None)))
    return dw


# ----- the Functions of the fast path (F.rms_norm picks them for the inputs `supports` takes)

class FusedRMSNorm(RMSNorm):
    """RMSNorm (nn_ops/rmsnorm.py) by the kernels above: the same math, one pass each way."""

    def forward(self, x, w):
        self.x, self.w = x, w
        y, self.rstd = forward(x, w, self.eps, x.dtype if self.out_dtype is None else self.out_dtype)
        return y

    def backward(self, gy):
        return _backward_into_targets(self, gy, 0)


class FusedResidualRMSNorm(ResidualRMSNorm):
    """h + rms_norm(x, w) for a float32 h, one kernel each way (the residual form above)."""

    def __init__(self, eps):
        self.eps = eps

    def forward(self, h, x, w):
        self.x, self.w = x, w
        y, self.rstd = forward(x, w, self.eps, np.float32, residual=h)
        return y

    def backward(self, gy):
        gh = gy if self.needs_grad[0] else None
        if not (self.needs_grad[1] or self.needs_grad[2]):
            return gh, None, None
        return (gh,) + _backward_into_targets(self, gy, 1, round_gy=True)


def _backward_into_targets(fn, gy, first, round_gy=False):
    """(dx, dw) of the kernels for fn's inputs first (x) and first + 1 (w). Where the engine
    offers a target the kernel can write (the residual stream's gradient from its other use, a
    float32 weight-gradient buffer), the kernel adds into it and the slot says ADDED."""
    into = [fn.grad_target(first + i) if fn.needs_grad[first + i] else None for i in (0, 1)]
    into = [t if accepts_target(t, like) else None for t, like in zip(into, (fn.x, fn.w))]
    gx, gw = backward(gy, fn.x, fn.w, fn.rstd, round_gy=round_gy, gx_into=into[0], dw_into=into[1])
    return tuple(None if not fn.needs_grad[first + i] else ADDED if into[i] is not None else g
                 for i, g in enumerate((gx, gw)))


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
