"""Rotary position embedding, rotate-half layout (as Hugging Face's Gemma)."""
import numpy as np

from ..backend import get_array_module
from ..tensor import Function
from .common import compute_dtype

_TABLES = {}


def _device_key(xp):
    return "cpu" if xp is np else f"cuda:{xp.cuda.Device().id}"


def rope_tables(dim, base, length, xp):
    """float32 (L, dim) cos and sin for positions 0..L-1, L >= length, cached.

    theta[p, i] = p * base^(-2i/dim) for i < dim/2, repeated for both halves, in float32
    as Hugging Face computes it. L is rounded up to a power of two so that generation,
    which asks for one more position each step, reuses one table instead of making many.
    """
    size = max(256, 1 << (length - 1).bit_length())
    key = (dim, float(base), size, _device_key(xp))
    if key not in _TABLES:
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = np.float32(1) / np.float32(base) ** exponent
        theta = np.arange(size, dtype=np.float32)[:, None] * inv_freq[None, :]
        theta = np.concatenate([theta, theta], axis=-1)
        _TABLES[key] = xp.asarray(np.cos(theta)), xp.asarray(np.sin(theta))
    return _TABLES[key]


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) for the two halves of the last axis."""
    xp, h = get_array_module(x), x.shape[-1] // 2
    return xp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


class RoPE(Function):
    """y = x cos(theta) + rotate_half(x) sin(theta) for positions offset .. offset+T-1 (axis -2)."""

    def __init__(self, base, offset):
        self.base, self.offset = base, offset

    def tables(self, x):
        """Keep cos and sin (float32 (T, D)) for x's positions offset .. offset+T-1."""
        t, d = x.shape[-2:]
        cos, sin = rope_tables(d, self.base, self.offset + t, get_array_module(x))
        self.cos, self.sin = cos[self.offset:self.offset + t], sin[self.offset:self.offset + t]
        self.x_dtype = x.dtype

    def forward(self, x):
        self.tables(x)
        xf = x.astype(compute_dtype(x.dtype), copy=False)
        return (xf * self.cos + rotate_half(xf) * self.sin).astype(x.dtype, copy=False)

    def backward(self, gy):
        """y = x cos + R(x) sin is linear in x, with R = rotate_half. R turns each pair
        (x1_i, x2_i) by 90 degrees, so its transpose is the opposite turn, -R (check:
        <R x, g> = -x2.g1 + x1.g2 = <x, (g2, -g1)>). Hence
        dL/dx = cos g + R^T(sin g) = g cos - R(g sin)   (elementwise products).
        """
        g = gy.astype(compute_dtype(self.x_dtype), copy=False)
        return (g * self.cos - rotate_half(g * self.sin)).astype(self.x_dtype, copy=False)
