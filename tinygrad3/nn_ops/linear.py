"""Linear: a GEMM against a PyTorch-layout weight."""
import numpy as np

from ..tensor import ADDED, Function


class Linear(Function):
    """y = x W^T over the last axis of x, with W of shape (out, in).

    Leading axes of x are flattened so the product is one 2-D GEMM (on the GPU this
    is what keeps float16 on the tensor cores), made by `@`; the fast path's GemmLinear
    (kernels/gemm.py) sets `mm` to call cuBLAS instead (the same GEMM, but one that CUDA-graph
    capture accepts).
    """

    fresh_grads = True  # both gradients are new GEMM outputs
    mm = None  # the fast path's GEMM (GemmLinear's gemm.mm); None: `@`

    def forward(self, x, w):
        x2 = x.reshape(-1, x.shape[-1])
        self.x2 = x2 if self.needs_grad[1] else None
        self.w = w if self.needs_grad[0] else None
        self.lead, self.x_dtype, self.w_dtype = x.shape[:-1], x.dtype, w.dtype
        y = x2 @ w.T if self.mm is None else self.mm(x2, w, trans_b=True)
        return y.reshape(*self.lead, w.shape[0])

    def backward(self, gy):
        """y[n,o] = sum_i x[n,i] W[o,i], so

        dL/dx[n,i] = sum_o g[n,o] W[o,i]  ->  dX = G W
        dL/dW[o,i] = sum_n g[n,o] x[n,i]  ->  dW = G^T X
        (the sum over n also sums over every flattened leading axis).

        When the engine offers a target for x's or W's gradient (the sum of x's other uses, or
        a float32 buffer for W), the product is added into it: on the fast path by the GEMM
        itself (cuBLAS beta = 1), so no separate pass adds the two.
        """
        g = gy.reshape(-1, gy.shape[-1])
        mm = self.mm if g.dtype == self.w_dtype else None
        gx = gw = None
        if self.needs_grad[0]:
            gx = _product(g, self.w, False, mm, self.grad_target(0), self.x_dtype)
            gx = gx if gx is ADDED else gx.reshape(*self.lead, -1)
        if self.needs_grad[1]:
            gw = _product(g, self.x2, True, mm, self.grad_target(1), self.w_dtype)
        return gx, gw


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
