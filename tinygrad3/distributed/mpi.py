"""MPI's part: which ranks exist, and MpiCommunicator, data parallelism on CPUs over MPI.

`mpirun` starts the processes and sets variables in each that say how many there are; mpi4py
(imported here only) then gives the rank, the world size, the ranks sharing this host, and
transport for small Python objects. On GPUs the arrays go through NCCL instead (nccl.py).
"""
import os

from .comm import Communicator, Work, check_op

# Set by Open MPI's and MPICH's (Hydra) mpirun in every process they start.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_world_size():
    """How many ranks a launcher started (1 for a plain `python ...`)."""
    for var in LAUNCHER_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def mpi_world():
    """mpi4py's COMM_WORLD; None when mpi4py is unusable and no launcher started several ranks.

    A plain `python ...` is a world of one: MPI then initialises as a singleton (no mpirun
    needed), and without mpi4py at all a single rank can still run NCCL.
    """
    try:
        from mpi4py import MPI
    except Exception as e:  # ImportError, or an mpi4py whose MPI library cannot be loaded
        if launched_world_size() > 1:
            raise RuntimeError(f"mpirun started {launched_world_size()} ranks but mpi4py is unusable ({e}); "
                               "pip install mpi4py (built against the MPI whose mpirun you use)") from e
        return None
    return MPI.COMM_WORLD


def host_rank(mpi):
    """(local rank, ranks on this host): MPI's split of `mpi` by shared memory."""
    from mpi4py import MPI

    host = mpi.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return host.Get_rank(), host.Get_size()
    finally:
        host.Free()


class MpiCommunicator(Communicator):
    """CPU ranks whose NumPy arrays MPI itself reduces (GPU runs use NcclCommunicator).

    mpi: an mpi4py communicator, e.g. `mpi_world()`.
    """

    def __init__(self, mpi):
        from mpi4py import MPI

        self.mpi, self._ops = mpi, {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._in_place = MPI.IN_PLACE
        self.rank, self.world_size = mpi.Get_rank(), mpi.Get_size()
        self.local_rank = host_rank(mpi)[0]

    def allreduce(self, array, op="sum"):
        # Reduce to rank 0, then broadcast its result: MPI_Allreduce does not promise the same
        # bits on every rank (its summation order may differ per rank), and the ranks' weights
        # must not drift apart.
        op = self._ops[check_op(op)]
        if self.rank == 0:
            self.mpi.Reduce(self._in_place, array, op=op, root=0)
        else:
            self.mpi.Reduce(array, None, op=op, root=0)
        self.mpi.Bcast(array, root=0)
        return Work()

    def broadcast(self, array, root=0):
        self.mpi.Bcast(array, root=root)

    def allgather_object(self, obj):
        return self.mpi.allgather(obj)

    def barrier(self):
        self.mpi.Barrier()

    def abort(self, code=1):
        self.mpi.Abort(code)
