"""The communicator interface: what data-parallel training needs from a group of ranks.

A communicator connects `world_size` processes (ranks), each holding its own replica of the
model. Every rank must call the same collectives in the same order with arrays of the same
shape and dtype; a rank that skips one leaves the others waiting.

    work = comm.allreduce(grads)          # in place; started, maybe still running
    work.wait()                           # from here on, `grads` holds the sum over ranks
    comm.allreduce_scalars([loss, 1.0])   # small host values -> reduced Python floats
    comm.broadcast(weights, root=0)       # in place: every rank gets rank 0's values
    comm.allgather_object(state)          # [state of rank 0, state of rank 1, ...]
    comm.barrier()

Two implementations share these semantics: `NcclCommunicator` (one GPU per MPI rank, the real
thing) and `InProcessGroup` (ranks as threads of one process, NumPy arrays, for tests).
"""
import numpy as np

from .. import backend

REDUCE_OPS = ("sum", "max", "min")


class Work:
    """A collective that has been started; `wait()` makes its result visible to what follows.

    On a GPU "visible" means ordered on the current CUDA stream (no host sync); a collective
    that completes at once (the in-process stand-in) returns this plain, already-done Work.
    """

    def wait(self):
        pass


class Communicator:
    """Base class: subclasses set `rank`, `world_size`, `local_rank` and implement the collectives."""

    rank = 0
    world_size = 1
    local_rank = 0
    device = "cpu"  # where the arrays of its collectives live ('cuda' for NCCL)

    @property
    def is_main(self):
        """Rank 0: the one that writes logs and checkpoints."""
        return self.rank == 0

    def allreduce(self, array, op="sum"):
        """Reduce `array` element-wise over all ranks, in place, in every rank; returns a Work."""
        raise NotImplementedError

    def broadcast(self, array, root=0):
        """Overwrite `array` in place with rank `root`'s values (done when it returns)."""
        raise NotImplementedError

    def allgather_object(self, obj):
        """A list of every rank's `obj` (small picklable values: loader states, flags), in rank order."""
        raise NotImplementedError

    def barrier(self):
        """Return only once every rank has reached its barrier."""
        raise NotImplementedError

    def abort(self, code=1):
        """Stop every rank after an error on this one (the others may be waiting in a collective)."""
        raise NotImplementedError

    def allreduce_scalars(self, values, op="sum"):
        """Reduce a few host numbers over the ranks (one collective); returns a list of floats.

        float64 keeps sums of per-rank losses (or 0/1 flags) exact enough for any world size.
        """
        buffer = backend.to_device(np.asarray(values, dtype=np.float64).reshape(-1), self.device)
        self.allreduce(buffer, op).wait()
        return [float(v) for v in backend.to_numpy(buffer)]


def check_op(op):
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduction {op!r}: use one of {', '.join(REDUCE_OPS)}")
    return op
