"""Embedding: a row gather from the table."""
from ..backend import get_array_module, scatter_add
from ..tensor import ADDED, Function
from .common import compute_dtype


class Embedding(Function):
    """out[...] = W[ids[...]]: one row of W per id."""

    fresh_grads = True

    def forward(self, ids, w):
        self.ids = ids if self.needs_grad[1] else None
        self.w_shape, self.w_dtype = w.shape, w.dtype
        return w[ids]

    def backward(self, gy):
        """Each output row is a copy of one row of W, so row r of dW is the sum of the
        output gradients of every position whose id is r (zero for unused rows). That
        is a scatter-add: repeated ids must accumulate, not overwrite. It accumulates in
        float32 (or float64) so that many float16 contributions do not lose precision;
        into the engine's target when it offers one of that dtype (a float32 gradient
        buffer), so no zero-filled (V, D) array is made at all.
        """
        xp = get_array_module(gy)
        acc_dtype = compute_dtype(self.w_dtype)
        target = self.grad_target(1)
        added = target is not None and target.dtype == acc_dtype and target.flags.c_contiguous
        acc = target if added else xp.zeros(self.w_shape, dtype=acc_dtype)
        self.add_rows(acc, self.ids.reshape(-1), gy.reshape(-1, self.w_shape[-1]))
        return None, ADDED if added else acc.astype(self.w_dtype, copy=False)

    def add_rows(self, acc, ids, gy):
        """acc[ids[n]] += gy[n] for every row n of gy, repeated ids accumulating, in acc's dtype
        (the fast path's FusedEmbedding, kernels/embedding.py, does it by a kernel)."""
        return scatter_add(acc, ids, gy.astype(acc.dtype, copy=False))
