"""Data-parallel training: one model replica per rank, gradients summed over ranks.

    comm = NcclCommunicator(mpi_world())          # under `mpirun -n N python train.py ...`
    dp = DataParallel(model.parameters(), comm)   # bucketed all-reduce, overlapped with backward

`comm.py` defines the communicator interface; `nccl.py` implements it with NCCL over MPI ranks,
`threads.py` with threads of one process (the CPU stand-in the tests use); `data_parallel.py`
does the bucketing. cupy and mpi4py are imported only when an NcclCommunicator is made.
"""
from .comm import REDUCE_OPS, Communicator, Work
from .data_parallel import DEFAULT_BUCKET_BYTES, Bucket, DataParallel, broadcast_optimizer
from .nccl import NcclCommunicator, launched_world_size, mpi_world
from .threads import InProcessGroup

__all__ = ["Communicator", "Work", "REDUCE_OPS", "NcclCommunicator", "InProcessGroup", "mpi_world",
           "launched_world_size", "DataParallel", "Bucket", "DEFAULT_BUCKET_BYTES", "broadcast_optimizer"]
