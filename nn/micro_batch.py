"""How one training micro-batch runs: one interface, three ways.

    runner = micro_batch_runner(loss_fn, optimizer, model.parameters(), comm=comm, graphs=graphs)  # nn/trainer.py
    for i, (x, y) in enumerate(micro_batches):
        loss_sum += runner(x, y, loss_weight, last=i == len(micro_batches) - 1)
    runner.finish()          # every rank now holds the summed gradients
    optimizer.step(...)

- `EagerMicroBatch`: forward and backward op by op; given the optimizer, gradients are added into
  its flat float32 buffer (`grads_in_buffer`), so micro-batches sum in float32 as under autocast,
  not in the float16 of a float16 weight's `.grad`; without it they land in `.grad`.
- `DataParallelMicroBatch`: the same, and on the update's last micro-batch each bucket of
  gradients starts its all-reduce as soon as backward completes it; `finish` waits for them.
- `nn.GraphedMicroBatch` (nn/graphed_step.py): the micro-batch replayed as a CUDA graph,
  gradients added into the optimizer's flat buffer; with a communicator, `finish` sums that
  buffer over the ranks in one all-reduce.

`loss_fn(x, y, w)` returns the micro-batch's loss Tensor. Every runner back-propagates
`loss * w` through `forward_backward`, the one place that keeps the promise the model's head
relies on: the `w` it was told in the forward is the factor backward multiplies the loss by
(docs/fast_path.md, "The head").
"""
import contextlib

from tinygrad3 import Tensor


def forward_backward(loss_fn, x, y, loss_weight, leaf_hook=None):
    """Run `loss_fn(x, y, loss_weight)` and back-propagate `loss * loss_weight`; return the loss.

    loss_weight is a number, or (inside a CUDA graph) a 0-d GPU array the graph reads at replay.
    The model receives the same value, so its head can make the gradients in the forward that
    this backward will ask for (Gemma3's `loss_grad`, F.linear_cross_entropy's `expected_grad`).
    """
    loss = loss_fn(x, y, loss_weight)
    weight = Tensor(loss_weight.astype(loss.dtype, copy=False)) if hasattr(loss_weight, "shape") else loss_weight
    (loss * weight).backward(leaf_hook=leaf_hook)
    return loss


class EagerMicroBatch:
    """Forward and backward of one micro-batch, op by op; gradients add into the optimizer's flat
    buffer when one is given, else into each `.grad`."""

    def __init__(self, loss_fn, optimizer=None):
        self.loss_fn, self.optimizer = loss_fn, optimizer

    def __call__(self, x, y, loss_weight, last=False):
        """The micro-batch's loss (an array); `last`: the update's last micro-batch."""
        with contextlib.nullcontext() if self.optimizer is None else self.optimizer.grads_in_buffer():
            return forward_backward(self.loss_fn, x, y, loss_weight).data

    def finish(self):
        """After the update's last micro-batch: the gradients are complete (nothing to do here)."""


class DataParallelMicroBatch(EagerMicroBatch):
    """Eager micro-batches whose gradients `dp` (a tinygrad3.distributed.DataParallel) sums over
    the ranks, bucket by bucket, overlapping the last micro-batch's backward."""

    def __init__(self, loss_fn, dp):
        super().__init__(loss_fn)
        self.dp = dp

    def __call__(self, x, y, loss_weight, last=False):
        hook = self.dp.leaf_hook if last else None  # earlier micro-batches only accumulate locally
        return forward_backward(self.loss_fn, x, y, loss_weight, leaf_hook=hook).data

    def finish(self):
        self.dp.finish()
