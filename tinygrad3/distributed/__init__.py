"""Data-parallel training: one model replica per rank, gradients summed over ranks.

    comm = NcclCommunicator(mpi_world())          # under `mpirun -n N python train.py ...`
    comm = MpiCommunicator(mpi_world())           # the same on CPUs, arrays reduced by MPI
    dp = DataParallel(model.parameters(), comm)   # bucketed all-reduce, overlapped with backward
    allreduce_grad_buffer(comm, optimizer)        # CUDA graphs: the flat gradient buffer, one call

`comm.py` defines the communicator interface; `nccl.py` implements it with NCCL over MPI ranks,
`mpi.py` with MPI alone (CPU ranks) and `threads.py` with threads of one process (the stand-in
the tests use); `data_parallel.py` sums the gradients (in buckets, or the optimizer's flat
buffer). cupy and mpi4py are imported only when a communicator that needs them is made.
"""
from .comm import REDUCE_OPS, Communicator, Work
from .data_parallel import DEFAULT_BUCKET_BYTES, Bucket, DataParallel, allreduce_grad_buffer, broadcast_optimizer
from .mpi import MpiCommunicator, launched_world_size, mpi_world
from .nccl import NcclCommunicator
from .threads import InProcessGroup

__all__ = ["Communicator", "Work", "REDUCE_OPS", "NcclCommunicator", "MpiCommunicator", "InProcessGroup", "mpi_world",
           "launched_world_size", "DataParallel", "Bucket", "DEFAULT_BUCKET_BYTES", "broadcast_optimizer",
           "allreduce_grad_buffer"]
