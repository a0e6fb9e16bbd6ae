"""On one GPU: data-parallel training through real NCCL at world size 1 equals plain train.py.

    python bench/nccl_world1.py                                   # MPI singleton if mpi4py works
    mpirun -n 1 --allow-run-as-root python bench/nccl_world1.py   # the same, started by mpirun
    python bench/nccl_world1.py --no-mpi                          # NCCL alone, no MPI at all

It trains the tiny preset on the synthetic stories from the same seed on three kernel paths:
float16 on the fast path without CUDA graphs, float32 on the reference path (both summed by
DataParallel's buckets), and float16 with CUDA graphs (summed by allreduce_grad_buffer, one
all-reduce of the optimizer's flat buffer per update). For each: plain train.py twice (A and B:
how far two identical runs drift apart on this GPU; the embedding backward adds with atomics, so
they need not be bitwise equal), and once with --distributed as rank 0 of a one-rank NCCL group:
the gradient all-reduces on the communication stream, the per-update loss/skip all-reduce and the
eval reduction, all live. At world size 1 the reduction is the identity, so the distributed run
must match the plain runs about as closely as they match each other: same loss on the first update
to the bit, and after it, for the nearer of A and B, no more than NOISE (4) times the A vs B
difference plus FLOOR (1e-4; 2e-4 for the masters). It
also checks that the distributed run took the same kernel path as A and that every update reduced
each gradient exactly once, in the way its path does it. One PASS/FAIL line per check, a summary
line, exit status 1 when any check fails.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared machines
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from data.meta import is_prepared  # noqa: E402
from tinygrad3 import backend, distributed  # noqa: E402

# Two plain fp16 runs differ a little (the embedding gradient's float32 atomics add in any order),
# and the NCCL run is a third sample of that spread. On the H200 the spread of the masters over 8
# updates with graphs is two-valued, about 1e-5 or about 8e-5 of relative L2 between any two runs
# (plain or not), so the NCCL run is compared with the nearer of A and B, within a multiple of
# |B - A| plus a floor: 1e-4 for the logged numbers (losses near 10), 2e-4 for the masters. A wrong
# reduction (a missed sum, garbage) moves the masters by 1e-3 or more, and a scaled one (AdamW and
# the clip hide a factor) shows in grad_norm. That the world-1 all-reduce keeps every bit of the
# buffer is tests/test_cuda_graph.py's job.
NOISE, FLOOR = 4, (1e-4, 2e-4)
DATA = os.path.join(ROOT, "data", "synthetic")  # ignored by git: carry it (python -m data.synthetic --out ...)
UPDATES = 8
KEYS = ("loss", "grad_norm", "scale", "train", "validation")
# name: (train.py flags, whether the path uses CUDA graphs)
PATHS = {"fp16-fast": (["--dtype", "float16", "--no-cuda-graphs"], False),
         "fp32-reference": (["--dtype", "float32"], False),
         "fp16-graphs": (["--dtype", "float16", "--cuda-graphs"], True)}


class CountingComm:
    """Wraps the communicator's allreduce to record (dtype, size) of every call."""

    def __init__(self, comm):
        self.calls, self._allreduce = [], comm.allreduce
        comm.allreduce = self

    def __call__(self, array, op="sum"):
        self.calls.append((array.dtype.name, int(array.size)))
        return self._allreduce(array, op)


def run(out, flags, comm=None):
    """Train; (log records, float64 masters, trainer, gradient all-reduce calls or None)."""
    argv = ["--preset", "tiny", "--device", "cuda", "--data", DATA, "--out", out, "--batch-size", "8",
            "--block-size", "64", "--grad-accum", "2", "--max-updates", str(UPDATES), "--eval-every", "4",
            "--eval-batches", "4", "--lr", "3e-3", "--warmup", "2", "--no-progress", "--bucket-mb", "0.5",
            *flags, *(["--distributed"] if comm is not None else [])]
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            args = train.parse_args(argv)
    except SystemExit:
        raise RuntimeError(f"train.py refused {' '.join(flags)}: {refused.getvalue().strip().splitlines()[-1]}")
    counter = CountingComm(comm) if comm is not None else None
    try:
        trainer = train.setup(args, comm)
        assert trainer.run() == 0
    finally:
        if counter is not None:
            del comm.allreduce  # the communicator's own method again
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # float64 calls are allreduce_scalars (losses, skip flags, evals); the others carry gradients
    grads = None if counter is None else [call for call in counter.calls if call[0] != "float64"]
    return records, backend.to_numpy(trainer.optimizer.master).astype(np.float64), trainer, grads


