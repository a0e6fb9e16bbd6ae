"""Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), math in float32 (float64 stays float64)."""
import numpy as np

from ..backend import get_array_module
from ..tensor import Function
from .common import compute_dtype


class RMSNorm(Function):
    """Normalise the last axis by its root mean square, then scale by (1 + w).

    y = x r (1 + w) with r = 1 / sqrt(mean(x^2) + eps), over the D features of a row. eps is added
    to the mean square, inside the square root, and enters only through r: as in Hugging Face's
    Gemma3RMSNorm (x * rsqrt(x.pow(2).mean(-1) + eps), eps = rms_norm_eps = 1e-6 added in float32),
    not to the RMS (x / (sqrt(mean(x^2)) + eps) is another function). It keeps r finite for an
    all-zero row (y = 0 there) and changes little where mean(x^2) >> eps. The scale (1 + w) comes
    after and does not touch eps: w is stored as an offset from 1 (zero means identity), as Gemma's
    checkpoints store it; a Llama-style norm weight (the scale itself, initialised to 1) would have
    to be loaded as w - 1.

    As Hugging Face's Gemma3RMSNorm: x is upcast to float32 (at least), normalised,
    multiplied by (1 + w) in float32 and cast back to x's dtype, or to `out_dtype` when
    given: a float32 x normalised straight to float16 is rounded once, exactly as the
    float32 result followed by a cast. A float64 x is computed in float64 (gradcheck), where
    HF's x.float() would compute in float32.
    """

    fresh_grads = True  # dx and dw are new arrays

    def __init__(self, eps, out_dtype=None):
        self.eps = eps
        self.out_dtype = None if out_dtype is None else np.dtype(out_dtype)

    def forward(self, x, w):
        out = x.dtype if self.out_dtype is None else self.out_dtype
        xp, c = get_array_module(x), compute_dtype(x.dtype)
        xf = x.astype(c, copy=False)
        self.rstd = 1 / xp.sqrt((xf * xf).mean(axis=-1, keepdims=True) + c.type(self.eps))
        self.x = x
        self.w = w if self.needs_grad[0] else None
        self.w_dtype = w.dtype
        return (xf * self.rstd * (1 + w.astype(c, copy=False))).astype(out, copy=False)

    def backward(self, gy):
        """Write n = x r with r = (mean(x^2) + eps)^(-1/2) and y = n (1 + w), over D features.

        dL/dw_k = sum over all rows of g_k n_k.
        dL/dn_k = h_k = g_k (1 + w_k). eps is a constant inside r, so with m = mean(x^2),
        dr/dx_k = -(1/2) (m + eps)^(-3/2) (2 x_k / D) = -r^3 x_k / D, and
        dL/dx_k = h_k r + sum_j h_j x_j (-r^3 x_k / D) = r (h_k - n_k mean_j(h_j n_j)),
        exact for every eps >= 0. With eps = 0, n has unit mean square and this is h with its
        component along n removed, scaled by r (y does not change when x is scaled, so
        x . dL/dx = 0). With eps > 0, mean(n^2) = m / (m + eps) < 1 and
        x . dL/dx = D mean(h n) eps / (m + eps): scaling x then changes y slightly, noticeably
        only for rows whose m is not large against eps.

        The final cast to the output dtype is the identity on values, so g (in that dtype)
        enters the same float32 math; dx is cast to x's dtype and dw to w's.
        """
        c = self.rstd.dtype
        g = gy.astype(c, copy=False)
        n = self.x.astype(c, copy=False) * self.rstd
        gx = gw = None
        if self.needs_grad[0]:
            h = g * (1 + self.w.astype(c, copy=False))
            gx = self.rstd * (h - n * (h * n).mean(axis=-1, keepdims=True))
            gx = gx.astype(self.x.dtype, copy=False)
        if self.needs_grad[1]:
            gw = (g * n).reshape(-1, n.shape[-1]).sum(axis=0).astype(self.w_dtype, copy=False)
        return gx, gw


class ResidualRMSNorm(Function):
    """h + rms_norm(x, w): a residual stream h plus a normalised branch x, as one op.

    Exactly the unfused pair: the normalised branch is rounded to x's dtype (RMSNorm's output),
    then added to h in NumPy's promoted dtype. Backward: d(h + n)/dh = 1, so h's gradient is gy
    itself; the branch receives gy cast to its output dtype (x's, what the engine's cast of the
    unfused pair does) and goes through RMSNorm's backward (derived above). `norm` is the
    branch's RMSNorm Function (F.rms_norm's choice for x and w, which may be the fused kernel's).
    """

    def __init__(self, norm):
        self.norm = norm

    def forward(self, h, x, w):
        self.norm.needs_grad = self.needs_grad[1:]
        self.x_dtype = x.dtype
        return h + self.norm.forward(x, w)

    def backward(self, gy):
        gh = gy if self.needs_grad[0] else None
        if not (self.needs_grad[1] or self.needs_grad[2]):
            return gh, None, None
        return (gh,) + self.norm.backward(gy.astype(self.x_dtype, copy=False))
