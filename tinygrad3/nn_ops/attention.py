"""Causal (optionally sliding-window) softmax attention with grouped K/V heads.

This is the reference path: float32 math with xp.matmul, materialising the scores. The fast
path's Functions subclass it: FlashAttention (tinygrad3/kernels/flash_attention.py: fused, no
T x T scores) and FusedAttention (tinygrad3/kernels/attention.py: cuBLAS GEMMs and a fused
softmax); F.attention picks one. `causal_mask` is the visibility rule all of them follow.
"""
from ..backend import get_array_module
from ..tensor import Function
from .common import compute_dtype


def causal_mask(xp, tq, tk, q_offset, window, first_query=0, first_key=0):
    """Boolean (tq, tk): query first_query + i (absolute position q_offset + first_query + i) may
    see key first_key + j iff that key <= its position and, with a window W, position - W < key
    (Hugging Face's rule). The offsets pick a tile of the full mask (the flash kernels' tiles)."""
    pos = q_offset + xp.arange(first_query, first_query + tq)[:, None]
    key = xp.arange(first_key, first_key + tk)[None, :]
    allowed = key <= pos
    if window is not None:
        allowed &= key > pos - window
    return allowed


class Attention(Function):
    """O = softmax(scale Q K^T + mask) V per head; query head h reads kv head h // G.

    Q (B, Hq, Tq, D) is viewed as (B, Hkv, G*Tq, D) with G = Hq / Hkv: the G query heads
    that share a kv head become rows of one matrix, so a single batched matmul per kv
    head serves them all and K, V are never repeated.

    O is (B, Hq, Tq, D), or (B, Tq, Hq, D) with out_layout="bthd": the flash kernels write and
    read it there directly; the other paths compute (B, Hq, Tq, D) and transpose it into a
    contiguous copy (and the incoming gradient back, a view).
    """

    def __init__(self, scale, window, q_offset, out_layout="bhtd"):
        self.scale, self.window, self.q_offset, self.out_layout = scale, window, q_offset, out_layout

    def _in_layout(self, out):
        """The (B, Hq, Tq, D) output in out_layout."""
        if self.out_layout == "bhtd":
            return out
        return get_array_module(out).ascontiguousarray(out.transpose(0, 2, 1, 3))

    def _out_as_bhtd(self, gy):
        """The output's gradient, in out_layout, as a (B, Hq, Tq, D) array (a view)."""
        return gy.transpose(0, 2, 1, 3) if self.out_layout == "bthd" else gy

    def forward(self, q, k, v):
        xp, c = get_array_module(q), compute_dtype(q.dtype)
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        qg = q.reshape(b, hkv, -1, d).astype(c, copy=False)
        s = xp.matmul(qg, xp.swapaxes(k.astype(c, copy=False), -1, -2)) * c.type(self.scale)
        s = s.reshape(b, hkv, hq // hkv, tq, tk)
        s = xp.where(causal_mask(xp, tq, tk, self.q_offset, self.window), s, c.type(-xp.inf))
        # Softmax over keys; every row sees at least its own position, so the max is finite.
        p = xp.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        self.p = p.reshape(b, hkv, -1, tk)
        self.q = q if self.needs_grad[1] else None
        self.k = k if self.needs_grad[0] else None
        self.v = v if self.needs_grad[0] or self.needs_grad[1] else None
        self.dtypes = q.dtype, k.dtype, v.dtype
        out = xp.matmul(self.p, v.astype(c, copy=False)).reshape(b, hq, tq, -1).astype(q.dtype, copy=False)
        return self._in_layout(out)

    def backward(self, gy):
        """With S = scale Q K^T (masked entries fixed at -inf), P = softmax(S), O = P V:

        dV = P^T dO                                  (O is linear in V)
        dP = dO V^T
        dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)      (softmax backward, row by row;
                                                      masked entries have P = 0, so dS = 0)
        dQ = scale dS K,   dK = scale dS^T Q         (S is bilinear in Q and K)

        In the grouped view, P^T dO and dS^T Q contract over the G*Tq rows of a kv head,
        which sums the contributions of its G query heads with no extra step.
        """
        gy = self._out_as_bhtd(gy)
        xp, p = get_array_module(gy), self.p
        c, (b, hkv) = p.dtype, p.shape[:2]
        g = gy.reshape(b, hkv, -1, gy.shape[-1]).astype(c, copy=False)
        gq = gk = gv = None
        if self.needs_grad[2]:
            gv = xp.matmul(xp.swapaxes(p, -1, -2), g).astype(self.dtypes[2], copy=False)
        if self.needs_grad[0] or self.needs_grad[1]:
            dp = xp.matmul(g, xp.swapaxes(self.v.astype(c, copy=False), -1, -2))
            ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
            ds *= c.type(self.scale)
            if self.needs_grad[0]:
                gq = xp.matmul(ds, self.k.astype(c, copy=False)).reshape(*gy.shape[:-1], self.k.shape[-1])
                gq = gq.astype(self.dtypes[0], copy=False)
            if self.needs_grad[1]:
                qg = self.q.reshape(b, hkv, -1, self.q.shape[-1]).astype(c, copy=False)
                gk = xp.matmul(xp.swapaxes(ds, -1, -2), qg).astype(self.dtypes[1], copy=False)
        return gq, gk, gv
