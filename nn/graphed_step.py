"""A training micro-batch (forward, loss, backward) replayed as a CUDA graph.

    graphed = GraphedMicroBatch(lambda x, y, w: model(x, y, return_logits=False, loss_grad=w)[1], optimizer)
    for x, y in micro_batches:
        loss = graphed(x, y, loss_weight)   # gradients of loss * loss_weight go to the optimizer
        loss_sum += loss                    # a GPU value, overwritten by the next call
    optimizer.step(...)

The first micro-batch of a shape runs eagerly: it compiles the kernels and fills the caches
(RoPE tables, the vocabulary mask) that the graph will then read. The second one is captured
(tinygrad3/cuda_graph.py) and replayed, and so is every later one: the host's work per
micro-batch is three small copies (ids, targets, loss weight) and one graph launch.

Gradients. Backward runs inside `optimizer.grads_in_buffer()`: each parameter's gradient is
added straight into its slice of the optimizer's flat float32 buffer (a fixed address, so the
replays add there too), by the weight GEMMs themselves (cuBLAS beta = 1, float32 output), the
embedding's scatter-add and the norm kernels. So micro-batches accumulate in float32, as
PyTorch's float32 `.grad` under autocast does, and no gradient array of its own is kept by the
graph. (Without graphs our fp16 gradients are summed over micro-batches in fp16 first: the two
agree to fp16 rounding.)

The loss weight (loss scale / micro-batches) lives in a GPU scalar the graph reads, so the loss
scaler may change it between replays without a new capture. `loss_fn(x, y, w)` receives it (w: that
scalar, or the number itself in the eager first micro-batch): backward will multiply the loss by
it, so the model may make its head's gradients in the forward (Gemma3's `loss_grad`); a loss_fn may
also ignore it. The parameters' `.grad` must be None when a micro-batch starts (the graph cannot
add to arrays it does not own).

Data parallelism. There is no `.grad` for DataParallel's buckets, and no Python runs during a
replay to start them. Each rank instead runs its micro-batches through its own GraphedMicroBatch
(loss weight scale / (grad_accum * world_size)); given the communicator (`comm=`), `finish()` then
sums the optimizer's flat buffer over the ranks with one all-reduce
(`tinygrad3.distributed.allreduce_grad_buffer`), and every rank steps. That all-reduce does not
overlap with backward: the buffer is final only after the update's last replay, and no Python
runs inside a replay to start it earlier. It costs one all-reduce per update, next to grad_accum
micro-batches (what overlap would take instead: tinygrad3/distributed/data_parallel.py).
"""
import numpy as np

from tinygrad3 import backend, distributed
from tinygrad3.cuda_graph import CaptureError, CudaGraph

from .micro_batch import forward_backward


class GraphedMicroBatch:
    """`loss_fn(x, y, loss_weight) -> loss Tensor` forward and backward (of loss * loss_weight),
    captured once per input shape; the micro-batch runner interface of nn/micro_batch.py."""

    def __init__(self, loss_fn, optimizer, comm=None):
        if not backend.cuda_available():
            raise CaptureError("CUDA graphs need a CUDA GPU with CuPy; train without --cuda-graphs on the CPU")
        self.loss_fn, self.optimizer, self.comm = loss_fn, optimizer, comm
        self._warm, self._captured = set(), {}

    def __call__(self, x, y, loss_weight, last=False):
        """Add d(loss * loss_weight)/dparams to the optimizer's gradients; return the loss (a 0-d
        GPU array, valid until the next call). `last` changes nothing: the sum over ranks waits
        for `finish`."""
        params = self.optimizer.params
        if any(p.grad is not None for p in params):
            raise RuntimeError("GraphedMicroBatch: parameters already hold .grad; it adds gradients to the "
                               "optimizer directly, so call optimizer.zero_grad() before mixing it with "
                               "plain backward() calls")
        key = (x.shape, x.dtype.str, y.shape, y.dtype.str)
        if key in self._captured:
            return self._captured[key].run(x, y, loss_weight)
        if key not in self._warm:
            self._warm.add(key)
            return self._eager(x, y, loss_weight)
        self._captured[key] = _Captured(self.loss_fn, self.optimizer, x, y)
        return self._captured[key].run(x, y, loss_weight)

    def finish(self):
        """After the update's last micro-batch: with ranks, sum the flat buffer over them."""
        if self.comm is not None:
            distributed.allreduce_grad_buffer(self.comm, self.optimizer)

    def _eager(self, x, y, loss_weight):
        with self.optimizer.grads_in_buffer():
            return forward_backward(self.loss_fn, x, y, loss_weight).data

    def memory_bytes(self):
        """GPU memory held by the captured graphs (their activations and intermediates)."""
        return sum(c.graph.memory_bytes() for c in self._captured.values())


class _Captured:
    """One shape's graph, with the fixed input buffers it reads."""

    def __init__(self, loss_fn, optimizer, x, y):
        cupy = backend.cupy
        self.optimizer = optimizer
        self.x, self.y = cupy.empty_like(x), cupy.empty_like(y)
        self.weight = cupy.zeros((), np.float32)

        def micro_batch():
            with optimizer.grads_in_buffer():
                return forward_backward(loss_fn, self.x, self.y, self.weight).data

        self.graph = CudaGraph(micro_batch)
        self.loss = self.graph.outputs
        # The eager first micro-batch left its activations cached in CuPy's pool; the graph keeps
        # its own, so hand those blocks back to the device.
        cupy.get_default_memory_pool().free_all_blocks()

    def run(self, x, y, loss_weight):
        backend.raise_deferred()  # the last replay's checks read its ids: before they are overwritten
        self.x[...] = x
        self.y[...] = y
        self.weight.fill(loss_weight)
        self.graph.replay()
        return self.loss
