"""Rotary embedding (rotate-half layout), forward and backward in one kernel, for float16 x.

With h = D/2 and the angle tables cos, sin of one position (both halves equal), the forward
y = x cos + rotate_half(x) sin is, for each pair i < h,

    y_i     = x_i cos_i - x_{i+h} sin_i
    y_{i+h} = x_{i+h} cos_i + x_i sin_i

and the backward dx = g cos - rotate_half(g sin) (derived in nn_ops/rope.py) is

    dx_i     = g_i cos_i + g_{i+h} sin_i
    dx_{i+h} = g_{i+h} cos_i - g_i sin_i

i.e. the same rotation by the opposite angle: one kernel, with sin multiplied by +1 or -1.
One thread per pair; math in float32, rounded once.

The kernel reads and writes through 4-D strides, so it takes the heads' transposed view
(B, T, H, D) -> (B, H, T, D) without a copy: the forward writes a C-contiguous output (what
attention reads), the backward writes the gradient in the input's own memory layout, so the
transposes and reshapes that follow it are free.
"""
import numpy as np

from ..nn_ops.rope import RoPE
from .cuda import grid_stride_blocks, kernel

THREADS = 256

SOURCE = r"""
extern "C" __global__ void rope_rotate(const half_t* __restrict__ x, half_t* __restrict__ y,
                                       const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                       float sign, int B, int H, int T, int D,
                                       long long xs0, long long xs1, long long xs2, long long xs3,
                                       long long ys0, long long ys1, long long ys2, long long ys3) {
    const int half_d = D / 2;
    const long long n = (long long)B * H * T * half_d;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)blockDim.x * gridDim.x) {
        const int i = (int)(idx % half_d);
        long long rest = idx / half_d;
        const int t = (int)(rest % T);
        rest /= T;
        const int h = (int)(rest % H);
        const int b = (int)(rest / H);
        const long long xo = b * xs0 + h * xs1 + t * xs2, yo = b * ys0 + h * ys1 + t * ys2;
        const float c = cos_t[(long long)t * D + i], s = sign * sin_t[(long long)t * D + i];
        const float lo = h2f(x[xo + i * xs3]), hi = h2f(x[xo + (i + half_d) * xs3]);
        y[yo + i * ys3] = f2h(lo * c - hi * s);
        y[yo + (i + half_d) * ys3] = f2h(hi * c + lo * s);
    }
}
"""


def _strides(a):
    return [np.int64(s // a.itemsize) for s in a.strides]


def _rotate(x, out, cos, sin, sign):
    b, h, t, d = x.shape
    n = b * h * t * (d // 2)
    if n:
        kernel(SOURCE, "rope_rotate")((grid_stride_blocks(n, THREADS),), (THREADS,),
                                      (x, out, cos, sin, np.float32(sign), np.int32(b), np.int32(h), np.int32(t),
                                       np.int32(d), *_strides(x), *_strides(out)))
    return out


def _as4d(x):
    return x if x.ndim == 4 else x.reshape((-1,) + x.shape[-2:])[None]


def forward(x, cos, sin):
    """y, C-contiguous, for float16 CuPy x (..., T, D) and float32 tables cos, sin (T, D)."""
    import cupy
    y = cupy.empty(x.shape, x.dtype)
    _rotate(_as4d(x), _as4d(y), cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin), 1.0)
    return y


def layout(x):
    """What the backward needs to write dx laid out as x: its shape and axis order in memory."""
    return x.shape, tuple(sorted(range(x.ndim), key=lambda i: -x.strides[i]))


def backward(gy, cos, sin, x_layout):
    """dx, float16, dense in the memory order of the forward's input (see `layout`)."""
    import cupy
    shape, order = x_layout
    gx = cupy.empty([shape[i] for i in order], gy.dtype).transpose([order.index(i) for i in range(len(order))])
    if gx.ndim != 4:
        gx = cupy.ascontiguousarray(gx)
    _rotate(_as4d(gy), _as4d(gx), cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin), -1.0)
    return gx


class FusedRoPE(RoPE):
    """RoPE (nn_ops/rope.py) by the kernel above, reading x through its strides (F.rope picks it)."""

    def forward(self, x):
        self.tables(x)
        self.x_layout = layout(x)
        return forward(x, self.cos, self.sin)

    def backward(self, gy):
        return backward(gy, self.cos, self.sin, self.x_layout)


# ----- NumPy reference ------------------------------------------------------------------------

def reference_rotate(x, cos, sin, sign):
    """The kernel's float32 rotation of x (..., T, D), not rounded (the qk_norm_rope reference uses it too)."""
    h = x.shape[-1] // 2
    xf = x.astype(np.float32)
    lo, hi = xf[..., :h], xf[..., h:]
    c, s = cos[:, :h], np.float32(sign) * sin[:, :h]
    return np.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)


def reference_forward(x, cos, sin):
    return reference_rotate(x, cos, sin, 1.0).astype(np.float16)


def reference_backward(gy, cos, sin):
    return reference_rotate(gy, cos, sin, -1.0).astype(np.float16)
