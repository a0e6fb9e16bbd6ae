"""AdamW over flat float32 buffers in one pass: clip, decay, moments, update, float16 copy.

One launch replaces the reference path's whole-buffer passes (nn/optim.py `_update` and the
cast-copy after it). For each element i, with g = grad[i] * coef (coef is the clip factor, 1.0
when not clipping; grad is already unscaled) and t the step number:

    p = master[i] * (1 - lr wd)        only for i < num_decayed (decoupled weight decay)
    m = b1 m + (1 - b1) g              running mean of g
    v = b2 v + (1 - b2) g^2            running mean of g^2
    p = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc1 = 1 - b1^t, bc2 = 1 - b2^t
    master[i], m[i], v[i] = p, m, v;   compute[i - lo] = float16(p) for lo <= i < hi when a
                                        float16 copy of master[lo:hi] is given

Every operation is rounded as the reference path's separate passes round it: the scalar
factors are computed in float64 on the host and rounded once to float32, and each product,
sum, quotient and square root is one `__f*_rn` intrinsic, which the compiler never fuses into
an FMA; `(1 - b2) g^2` is `((1 - b2) g) g`, as the reference evaluates it left to right. So
the results are the reference path's, bit for bit where its passes round IEEE-correctly as
NumPy's do (the GPU tests allow two ulps).

Each element is read and written once: 16 bytes in, 14 out (12 without the float16 copy).
The kernel is a grid-stride loop.

Before it, the step needs the gradients unscaled (g = grad * inv_scale, in place) and their
global norm (sum of g^2, also the inf/NaN check). `unscale_sum_squares` does both in one pass
(kernel `unscale_sum_sq`): each product rounded as the separate `grad *= inv_scale` rounds it,
the squares of the unscaled values summed in float32 per thread, per block, then the per-block
sums in float64 on the host, where the value is needed anyway. One pass over the buffer instead
of two (the product, then a dot product reading the buffer again).
"""
import math
from dataclasses import dataclass

import numpy as np

from .cuda import grid_stride_blocks, kernel

THREADS = 256

SOURCE = r"""
// One pass over the buffers; WRITE_F16 also writes float16(master[lo:hi]) into compute.
template <bool WRITE_F16>
__device__ __forceinline__ void adamw_loop(
        float* __restrict__ master, float* __restrict__ m, float* __restrict__ v,
        const float* __restrict__ grad, half_t* __restrict__ compute, long long lo, long long hi,
        long long n, long long num_decayed,
        float coef, float decay, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
        float step_size, float sqrt_bc2, float eps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float g = __fmul_rn(grad[i], coef);
        float p = master[i];
        if (i < num_decayed) p = __fmul_rn(p, decay);
        const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(one_minus_beta1, g));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), sqrt_bc2), eps);
        p = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, mi), denom));
        master[i] = p;
        m[i] = mi;
        v[i] = vi;
        if (WRITE_F16 && i >= lo && i < hi) compute[i - lo] = f2h(p);
    }
}

extern "C" __global__ void adamw_step(
        float* __restrict__ master, float* __restrict__ m, float* __restrict__ v,
        const float* __restrict__ grad, long long n, long long num_decayed, float coef, float decay,
        float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float step_size,
        float sqrt_bc2, float eps) {
    adamw_loop<false>(master, m, v, grad, nullptr, 0, 0, n, num_decayed, coef, decay, beta1, one_minus_beta1,
                      beta2, one_minus_beta2, step_size, sqrt_bc2, eps);
}

// grad[i] = grad[i] * inv_scale when `unscale` (float4 at a time; the buffer is 16-byte aligned and
// n4 = n / 4 of them, the tail of n % 4 elements taken by block 0), and partial[block] = the
// block's sum of the squares of the (unscaled) values.
extern "C" __global__ void unscale_sum_sq(float* __restrict__ grad, long long n, float inv_scale, int unscale,
                                          float* __restrict__ partial) {
    __shared__ float sh[32];
    float s = 0.f;
    float4* g4 = (float4*)grad;
    const long long n4 = n / 4;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4;
         i += (long long)blockDim.x * gridDim.x) {
        float4 g = g4[i];
        if (unscale) {
            g.x = __fmul_rn(g.x, inv_scale); g.y = __fmul_rn(g.y, inv_scale);
            g.z = __fmul_rn(g.z, inv_scale); g.w = __fmul_rn(g.w, inv_scale);
            g4[i] = g;
        }
        s = __fmaf_rn(g.x, g.x, s); s = __fmaf_rn(g.y, g.y, s);
        s = __fmaf_rn(g.z, g.z, s); s = __fmaf_rn(g.w, g.w, s);
    }
    if (blockIdx.x == 0 && threadIdx.x < n - 4 * n4) {
        float g = grad[4 * n4 + threadIdx.x];
        if (unscale) { g = __fmul_rn(g, inv_scale); grad[4 * n4 + threadIdx.x] = g; }
        s = __fmaf_rn(g, g, s);
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void adamw_step_f16(
        float* __restrict__ master, float* __restrict__ m, float* __restrict__ v,
        const float* __restrict__ grad, long long n, long long num_decayed, float coef, float decay,
        float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float step_size,
        float sqrt_bc2, float eps, half_t* __restrict__ compute, long long lo, long long hi) {
    adamw_loop<true>(master, m, v, grad, compute, lo, hi, n, num_decayed, coef, decay, beta1, one_minus_beta1,
                     beta2, one_minus_beta2, step_size, sqrt_bc2, eps);
}
"""


