"""Attention's q/k RMSNorm, head transpose and RoPE fused (the fast path of F.qk_norm_rope)."""
from ..backend import get_array_module
from ..kernels import qk_norm_rope, rmsnorm, use_fast
from ..tensor import ADDED, Function
from .rope import rope_tables


def fused(x, w):
    """True when the fused kernel takes x (B, T, H, D) and w: float16 CuPy x, float16 or float32 w."""
    return use_fast("qk_norm_rope", x) and use_fast("qk_norm_rope", w, dtypes=qk_norm_rope.W_DTYPES) \
        and qk_norm_rope.supports(x)


class QKNormRoPE(Function):
    """rope(rms_norm(x, w, eps).transpose(0, 2, 1, 3), base, offset) in one kernel each way.

    Only for inputs that `fused` accepts: every other input takes the reference path, the
    composition of RMSNorm, a transpose and RoPE (see F.qk_norm_rope).
    """

    def __init__(self, eps, base, offset):
        self.eps, self.base, self.offset = eps, base, offset

    def forward(self, x, w):
        t, d = x.shape[1], x.shape[3]
        cos, sin = rope_tables(d, self.base, self.offset + t, get_array_module(x))
        self.cos, self.sin = cos[self.offset:self.offset + t], sin[self.offset:self.offset + t]
        self.x, self.w = x, w
        y, self.rstd = qk_norm_rope.forward(x, w, self.eps, self.cos, self.sin)
        return y

    def backward(self, gy):
        """The chain rule through the three ops, per row (one head of one token), last op first.

        RoPE: y = rotation of u by the row's angle, pairwise (u_i, u_{i+D/2}); a rotation's
        transpose is the rotation by the opposite angle, so dL/du = g, gy rotated by -angle
        (nn_ops/rope.py derives the same as g cos - rotate_half(g sin)).
        Transpose: moves rows, so g belongs to the row of x at (b, t, h) that gy's (b, h, t) came from.
        RMSNorm (derived in nn_ops/norm.py): with n = x r and h = g (1 + w),
        dL/dx = r (h - n mean(h n)) and dL/dw = sum over rows of g n.
        The kernel does both steps for a row in registers: g is never written out.
        """
        into = self.grad_target(1) if self.needs_grad[1] else None
        into = into if rmsnorm.accepts_target(into, self.w) else None  # w's float32 gradient buffer
        gx, gw = qk_norm_rope.backward(gy, self.x, self.w, self.cos, self.sin, self.rstd, dw_into=into)
        return gx if self.needs_grad[0] else None, None if not self.needs_grad[1] else ADDED if into is not None else gw
