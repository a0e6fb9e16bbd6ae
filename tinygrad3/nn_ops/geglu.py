"""Pointwise GELU (tanh form) and the softmax family, math in float32 or wider."""
import math

from ..backend import get_array_module
from ..kernels import geglu, use_fast
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


class GeGLU(Function):
    """y = gelu_tanh(gate) * up, the Gemma MLP's gate, rounded exactly as the unfused pair
    `gelu_tanh(gate) * up`: a = gelu(gate) in float32 rounded to gate's dtype, then a * up in
    that dtype. Saves gate and up only; a is recomputed in the backward."""

    def forward(self, gate, up):
        self.gate, self.up = gate, up
        self.fast = use_fast("geglu", gate, up)
        if self.fast:  # one fused pass (tinygrad3/kernels/geglu.py)
            return geglu.forward(gate, up)
        return GeluTanh().forward(gate) * up

    def backward(self, gy):
        """The unfused pair's backward, step for step: the product gives d_up = gy a and
        d_a = gy up (in the inputs' dtype); GeluTanh's backward turns d_a into d_gate."""
        if self.fast:
            return geglu.backward(gy, self.gate, self.up)
        gelu = GeluTanh()
        a = gelu.forward(self.gate)
        return gelu.backward(gy * self.up), gy * a


class Softmax(Function):
    """y = exp(x - max x) / sum exp(x - max x) along `axis` (the shift changes nothing but
    keeps exp from overflowing)."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        xf = x.astype(compute_dtype(x.dtype), copy=False)
        e = xp.exp(xf - xf.max(axis=self.axis, keepdims=True))
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        self.x_dtype = x.dtype
        return self.y.astype(x.dtype, copy=False)

    def backward(self, gy):
        """dy_i/dx_k = y_i ([i == k] - y_k), so dL/dx_k = sum_i g_i y_i ([i == k] - y_k)
        = y_k (g_k - sum_i g_i y_i)."""
        g = gy.astype(self.y.dtype, copy=False)
        gx = self.y * (g - (g * self.y).sum(axis=self.axis, keepdims=True))
        return gx.astype(self.x_dtype, copy=False)


class LogSoftmax(Function):
    """y = x - m - log(sum exp(x - m)) with m = max x along `axis`."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        z = x.astype(compute_dtype(x.dtype), copy=False)
        z = z - z.max(axis=self.axis, keepdims=True)
        self.y = z - xp.log(xp.exp(z).sum(axis=self.axis, keepdims=True))
        self.x_dtype = x.dtype
        return self.y.astype(x.dtype, copy=False)

    def backward(self, gy):
        """dy_i/dx_k = [i == k] - softmax_k, so dL/dx_k = g_k - softmax_k sum_i g_i,
        with softmax = exp(y) recovered from the saved output."""
        xp = get_array_module(gy)
        g = gy.astype(self.y.dtype, copy=False)
        gx = g - xp.exp(self.y) * g.sum(axis=self.axis, keepdims=True)
        return gx.astype(self.x_dtype, copy=False)