@dataclass(frozen=True)
class Constants:
    """The step's scalar factors, computed in float64 and rounded once to float32."""
    coef: np.float32
    decay: np.float32
    beta1: np.float32
    one_minus_beta1: np.float32
    beta2: np.float32
    one_minus_beta2: np.float32
    step_size: np.float32
    sqrt_bc2: np.float32
    eps: np.float32


def constants(coef, lr, weight_decay, betas, eps, step):
    """Constants of step number `step` (1 for the first update)."""
    beta1, beta2 = betas
    values = (coef, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
              lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step), eps)
    return Constants(*(np.float32(x) for x in values))


def update(master, m, v, grad, compute, *, coef, lr, weight_decay, num_decayed, betas, eps, step,
           compute_start=0):
    """One AdamW step in place on contiguous float32 CuPy buffers of one size; `compute` (a
    float16 buffer, or None) receives float16(master[compute_start:compute_start + compute.size])."""
    n = master.size
    if not n:
        return
    c = constants(coef, lr, weight_decay, betas, eps, step)
    args = (master, m, v, grad, np.int64(n), np.int64(num_decayed), c.coef, c.decay, c.beta1,
            c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.step_size, c.sqrt_bc2, c.eps)
    name = "adamw_step" if compute is None else "adamw_step_f16"
    if compute is not None:
        if not 0 <= compute_start <= compute_start + compute.size <= n:
            raise ValueError(f"update: a float16 copy of {compute.size} from {compute_start} does not fit {n}")
        args += (compute, np.int64(compute_start), np.int64(compute_start + compute.size))
    kernel(SOURCE, name)((grid_stride_blocks(n, THREADS),), (THREADS,), args)


def unscale_sum_squares(grad, inv_scale):
    """grad *= inv_scale in place (skipped for 1.0) on a contiguous float32 CuPy buffer, and the
    sum of the squares of the result as a Python float (inf or NaN when any value is).
    Reading the sum makes the host wait for the GPU, as the step must before it decides."""
    import cupy
    n = grad.size
    if not n:
        return 0.0
    if grad.dtype != np.float32 or not grad.flags.c_contiguous or grad.data.ptr % 16:
        raise ValueError("unscale_sum_squares takes a contiguous, 16-byte aligned float32 buffer")
    blocks = grid_stride_blocks(-(-n // 4), THREADS)
    partial = cupy.empty(blocks, np.float32)
    kernel(SOURCE, "unscale_sum_sq")((blocks,), (THREADS,), (grad, np.int64(n), np.float32(inv_scale),
                                                           np.int32(inv_scale != 1.0), partial))
    return float(partial.get().astype(np.float64).sum())


# ----- NumPy reference ------------------------------------------------------------------------

def reference_unscale_sum_squares(grad, inv_scale):
    """What unscale_sum_squares computes, on a NumPy float32 buffer (in place): the product
    rounded to float32, the squares summed in float64 (the kernel's float32 partial sums differ
    from this in the last bits of the sum only)."""
    if inv_scale != 1.0:
        grad *= np.float32(inv_scale)
    return float(np.dot(grad.astype(np.float64), grad.astype(np.float64)))


def reference_update(master, m, v, grad, compute_dtype=None, *, coef, lr, weight_decay,
                     num_decayed, betas, eps, step, compute_span=slice(None)):
    """The kernel's computation on float32 NumPy arrays: new (master, m, v, compute or None),
    compute being master[compute_span] in compute_dtype."""
    c = constants(coef, lr, weight_decay, betas, eps, step)
    g = grad * c.coef
    p = master.copy()
    p[:num_decayed] *= c.decay
    m = m * c.beta1 + c.one_minus_beta1 * g
    v = v * c.beta2 + c.one_minus_beta2 * g * g
    denom = np.sqrt(v) / c.sqrt_bc2 + c.eps
    p = p - c.step_size * m / denom
    return p, m, v, None if compute_dtype is None else p[compute_span].astype(compute_dtype)
