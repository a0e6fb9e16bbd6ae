"""Causal (optionally sliding-window) softmax attention with grouped K/V heads.

This is the reference path: float32 math with xp.matmul, materialising the scores. With the
fast path on, float16 CuPy inputs go to the flash kernels (tinygrad3/kernels/flash_attention.py:
fused, no T x T scores) when their family is on and they take the shapes, else to
tinygrad3/kernels/attention.py (cuBLAS GEMMs and a fused softmax).
"""
from ..backend import get_array_module
from ..kernels import attention as fused, flash_attention as flash, use_fast
from ..tensor import Function
from .common import compute_dtype


def causal_mask(xp, tq, tk, q_offset, window):
    """Boolean (tq, tk): query i (absolute position q_offset + i) may see key j iff
    j <= q_offset + i and, with a window W, q_offset + i - W < j (Hugging Face's rule)."""
    pos = q_offset + xp.arange(tq)[:, None]
    key = xp.arange(tk)[None, :]
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

    def forward(self, q, k, v):
        if use_fast("flash_attention", q, k, v) and flash.supports(q, k, v, self.window, self.q_offset):
            # fused flash kernels: saves the output and the row logsumexp, no T x T matrix
            self.kernel = flash
            out, self.lse = flash.forward(q, k, v, self.scale, self.window, self.q_offset, self.out_layout)
            self.q, self.k, self.v, self.out = q, k, v, out
            return out
        if use_fast("attention", q, k, v):  # tensor-core GEMMs + fused masked softmax, saves P
            self.kernel = fused
            out, self.p = fused.forward(q, k, v, self.scale, self.window, self.q_offset)
            self.q, self.k, self.v = q, k, v
            return self._in_layout(out)
        self.kernel = None
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
        if self.kernel is flash:
            return flash.backward(gy, self.q, self.k, self.v, self.out, self.lse, self.scale, self.window,
                                  self.q_offset, self.needs_grad, self.out_layout)
        if self.out_layout == "bthd":
            gy = gy.transpose(0, 2, 1, 3)   # back to (B, Hq, Tq, D)
        if self.kernel is fused:
            return fused.backward(gy, self.q, self.k, self.v, self.p, self.scale, self.window,
                                  self.q_offset, self.needs_grad)
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
