"""Mean cross-entropy over integer targets, stable for float16 logits."""
from ..backend import get_array_module
from ..tensor import Function
from .common import compute_dtype


class CrossEntropy(Function):
    """L = mean over non-ignored rows n of (logsumexp(z_n) - z_n[t_n]).

    Logits are upcast to float32 before the row max is subtracted, so float16 logits
    up to +-65504 give no inf/NaN. The target logit is gathered by integer indexing;
    no one-hot matrix is built. If every target is ignored, L = 0 and its gradient is 0.
    Targets are range-checked by F.cross_entropy before they get here.
    """

    def __init__(self, ignore_index, valid_vocab=None, overwrite_logits=False):
        # valid_vocab: only the first valid_vocab logits of a row count; the others (a padded
        # vocabulary's unused ids) get probability 0 and gradient 0, as if they were -inf.
        # overwrite_logits: the fused kernel's backward may write the gradient over the logits (for
        # a caller that owns them and needs them no more, LinearCrossEntropy), saving an array.
        self.ignore_index, self.valid_vocab, self.overwrite = ignore_index, valid_vocab, overwrite_logits

    def forward(self, logits, targets):
        xp, c = get_array_module(logits), compute_dtype(logits.dtype)
        v = logits.shape[-1]
        t = targets.reshape(-1)
        z = logits.reshape(-1, v).astype(c, copy=False)
        rows = xp.arange(z.shape[0])
        valid = t != self.ignore_index
        safe_t = xp.where(valid, t, 0)
        zv = z[:, :self.valid_vocab]
        m = zv.max(axis=-1, keepdims=True)
        lse = m + xp.log(xp.exp(zv - m).sum(axis=-1, keepdims=True))
        denom = xp.maximum(valid.sum(), 1).astype(c)
        loss = ((lse[:, 0] - z[rows, safe_t]) * valid).sum() / denom
        self.logits, self.lse, self.safe_t, self.valid, self.denom = logits, lse, safe_t, valid, denom
        return xp.asarray(loss, dtype=c)

    def backward(self, gy):
        """d logsumexp(z_n) / dz_nk = softmax(z_n)_k = p_nk and dz_n[t_n] / dz_nk = [k == t_n], so

        dL/dz_nk = gy (p_nk - [k == t_n]) / N    for non-ignored rows, 0 for ignored ones.

        All of it is computed in float32 and cast to the logits' dtype only at the end:
        in float16 training gy carries the loss scale, and (p - y) / N alone would
        underflow float16 before that scale could lift it.
        """
        xp, c = get_array_module(gy), self.lse.dtype
        z = self.logits.reshape(-1, self.logits.shape[-1]).astype(c, copy=False)
        g = xp.exp(z - self.lse)
        if self.valid_vocab is not None:
            g[:, self.valid_vocab:] = 0
        g[xp.arange(g.shape[0]), self.safe_t] -= 1
        g *= (gy.astype(c) / self.denom) * self.valid[:, None]
        return g.reshape(self.logits.shape).astype(self.logits.dtype, copy=False), None
