"""Softmax and log-softmax along an axis, computed stably (max subtracted) in float32 or wider."""
from ..backend import get_array_module
from ..tensor import Function
from .common import compute_dtype


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
