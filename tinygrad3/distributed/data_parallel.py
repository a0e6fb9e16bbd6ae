"""Data parallelism: every rank trains a replica on its own micro-batches, then the ranks add up
their gradients so that each takes the identical optimizer step. Two ways, one per training path:

  * DataParallel: the gradients are the parameters' `.grad` arrays (training without CUDA
    graphs); summed in buckets, each started during backward as soon as it is complete.
  * allreduce_grad_buffer: with CUDA graphs (nn.GraphedMicroBatch) backward adds every gradient
    straight into the optimizer's flat float32 buffer and there is no `.grad`; after the update's
    last micro-batch the whole buffer is summed in place, with one all-reduce.

Both sum; neither averages (see "It sums" below).

DataParallel. Done naively, summing `.grad` arrays is one all-reduce per parameter (hundreds of
small, latency-bound calls) after the backward pass (nothing to hide the communication behind).
Instead:

  * Buckets. Parameters are grouped into flat buffers of about `bucket_bytes` (25 MB by default,
    as in PyTorch's DDP): one call per bucket, large enough to run at bandwidth.
  * Overlap. Backward produces gradients roughly in the reverse order of the forward, so the
    buckets are filled in reversed parameter order; `Tensor.backward(leaf_hook=...)` reports each
    parameter whose gradient is final, and a bucket's all-reduce starts the moment its last
    gradient arrives, while backward computes the earlier layers.
  * Order. NCCL requires every rank to issue its collectives in the same order, so buckets are
    launched strictly by index: a bucket that completes early waits for the ones before it.

Each gradient is copied into its bucket and `param.grad` becomes a view of that slot (PyTorch's
"gradient as bucket view"), so after the all-reduce the optimizer reads the summed gradients
where it always does, and the gradient array the backward made is dropped at once. The buckets
themselves are one gradient-sized allocation, made once and reused every update.

It sums; it does not average. The trainer folds the 1/world_size of the mean into the loss
weight, next to 1/grad_accum: rank r then back-propagates scale * loss / (world_size * grad_accum)
for each micro-batch, and the summed buffers hold what one process would accumulate over
world_size * grad_accum micro-batches (up to the order of the additions), which is what the
tests compare against.

    dp = DataParallel(model.parameters(), comm)
    for i in range(grad_accum):
        loss = ...
        (loss * weight).backward(leaf_hook=dp.leaf_hook if i == grad_accum - 1 else None)
    dp.finish()          # every param.grad now holds the sum over ranks
    optimizer.step(...)

The hook is passed on the last micro-batch only: earlier ones only accumulate locally.

Activation recomputation (tinygrad3.recompute) changes nothing here: a recomputed layer lists its
parameters as inputs of its checkpoint node, so backward reports them right after that node's
backward (which re-runs the layer and accumulates their gradients), and the buckets start during
backward as without it. A parameter a checkpointed function reads without listing it still gets
its gradient, but is only reduced by finish().

With CUDA graphs (allreduce_grad_buffer). A micro-batch's forward and backward is one graph
launch: no Python runs during a replay, so there is no leaf hook to start a bucket, and every
micro-batch adds into the same flat buffer, so its values are final only after the last replay.
The sum over ranks therefore runs once per update, after the last micro-batch and before the
step, and does not overlap with backward: the step waits for it. Overlap would need the
all-reduce inside a graph: a second graph per shape for the update's last micro-batch, with NCCL
calls captured between its backward kernels, on slices of the flat buffer that backward finishes
in turn (its layout, decayed parameters first, does not follow backward's order). That would hide
the all-reduce behind one micro-batch's backward at most, out of grad_accum; without it the cost
is one all-reduce of the buffer per update. One call (buckets only pay off when they overlap)
runs at NCCL's full bandwidth and leaves a single collective whose order no rank can get wrong.

    for x, y in micro_batches:
        graphed(x, y, scale / (grad_accum * comm.world_size))
    allreduce_grad_buffer(comm, optimizer)   # the flat buffer now holds the sum over ranks
    optimizer.step(...)
"""
from .. import backend

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20


class Bucket:
    """A flat buffer holding the gradients of a few parameters, each at its own slice."""

    def __init__(self, params, xp, dtype):
        self.params = params
        self.slices, start = [], 0
        for param in params:
            self.slices.append(slice(start, start + param.size))
            start += param.size
        self.buffer = xp.empty(start, dtype=dtype)
        self.waiting = set(range(len(params)))  # indices whose gradient has not arrived this pass

    def take(self, index):
        """Copy params[index]'s gradient (zeros if it has none) into its slot and make `.grad` that view."""
        param, view = self.params[index], self.buffer[self.slices[index]]
        if param.grad is None:
            view[...] = 0
        else:
            view[...] = param.grad.reshape(-1)
        param.grad = view.reshape(param.shape)
        self.waiting.discard(index)


