"""InProcessGroup: N ranks as N threads of one process, a stand-in for NCCL in tests.

It offers the communicator interface with the same semantics as `NcclCommunicator`, on NumPy
arrays. Each collective is a rendezvous on one shared barrier: every rank posts its array and
waits for the others; each then computes the result itself, waits again (so that no rank
overwrites its array while another still reads it) and writes its own array. Reductions fold
the posted arrays left to right in rank order, ((a0 + a1) + a2) + a3, so every rank gets the
same bits, run after run, and a sum equals what one process gets by accumulating the ranks'
contributions in that order. Nothing overlaps here, but an all-reduce writes its result into the
caller's array only at `Work.wait()`, as NCCL's result becomes visible to the caller's stream only
then: code that forgets to wait reads its own unreduced values here too, and its tests fail.

    group = InProcessGroup(4)
    losses = group.run(lambda comm: train_one_update(comm))   # one thread per rank, in rank order
"""
import copy
import functools
import threading

import numpy as np

from .comm import Communicator, Work, check_op

_FOLD = {"sum": np.add, "max": np.maximum, "min": np.minimum}


class InProcessGroup:
    """`world_size` communicators that talk through shared memory; `run` drives one thread per rank.

    timeout: seconds a rank waits at a collective before giving up (a rank that never arrives
    is a bug in the caller; the stand-in reports it instead of hanging the test run).
    """

    def __init__(self, world_size, timeout=120.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._posted = [None] * world_size
        self.comms = [ThreadCommunicator(self, rank) for rank in range(world_size)]

    def run(self, fn, *args):
        """Call `fn(comm, *args)` in one thread per rank; return the results in rank order.

        An exception in one rank breaks the barrier, so the other ranks stop at their next
        collective instead of waiting forever; the first real error is re-raised here.
        """
        results, errors = [None] * self.world_size, [None] * self.world_size

        def main(rank):
            try:
                results[rank] = fn(self.comms[rank], *args)
            except BaseException as e:  # noqa: B036 (re-raised in the caller's thread)
                errors[rank] = e
                self._barrier.abort()

        threads = [threading.Thread(target=main, args=(rank,), name=f"rank{rank}")
                   for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        raised = [e for e in errors if e is not None]
        causes = [e for e in raised if not isinstance(e, threading.BrokenBarrierError)]
        if raised:
            raise (causes or raised)[0]
        return results

    def _post(self, rank, value):
        """Publish this rank's value; returns everyone's once all ranks have posted."""
        self._posted[rank] = value
        self._barrier.wait()
        return list(self._posted)

    def _done_reading(self):
        self._barrier.wait()


class ThreadCommunicator(Communicator):
    """One rank of an InProcessGroup (made by the group; see the module docstring)."""

    def __init__(self, group, rank):
        self._group = group
        self.rank, self.world_size, self.local_rank = rank, group.world_size, rank

    def allreduce(self, array, op="sum"):
        fold = _FOLD[check_op(op)]
        arrays = self._group._post(self.rank, array)
        _check_alike(arrays)
        result = functools.reduce(fold, arrays)  # a new array unless world_size == 1
        self._group._done_reading()
        return _Pending(array, result)

    def broadcast(self, array, root=0):
        arrays = self._group._post(self.rank, array)
        _check_alike(arrays)
        if self.rank != root:  # only root's array is read, and root does not write it
            array[...] = arrays[root]
        self._group._done_reading()

    def allgather_object(self, obj):
        objects = [copy.deepcopy(o) for o in self._group._post(self.rank, obj)]
        self._group._done_reading()
        return objects

    def barrier(self):
        self._group._barrier.wait()

    def abort(self, code=1):
        self._group._barrier.abort()


class _Pending(Work):
    """An all-reduce whose result the caller's array receives at wait() (module docstring)."""

    def __init__(self, array, result):
        self._array, self._result = array, result

    def wait(self):
        if self._array is not None:
            self._array[...] = self._result
            self._array = self._result = None


def _check_alike(arrays):
    """Every rank posted an array of the same shape and dtype (NCCL would hang or read garbage)."""
    first = arrays[0]
    for rank, array in enumerate(arrays):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"rank {rank} passed {type(array).__name__}; the in-process group reduces NumPy arrays")
        if array.shape != first.shape or array.dtype != first.dtype:
            raise ValueError(f"ranks disagree on a collective: rank 0 has {first.dtype} {first.shape}, "
                             f"rank {rank} has {array.dtype} {array.shape}")