def differences(a, b):
    """Largest |a - b| per logged quantity, and the relative L2 difference of the master weights."""
    (ra, ma, _, _), (rb, mb, _, _) = a, b
    assert [r["kind"] for r in ra] == [r["kind"] for r in rb]
    diff = {}
    for key in KEYS:
        pairs = [(x[key], y[key]) for x, y in zip(ra, rb) if x.get(key) is not None and y.get(key) is not None]
        diff[key] = max((abs(x - y) for x, y in pairs), default=0.0)
    diff["masters"] = float(np.linalg.norm(ma - mb) / np.linalg.norm(ma))
    diff["first_loss_equal"] = ra[0]["loss"] == rb[0]["loss"]
    diff["skipped"] = [r.get("skipped") for r in ra if r["kind"] == "update"] == \
                      [r.get("skipped") for r in rb if r["kind"] == "update"]
    return diff


def reduction_check(dist, graphs):
    """(passed, description): how the distributed run summed its gradients, update by update."""
    _, _, trainer, calls = dist
    n = trainer.optimizer.num_params
    if graphs:
        expected = [("float32", n)] * UPDATES
        return calls == expected, (f"one float32 all-reduce of the {n} flat gradients per update "
                                   f"(allreduce_grad_buffer), no other: got {len(calls)} gradient all-reduces "
                                   f"of {sum(size for _, size in calls)} values in {UPDATES} updates")
    buckets = len(trainer.runner.dp.buckets) if hasattr(trainer.runner, "dp") else 0
    sizes = [b.buffer.size for b in trainer.runner.dp.buckets] * UPDATES if buckets else []
    passed = buckets > 1 and sorted(size for _, size in calls) == sorted(sizes) and sum(sizes) == UPDATES * n
    return passed, (f"every update all-reduced each of its {buckets} DataParallel buckets once ({n} gradients): "
                    f"got {len(calls)} gradient all-reduces of {sum(size for _, size in calls)} values "
                    f"in {UPDATES} updates")


def seconds_per_update(result):
    seconds = [r["seconds"] for r in result[0] if r["kind"] == "update"][1:]  # the first compiles kernels
    return float(np.median(seconds))


def check_path(name, tmp, comm):
    """The checks of one kernel path: a dict description -> passed."""
    flags, graphs = PATHS[name]
    plain_a = run(os.path.join(tmp, f"{name}-a"), flags)
    plain_b = run(os.path.join(tmp, f"{name}-b"), flags)
    dist = run(os.path.join(tmp, f"{name}-nccl"), flags, comm)
    noise, got, to_b = differences(plain_a, plain_b), differences(plain_a, dist), differences(plain_b, dist)
    kernels_a, kernels_d = plain_a[2].args.kernels, dist[2].args.kernels
    checks = {f"same kernel path as A ({train.describe_kernels(kernels_d)}; CUDA graphs: {graphs})":
              kernels_a == kernels_d and kernels_d["cuda_graphs"] == graphs}
    passed, description = reduction_check(dist, graphs)
    checks[description] = passed
    checks["first update's loss bitwise equal"] = got["first_loss_equal"]
    checks["same updates skipped"] = got["skipped"]
    for key in KEYS + ("masters",):  # the NCCL run is one more sample of the plain runs' spread
        floor, nearest = FLOOR[key == "masters"], min(got[key], to_b[key])
        checks[f"{key}: nearest plain run {nearest:.3g} <= {NOISE} x |B - A| {noise[key]:.3g} + {floor:g}"] = \
            nearest <= NOISE * noise[key] + floor
    print(f"\n{name}: seconds per update: plain {seconds_per_update(plain_a):.4f}, nccl "
          f"{seconds_per_update(dist):.4f}; bitwise equal to A: {all(got[k] == 0 for k in KEYS + ('masters',))}")
    print(f"{name}: the spread, masters' relative L2: |B - A| {noise['masters']:.3g}, |nccl - A| "
          f"{got['masters']:.3g}, |nccl - B| {to_b['masters']:.3g}")
    return checks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-mpi", action="store_true", help="make the NCCL communicator without MPI")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="kernel paths to check")
    args = p.parse_args()
    if not is_prepared(DATA):
        sys.exit(f"no prepared data in {DATA}: run `python -m data.synthetic --out data/synthetic` and bring it along")
    comm = distributed.NcclCommunicator(None if args.no_mpi else distributed.mpi_world())
    from cupy.cuda import nccl
    print(f"rank {comm.rank} of {comm.world_size}, GPU {comm.gpu}, NCCL {nccl.get_version()}, "
          f"MPI: {'no' if comm.mpi is None else 'yes'}")
    if comm.world_size != 1:
        sys.exit("this check is for world size 1: run it as `python ...` or `mpirun -n 1 ...`")
    failed = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.paths:
            try:
                checks = check_path(name, tmp, comm)
            except Exception as e:  # noqa: BLE001 (a failed check; the other paths still run)
                checks = {f"training failed: {type(e).__name__}: {e}": False}
            for description, passed in checks.items():
                print(f"{'PASS' if passed else 'FAIL'} {name}: {description}")
                total += 1
                failed += not passed
    print(f"\nPASS: all {total} checks" if not failed else f"\nFAIL: {failed} of {total} checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
