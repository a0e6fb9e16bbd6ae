"""NcclCommunicator: one GPU per MPI rank; NCCL moves the arrays, MPI only starts things.

Start-up, as Chainer's multi-node extension did it: `mpirun` starts the ranks; MPI tells each
its rank, the world size and which ranks share its host (the local rank picks the GPU). Rank 0
asks NCCL for a unique id and MPI broadcasts it; with that id every rank joins one NCCL
communicator, which carries all array traffic (NVLink/PCIe inside a host, InfiniBand or sockets
between hosts). MPI afterwards carries only small Python objects and barriers.

Overlap: collectives run on a CUDA stream of their own. Each first waits for the work already
queued on the caller's stream (which wrote the gradients it reduces), and `Work.wait()` makes the
caller's stream wait for it in turn: the backward kernels go on while NCCL moves a bucket, and
the host never blocks. cupy is imported only when a communicator is made (mpi4py: see mpi.py).
"""
from .comm import Communicator, Work, check_op
from .mpi import host_rank


class NcclCommunicator(Communicator):
    """A rank of an NCCL communicator over MPI's ranks (see the module docstring).

    mpi: an mpi4py communicator (normally `mpi_world()`); None makes a world of one without MPI.
        Kept as `.mpi` (None or the communicator).
    gpu: the device to use; default: the local rank (or 0 when each rank sees a single GPU,
        e.g. with CUDA_VISIBLE_DEVICES set per rank). Create it before anything touches the GPU.
    """

    device = "cuda"

    def __init__(self, mpi=None, gpu=None):
        import cupy
        from cupy.cuda import nccl

        if not nccl.available:
            raise RuntimeError("CuPy cannot load NCCL: install the NCCL wheel for its CUDA "
                               "(nvidia-nccl-cu12 or nvidia-nccl-cu13)")
        self._cupy, self._nccl, self.mpi = cupy, nccl, mpi
        if mpi is None:
            self.rank, self.world_size, self.local_rank, local_size = 0, 1, 0, 1
        else:
            self.rank, self.world_size = mpi.Get_rank(), mpi.Get_size()
            self.local_rank, local_size = host_rank(mpi)
        self.gpu = self._pick_gpu(gpu, local_size)
        cupy.cuda.Device(self.gpu).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        if mpi is not None:
            uid = mpi.bcast(uid, root=0)
        self._comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._dtypes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
                        "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}

    def _pick_gpu(self, gpu, local_size):
        count = self._cupy.cuda.runtime.getDeviceCount()
        if gpu is not None:
            return int(gpu)
        if count == 1:
            return 0
        if local_size > count:
            raise RuntimeError(f"{local_size} ranks on this host but only {count} GPUs: "
                               "start at most one rank per GPU")
        return self.local_rank

    # ----- collectives ---------------------------------------------------------------------------
    def allreduce(self, array, op="sum"):
        op = self._ops[check_op(op)]
        stream = self._after_callers_work(array)
        self._comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._dtype(array), op, stream.ptr)
        return _StreamWork(self._cupy, stream.record(), array)

    def broadcast(self, array, root=0):
        stream = self._after_callers_work(array)
        self._comm.bcast(array.data.ptr, array.size, self._dtype(array), root, stream.ptr)
        _StreamWork(self._cupy, stream.record(), array).wait()

    def allgather_object(self, obj):
        return [obj] if self.mpi is None else self.mpi.allgather(obj)

    def barrier(self):
        if self.mpi is not None:
            self.mpi.Barrier()

    def abort(self, code=1):
        if self.mpi is not None:
            self.mpi.Abort(code)

    # ----- helpers -------------------------------------------------------------------------------
    def _after_callers_work(self, array):
        """The communication stream, made to wait for what the caller's stream has queued so far."""
        if not isinstance(array, self._cupy.ndarray) or not array.flags.c_contiguous:
            raise TypeError(f"NCCL collectives need a contiguous CuPy array, got {type(array).__name__}")
        if array.device.id != self.gpu:
            raise ValueError(f"array is on GPU {array.device.id}, this rank uses GPU {self.gpu}")
        self._stream.wait_event(self._cupy.cuda.get_current_stream().record())
        return self._stream

    def _dtype(self, array):
        try:
            return self._dtypes[array.dtype.name]
        except KeyError:
            raise TypeError(f"no NCCL reduction for dtype {array.dtype}") from None


class _StreamWork(Work):
    """A collective queued on the communication stream; it holds the array until waited for.

    Holding it matters: freed early, CuPy's pool could hand the memory to a new array on the
    caller's stream while NCCL still writes it.
    """

    def __init__(self, cupy, done, array):
        self._cupy, self._done, self._array = cupy, done, array

    def wait(self):
        self._cupy.cuda.get_current_stream().wait_event(self._done)
        self._array = None