class DataParallel:
    """Bucketed gradient all-reduce over `comm`, driven by backward's leaf hook (module docstring).

    params: the trainable parameters in forward order (e.g. `model.parameters()`); duplicates (tied
        weights) and parameters with requires_grad=False are skipped. All on one device; each bucket
        holds parameters of one dtype.
    bucket_bytes: target size of a bucket; a parameter larger than that gets a bucket of its own.
    """

    def __init__(self, params, comm, bucket_bytes=DEFAULT_BUCKET_BYTES):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        unique, seen = [], set()
        for param in params:
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                unique.append(param)
        if not unique:
            raise ValueError("DataParallel was given no trainable parameters")
        first = unique[0]
        if any(p.device != first.device for p in unique):
            raise ValueError("DataParallel needs parameters on one device")
        self.comm = comm
        xp = backend.get_array_module(first.data)
        self.buckets, self._where, group, size = [], {}, [], 0
        for param in reversed(unique):  # the order backward finishes them, roughly
            if group and param.dtype != group[0].dtype:  # a bucket holds one dtype (mixed precision
                self._add_bucket(group, xp)              # keeps norm weights float32 among fp16 ones)
                group, size = [], 0
            group.append(param)
            size += param.size * param.dtype.itemsize
            if size >= bucket_bytes:
                self._add_bucket(group, xp)
                group, size = [], 0
        if group:
            self._add_bucket(group, xp)
        self._launched = 0  # buckets [0, _launched) have their all-reduce under way this pass
        self._works = []

    def _add_bucket(self, params, xp):
        for index, param in enumerate(params):
            self._where[id(param)] = (len(self.buckets), index)
        self.buckets.append(Bucket(params, xp, params[0].dtype))

    def leaf_hook(self, tensor):
        """For `Tensor.backward(leaf_hook=...)`: `tensor`'s gradient is final for this pass."""
        where = self._where.get(id(tensor))
        if where is None:  # a leaf that is not one of our parameters (an input, say)
            return
        number, index = where
        bucket = self.buckets[number]
        if index not in bucket.waiting:
            raise RuntimeError("a parameter's gradient became final twice before finish(): pass "
                               "leaf_hook only to the last backward of an update, then call finish()")
        bucket.take(index)
        self._launch_complete()

    def _launch_complete(self):
        while self._launched < len(self.buckets) and not self.buckets[self._launched].waiting:
            self._works.append(self.comm.allreduce(self.buckets[self._launched].buffer))
            self._launched += 1

    def finish(self):
        """Reduce what is still missing, wait for every bucket; then each `.grad` is the sum over ranks.

        Parameters that this pass never reached (unused in the forward, or no hook was passed)
        enter with the gradient they have, or zeros: another rank may have one for them.
        """
        for bucket in self.buckets[self._launched:]:
            for index in sorted(bucket.waiting):
                bucket.take(index)
        self._launch_complete()
        for work in self._works:
            work.wait()
        self._works, self._launched = [], 0
        for bucket in self.buckets:
            bucket.waiting = set(range(len(bucket.params)))


def broadcast_optimizer(comm, optimizer, root=0):
    """Give every rank `root`'s master weights and moments (AdamW's flat buffers), so all ranks
    start from the same bits whatever each one loaded or initialised."""
    for buffer in (optimizer.master, optimizer.m, optimizer.v):
        comm.broadcast(buffer, root)
    optimizer.sync_params()  # refreshes the fp16 compute copy from the new masters


def allreduce_grad_buffer(comm, optimizer):
    """Sum the update's gradients over the ranks of `comm`, in place in the optimizer's flat buffer.

    Call it on every rank after the update's last micro-batch and before `optimizer.step`: one
    all-reduce of the whole buffer, waited for on return (on a GPU: the current stream waits for
    it, the host does not). Any `.grad` a plain backward left is added into the buffer first and
    cleared, so the step sees exactly the summed gradients. For CUDA-graphed training, where
    backward fills the buffer (module docstring); an inf or NaN on one rank reaches every rank.
    """
    params = optimizer.params
    if any(param.grad is not None for param in params):
        optimizer.accumulate_grads([param.grad for param in params])
        for param in params:
            param.grad = None
    comm.allreduce(optimizer.grad_buffer).wait()
