"""CUDA graphs: record a function's GPU work once, replay it with one launch.

A training micro-batch is about a thousand Functions forward and backward, each one to a few
kernel launches, and every launch costs the host several microseconds of Python and CuPy. At
small batches the GPU waits for the host. Stream capture records the kernels (and copies) a
function queues, without running them, into a graph; replaying the graph queues all of them
at once, so the host's cost per micro-batch becomes one launch.

What a replay does is exactly what was captured: the same kernels, on the same addresses, with
the same scalar arguments. So:

- Inputs live in fixed buffers that the caller refills before each replay; outputs are the
  arrays the function returned during capture, overwritten by each replay.
- Memory allocated during capture comes from a pool of the graph's own (`self.pool`), never
  handed to anyone else, so no later allocation can land on an address the graph writes.
- Nothing the function does on the host is replayed: Python control flow is frozen at capture,
  and reading a GPU value on the host (which would need the GPU to have run) is impossible
  during capture. Copies from the host are captured as copies from that host address, which is
  why the engine makes constants with fill kernels (ops.as_operand).
- cuBLAS is called through kernels/gemm.py, whose handle capture accepts (CuPy's own cuBLAS
  wrappers refuse during capture, cupy issue 6290). Ops that use CuPy's matmul, i.e. the
  reference path of linears and attention, cannot be captured: capture needs the fast path.
- Deferred checks (ids out of range, backend.defer_check) compute their flag inside the graph;
  after each replay the flags, arrays the graph owns, are filed as ordinary deferred checks,
  so a failed check raises the same error as without a graph.
"""
from . import backend


class CaptureError(RuntimeError):
    """The function did something a CUDA graph cannot record."""


class CudaGraph:
    """`graph = CudaGraph(fn)` captures fn() (fn must not read GPU values on the host);
    `graph.replay()` runs the captured work again on the current stream; `graph.outputs` is
    what fn returned during capture (arrays that every replay overwrites)."""

    def __init__(self, fn):
        cupy = backend.cupy
        if not backend.cuda_available():
            raise CaptureError("CUDA graphs need a CUDA GPU with CuPy")
        self.pool = cupy.cuda.MemoryPool()
        self.checks = []
        stream = cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(cupy.cuda.get_current_stream().record())  # after the work queued so far
        with stream, cupy.cuda.using_allocator(self.pool.malloc), backend.capturing_checks(self.checks):
            stream.begin_capture()
            try:
                self.outputs = fn()
            except Exception as error:
                _abandon(stream)
                if isinstance(error, NotImplementedError) and "stream capture" in str(error):
                    raise CaptureError(
                        "an op called cuBLAS through CuPy during CUDA-graph capture; capture needs the "
                        "fast path's kernels (TINYGRAD3_FAST=1 or kernels.set_fast(True)) with float16 "
                        "weights, whose GEMMs go through tinygrad3/kernels/gemm.py") from error
                raise
            self.graph = stream.end_capture()
        self._stream = stream  # kept: the graph was recorded from it

    def replay(self):
        """Queue the captured work on the current stream."""
        self.graph.launch(backend.cupy.cuda.get_current_stream())
        backend.file_checks(self.checks)

    def memory_bytes(self):
        """GPU memory held by the graph's own pool (its intermediates and outputs)."""
        return self.pool.total_bytes()


def _abandon(stream):
    """End a capture that failed part-way, discarding the partial graph."""
    try:
        stream.end_capture()
    except Exception:  # the capture may already be invalidated; nothing is left to undo
        pass
