"""GELU (tanh form) and Gemma's gate gelu_tanh(gate) * up of x = [gate | up], math in float32 or wider."""
import math

from ..backend import get_array_module
from ..tensor import Function
from .common import compute_dtype

_C = math.sqrt(2 / math.pi)
_A = 0.044715


class GeluTanh(Function):
    """y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)."""

    def forward(self, x):
        xf = x.astype(compute_dtype(x.dtype), copy=False)
        self.x = x
        t = get_array_module(x).tanh(_C * (xf + _A * xf ** 3))
        return (0.5 * xf * (1 + t)).astype(x.dtype, copy=False)

    def backward(self, gy):
        """Product rule with tanh' = 1 - tanh^2 and du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2):
        dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 0.134145 x^2)."""
        xf = self.x.astype(compute_dtype(self.x.dtype), copy=False)
        t = get_array_module(xf).tanh(_C * (xf + _A * xf ** 3))
        dy = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _C * (1 + 3 * _A * xf * xf)
        return (gy * dy).astype(self.x.dtype, copy=False)


def halves(x):
    """x's last axis split in two: (gate, up), views."""
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


class GeGLU(Function):
    """y = gelu_tanh(gate) * up for x = [gate | up]: the last axis holds gate then up, as one GEMM
    of the stacked gate and up projections makes them. Rounded exactly as the unfused pair
    `gelu_tanh(gate) * up`: a = gelu(gate) in float32 rounded to x's dtype, then a * up in that
    dtype. Saves x only; a is recomputed in the backward."""

    def forward(self, x):
        self.x = x
        gate, up = halves(x)
        return GeluTanh().forward(gate) * up

    def backward(self, gy):
        """The unfused pair's backward, step for step: the product gives d_up = gy a and
        d_a = gy up (in x's dtype); GeluTanh's backward turns d_a into d_gate. x's gradient is
        [d_gate | d_up], the two halves side by side as in x."""
        gate, up = halves(self.x)
        gelu = GeluTanh()
        a = gelu.forward(gate)
        return get_array_module(gy).concatenate([gelu.backward(gy * up), gy * a], axis=-1)
