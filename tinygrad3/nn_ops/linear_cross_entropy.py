"""The output layer and the loss in one op, without keeping the (N, V) logits.

For a language model the logits are the largest activation by far: at 16 x 1024 tokens and a
vocabulary of 50,304 they are 1.65 GB in float16, and the loss's backward adds a gradient of
the same size. This op computes

    L = mean over non-ignored rows n of CE(z_n, t_n),   z = x W^T

a block of rows at a time: each block's logits are made, reduced to their logsumexp and loss
by CrossEntropy, and dropped. The backward makes each block's logits again (the same GEMM on
the same inputs, so the same values) and hands them back to that block's CrossEntropy for its
gradient dZ. Peak memory for the head is one block's logits and their gradient instead of the
whole of both; the price is the head's GEMM run twice (about 1/3 more head FLOPs).

Blocks and the mean: block c has mean loss L_c = S_c / N_c over its N_c counted rows, so
L = sum_c S_c / N = sum_c L_c N_c / N. In the backward, dL/dL_c = N_c / N, so block c's
CrossEntropy backward gets gy N_c / N as its upstream gradient (N_c is its clamped count,
which only differs from the true one when the block has no counted rows, and then L_c = 0 and
dZ_c = 0 whatever the factor).

Gradients of the GEMM (derived in nn_ops/linear.py): dX_c = dZ_c W for the block's rows, and
dW = sum_c dZ_c^T X_c, summed over blocks in float32 (float64 for float64) and rounded to W's
dtype once at the end (on the fast path each block's GEMM adds into the float32 sum itself). When
the engine offers a float32 target for dW (a gradient buffer), the blocks add into it directly.

Gradients made in the forward (expected_grad). Every gradient above is linear in the upstream
gy, and in training gy is known before the forward: it is the loss weight, loss scale / micro-
batches, that the loss is multiplied by. Given it, the forward computes each block's dZ_c (over
its logits, in place), dX_c and its share of dW right away, while the logits are still there, so
no GEMM is run twice; the backward only scales them by gy / expected_grad (exactly 1 when gy is
the expected value, and x * 1 is exact: the same values as the recomputing path). The forward then
holds dX and a float32 dW (V x D) until the backward instead of X and W, and at most one block's
logits, overwritten by their gradient.

A padded vocabulary (valid_vocab < V: W's last rows are unused ids) is handled by
CrossEntropy: those logits count as -inf, so they get probability 0 and gradient 0, and W's
padding rows get zero gradient, as adding a large negative mask would give, without the pass.
"""
from ..backend import get_array_module
from ..tensor import ADDED, Function
from .common import compute_dtype
from .cross_entropy import CrossEntropy

BLOCK_BYTES = 256 * 2 ** 20  # logits per block at most (the last block may hold fewer rows)


