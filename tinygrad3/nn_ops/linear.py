"""Linear: a GEMM against a PyTorch-layout weight, or against several stacked by rows."""
import numpy as np

from .. import backend
from ..tensor import ADDED, Function


class Linear(Function):
    """y = x W^T over the last axis of x, with W of shape (out, in); given several weights
    W1, W2, ... (one `in`), W is them stacked by rows and y holds x W1^T, x W2^T, ... side by side:
    projections that read the same x (the MLP's gate and up) as ONE GEMM.

    Leading axes of x are flattened so the product is one 2-D GEMM (on the GPU this
    is what keeps float16 on the tensor cores), made by `@`; the fast path's GemmLinear
    (kernels/gemm.py) sets `mm` to call cuBLAS instead (the same GEMM, but one that CUDA-graph
    capture accepts). Stacked weights that already lie end to end in one buffer (parameters bound
    to an optimizer's flat buffer) are used as one view of it; otherwise they are copied together
    when x's gradient needs them whole, and else (inference) multiplied one by one.
    """

    fresh_grads = True  # new GEMM outputs (stacked weights: disjoint row blocks of one)
    mm = None  # the fast path's GEMM (GemmLinear's gemm.mm); None: `@`

    def forward(self, x, *weights):
        w = weights[0] if len(weights) == 1 else backend.stacked_view(weights)
        if w is None and self.needs_grad[0]:  # not end to end, and dX = G W needs them whole: a copy
            w = backend.get_array_module(*weights).concatenate(weights)
        x2 = x.reshape(-1, x.shape[-1])
        self.rows = [wi.shape[0] for wi in weights]
        self.x2 = x2 if any(self.needs_grad[1:]) else None
        self.w = w if self.needs_grad[0] else None
        self.lead, self.x_dtype, self.w_dtype = x.shape[:-1], x.dtype, weights[0].dtype
        if w is None:  # (e.g. generation) one product per weight, outputs side by side: no copy of the weights
            y = backend.get_array_module(x2).concatenate([self._times_t(x2, wi) for wi in weights], axis=1)
        else:
            y = self._times_t(x2, w)
        return y.reshape(*self.lead, sum(self.rows))

    def _times_t(self, x2, w):
        """x2 W^T, by `@` or the fast path's GEMM."""
        return x2 @ w.T if self.mm is None else self.mm(x2, w, trans_b=True)

    def backward(self, gy):
        """y[n,o] = sum_i x[n,i] W[o,i], so

        dL/dx[n,i] = sum_o g[n,o] W[o,i]  ->  dX = G W
        dL/dW[o,i] = sum_n g[n,o] x[n,i]  ->  dW = G^T X
        (the sum over n also sums over every flattened leading axis). Stacked weights: W's rows
        are theirs in order, so each one's gradient is its block of rows of dW.

        When the engine offers a target for x's or W's gradient (the sum of x's other uses, or
        a float32 buffer for W), the product is added into it: on the fast path by the GEMM
        itself (cuBLAS beta = 1), so no separate pass adds the two. Stacked weights whose
        targets lie end to end (their slices of an optimizer's buffer) get ONE GEMM adding into
        the span of them.
        """
        g = gy.reshape(-1, gy.shape[-1])
        mm = self.mm if g.dtype == self.w_dtype else None
        gx = None
        if self.needs_grad[0]:
            gx = _product(g, self.w, False, mm, self.grad_target(0), self.x_dtype)
            gx = gx if gx is ADDED else gx.reshape(*self.lead, -1)
        return (gx,) + self._weight_grads(g, mm)

    def _weight_grads(self, g, mm):
        wanted = self.needs_grad[1:]
        if not any(wanted):
            return (None,) * len(wanted)
        if len(wanted) == 1:
            return (_product(g, self.x2, True, mm, self.grad_target(1), self.w_dtype),)
        targets = [self.grad_target(i + 1) for i in range(len(wanted))]
        span = None if any(t is None for t in targets) else backend.stacked_view(targets)
        gw = _product(g, self.x2, True, mm, span, self.w_dtype)
        if gw is ADDED:
            return (ADDED,) * len(wanted)
        blocks, start = [], 0
        for n, want in zip(self.rows, wanted):
            blocks.append(gw[start:start + n] if want else None)
            start += n
        return tuple(blocks)


def _product(a, b, trans_a, mm, target, dtype):
    """op(a) @ b added into `target` (then ADDED), or as a new array of `dtype`; by `mm` (the fast
    path's GEMM, which writes float16 and adds into float16 or float32) when given, else by `@`.

    A target is used only when it is C-contiguous, so that its 2-D view is the array itself.
    """
    if target is not None and target.flags.c_contiguous:
        t2 = target.reshape(-1, target.shape[-1])
        if mm is not None and target.dtype in (np.float16, np.float32):
            mm(a, b, trans_a=trans_a, out=t2)
        else:
            t2 += a.T @ b if trans_a else a @ b
        return ADDED
    if mm is not None:
        return mm(a, b, trans_a=trans_a)
    return (a.T @ b if trans_a else a @ b).astype(dtype, copy=False)
