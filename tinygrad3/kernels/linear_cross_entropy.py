"""The last step of F.linear_cross_entropy's gradients made in the forward: one pass, or none.

The forward made gx (N, D, x's float16) and a float32 gw (V, D) for the expected upstream
gradient; the backward scales them by factor = gy / expected (nn_ops/linear_cross_entropy.py,
`scale_made_grads`) and adds gw into the engine's float32 target (the weight's gradient buffer):

    gx = float16(float32(gx) * factor)        gw = gw * factor;  target += gw

In training gy is the expected value, so factor is exactly 1 and x * 1 = x: the reference's
passes (a float32 product of gx and its cast back, a product over all of gw) leave every value
as it was. The factor lives on the GPU (a CUDA graph replays the same launches whatever it is),
so the kernels read it first: `scale_f16` returns at once when it is 1, and `scale_add_f32`
then only adds gw into the target, one pass over (V, D) instead of two. Any other factor takes
the reference's own roundings (each product one `__fmul_rn`, rounded to float16 after; the sum
one `__fadd_rn`), so the values are the reference path's for every factor.
"""
import numpy as np

from ..nn_ops.linear_cross_entropy import LinearCrossEntropy
from .cuda import grid_stride_blocks, kernel

THREADS = 256

SOURCE = r"""
// x = float16(float32(x) * factor) in place, skipped when factor == 1 (x * 1 == x).
extern "C" __global__ void scale_f16(half_t* __restrict__ x, const float* __restrict__ factor, long long n) {
    const float f = *factor;
    if (f == 1.f) return;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
        x[i] = f2h(__fmul_rn(h2f(x[i]), f));
}

// g = g * factor; with a target, target += that (g itself then left as it was: nobody reads it).
extern "C" __global__ void scale_add_f32(float* __restrict__ g, float* __restrict__ target,
                                         const float* __restrict__ factor, long long n) {
    const float f = *factor;
    if (f == 1.f && !target) return;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step) {
        const float v = f == 1.f ? g[i] : __fmul_rn(g[i], f);
        if (target) target[i] = __fadd_rn(target[i], v);
        else g[i] = v;
    }
}
"""


def supports(factor, *arrays):
    """The kernels' inputs: a float32 0-d factor and C-contiguous arrays (None: absent), all CuPy."""
    import cupy
    return (isinstance(factor, cupy.ndarray) and factor.dtype == np.float32 and factor.shape == ()
            and all(a is None or (isinstance(a, cupy.ndarray) and a.flags.c_contiguous) for a in arrays))


def _launch(name, n, args):
    if n:
        kernel(SOURCE, name)((grid_stride_blocks(n, THREADS),), (THREADS,), args + (np.int64(n),))


def scale_f16(x, factor):
    """x = float16(float32(x) * factor) in place (CuPy float16 x, float32 0-d factor); returns x."""
    _launch("scale_f16", x.size, (x, factor))
    return x


def scale_add_f32(g, factor, target=None):
    """g *= factor in place, or, with a target of g's shape, target += g * factor (CuPy float32)."""
    _launch("scale_add_f32", g.size, (g, np.uint64(0) if target is None else target, factor))
    return g


class FusedLinearCrossEntropy(LinearCrossEntropy):
    """LinearCrossEntropy whose made-in-the-forward gradients are finished by the kernels above."""

    def scale_made_grads(self, factor, target=None):
        gx, gw = self.gx, self.gw
        ok = ((gx is None or gx.dtype == np.float16) and (gw is None or gw.dtype == np.float32)
              and (target is None or (target.dtype == np.float32 and gw is not None and target.shape == gw.shape)))
        if not (ok and supports(factor, gx, gw, target)):
            return super().scale_made_grads(factor, target)
        if gx is not None:
            scale_f16(gx, factor)
        if gw is not None:
            scale_add_f32(gw, factor, target)
        return gx, gw


def reference_scale(gx, gw, factor, target=None):
    """NumPy: what the kernels compute, as the reference's array code computes it."""
    gx = None if gx is None else (gx.astype(np.float32) * np.float32(factor)).astype(gx.dtype)
    gw = None if gw is None else gw * np.float32(factor)
    if target is not None:
        target = target + gw
    return gx, gw, target