def block_rows(n_rows, vocab, itemsize, block_bytes=BLOCK_BYTES):
    """Rows per block: at most block_bytes of logits, equal blocks, a multiple of 128 rows
    when a block holds more than 128 (GEMM-friendly)."""
    most = max(1, block_bytes // (vocab * itemsize))
    blocks = -(-n_rows // most)
    rows = -(-n_rows // max(blocks, 1))
    return min(n_rows, -(-rows // 128) * 128) if rows > 128 else max(rows, 1)


class LinearCrossEntropy(Function):
    """mean CE(x W^T, targets) over rows whose target is not ignore_index.

    x (..., D), W (V, D), targets of x's leading shape; only the first valid_vocab logits count
    (all when None). The loss has x's compute dtype (float32 for float16 x). With expected_grad
    (the gradient its backward will be called with), the gradients are made in the forward.
    The fast path's pieces come from F.linear_cross_entropy: `mm`, the GEMM F.linear would use
    (None: `@`), and `loss_class(logits)`, the CrossEntropy Function F.cross_entropy would pick
    for a block's logits.
    """

    def __init__(self, ignore_index, valid_vocab=None, rows=None, expected_grad=None, mm=None,
                 loss_class=lambda logits: CrossEntropy):
        self.ignore_index, self.valid_vocab, self.rows = ignore_index, valid_vocab, rows
        self.expected, self.mm, self.loss_class = expected_grad, mm, loss_class

    def _logits(self, x2, w, start, stop):
        """The block's logits x2[start:stop] W^T, in x's dtype, as F.linear makes them."""
        return x2[start:stop] @ w.T if self.mm is None else self.mm(x2[start:stop], w, trans_b=True)

    def forward(self, x, w, targets):
        xp = get_array_module(x)
        x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        c = compute_dtype(x.dtype)
        rows = self.rows or block_rows(len(x2), w.shape[0], x2.dtype.itemsize)
        bounds = [(a, min(a + rows, len(x2))) for a in range(0, len(x2), rows)]
        self.count = xp.maximum((t != self.ignore_index).sum(), 1).astype(c)
        early = self.expected is not None and any(self.needs_grad[:2])
        if not early:
            self.expected = None
        else:  # the gradients of gy = expected, made block by block below
            # a number becomes a 0-d array by a fill (capturable in a CUDA graph, see ops.as_operand)
            e = self.expected
            self.expected = e.astype(c, copy=False) if hasattr(e, "shape") else xp.full((), e, dtype=c)
            self.gx = xp.empty(x2.shape, x2.dtype) if self.needs_grad[0] else None
            self.gw = xp.zeros(w.shape, c) if self.needs_grad[1] else None
        self.blocks, total = [], None
        for start, stop in bounds:
            # its backward writes dZ over the block's logits, which are ours and needed no more
            logits = self._logits(x2, w, start, stop)
            ce = self.loss_class(logits)(self.ignore_index, self.valid_vocab, overwrite_logits=True)
            ce.needs_grad = (True, False)
            share = ce.forward(logits, t[start:stop]) * ce.denom
            total = share if total is None else total + share
            if early:
                self._block_grads(ce, self.expected, x2, w, start, stop, self.gx, self.gw)
            else:
                del ce.logits  # made again in the backward; everything else it saved is per row
                self.blocks.append((start, stop, ce))
        if not early:
            self.x2, self.w = x2, w  # the backward makes the logits again from both
        self.x_shape, self.w_dtype, self.c = x.shape, w.dtype, c
        if total is None:  # no rows at all
            return xp.zeros((), c)
        return total / self.count

    def _block_grads(self, ce, gy, x2, w, start, stop, gx, gw):
        """Block c's dZ_c (CrossEntropy's backward, upstream gy N_c / N), then dX_c = dZ_c W into
        gx[start:stop] and dW += dZ_c^T X_c into gw (either may be None)."""
        gz, _ = ce.backward(gy * (ce.denom / self.count))
        del ce.logits
        if gx is not None:
            gx[start:stop] = gz @ w if self.mm is None else self.mm(gz, w)
        if gw is not None and self.mm is not None:
            self.mm(gz, x2[start:stop], trans_a=True, out=gw)
        elif gw is not None:
            gw += gz.astype(gw.dtype).T @ x2[start:stop].astype(gw.dtype)

    def scale_made_grads(self, factor, target=None):
        """(gx, gw): the gradients made in the forward times factor = gy / expected (a 0-d array):
        gx rounded back to x's dtype, gw in place; with a target (a float32 buffer) gw is then
        added into it, and the return's gw is not to be used."""
        xp = get_array_module(factor)
        gx = None if self.gx is None else (self.gx * factor).astype(self.gx.dtype)
        gw = None if self.gw is None else xp.multiply(self.gw, factor, out=self.gw)
        if target is not None:
            target += gw
        return gx, gw

    def backward(self, gy):
        """Per block: dZ_c from CrossEntropy (upstream gy N_c / N), then dX_c = dZ_c W and
        dW += dZ_c^T X_c (see the module docstring). Made in the forward for gy = expected: every
        gradient is linear in gy, so they are scaled by gy / expected (1 when the caller kept its
        word: x * 1 is exact, so the values are those of the recomputing path)."""
        xp, c = get_array_module(gy), self.c
        target = self.grad_target(1) if self.needs_grad[1] else None
        added = target is not None and target.dtype == c and target.flags.c_contiguous
        if self.expected is not None:
            gx, gw = self.scale_made_grads(gy.astype(self.expected.dtype) / self.expected, target if added else None)
        else:
            gx = xp.empty(self.x2.shape, self.x2.dtype) if self.needs_grad[0] else None
            gw = target if added else xp.zeros(self.w.shape, c) if self.needs_grad[1] else None
            for start, stop, ce in self.blocks:
                ce.logits = self._logits(self.x2, self.w, start, stop)
                self._block_grads(ce, gy, self.x2, self.w, start, stop, gx, gw)
        return (None if gx is None else gx.reshape(self.x_shape),
                ADDED if added else None if gw is None else gw.astype(self.w_dtype, copy=False), None)
