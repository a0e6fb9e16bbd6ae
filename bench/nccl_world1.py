"""On one GPU: data-parallel training through real NCCL at world size 1 equals plain train.py.

    python bench/nccl_world1.py                                   # MPI singleton if mpi4py works
    mpirun -n 1 --allow-run-as-root python bench/nccl_world1.py   # the same, started by mpirun
    python bench/nccl_world1.py --no-mpi                          # NCCL alone, no MPI at all

For each compute dtype it trains the tiny preset on the synthetic stories from the same seed:
plain train.py twice (A and B: how far two identical runs drift apart on this GPU; the embedding
backward adds with atomics, so they need not be bitwise equal), and once as rank 0 of a one-rank
NCCL group: leaf hooks, several buckets, all-reduces on the communication stream, the
per-update loss/skip all-reduce and the eval reduction, all live. At world size 1 the reduction
is the identity, so the distributed run must match A as closely as B does: same loss on the
first update to the bit, and no larger difference than A vs B anywhere after it (plus 1e-6).
Exit status 0 when every check passes.
"""
import argparse
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

DATA = os.path.join(ROOT, "data", "synthetic")  # ignored by git: carry it (python -m data.synthetic --out ...)

KEYS = ("loss", "grad_norm", "scale", "train", "validation")


def run(out, dtype, comm=None):
    args = train.parse_args(["--preset", "tiny", "--device", "cuda", "--dtype", dtype, "--data", DATA,
                             "--out", out, "--batch-size", "8", "--block-size", "64", "--grad-accum", "2",
                             "--max-updates", "8", "--eval-every", "4", "--eval-batches", "4", "--lr", "3e-3",
                             "--warmup", "2", "--no-progress", "--bucket-mb", "0.5"])
    trainer = train.Trainer(args, comm)
    buckets = len(trainer.dp.buckets) if trainer.dp is not None else 0
    assert trainer.run() == 0
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records, backend.to_numpy(trainer.optimizer.master).astype(np.float64), buckets


def differences(a, b):
    """Largest |a - b| per logged quantity, and the relative L2 difference of the master weights."""
    (ra, ma, _), (rb, mb, _) = a, b
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


def seconds_per_update(result):
    seconds = [r["seconds"] for r in result[0] if r["kind"] == "update"][1:]  # the first compiles kernels
    return float(np.median(seconds))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-mpi", action="store_true", help="make the NCCL communicator without MPI")
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    args = p.parse_args()
    if not is_prepared(DATA):
        sys.exit(f"no prepared data in {DATA}: run `python -m data.synthetic --out data/synthetic` and bring it along")
    comm = distributed.NcclCommunicator(None if args.no_mpi else distributed.mpi_world())
    from cupy.cuda import nccl
    print(f"rank {comm.rank} of {comm.world_size}, GPU {comm.gpu}, NCCL {nccl.get_version()}, "
          f"MPI: {'no' if comm.mpi is None else 'yes'}")
    if comm.world_size != 1:
        sys.exit("this check is for world size 1: run it as `python ...` or `mpirun -n 1 ...`")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            plain_a = run(os.path.join(tmp, f"{dtype}-a"), dtype)
            plain_b = run(os.path.join(tmp, f"{dtype}-b"), dtype)
            dist = run(os.path.join(tmp, f"{dtype}-nccl"), dtype, comm)
            noise, got = differences(plain_a, plain_b), differences(plain_a, dist)
            checks = {"first update's loss bitwise equal": got["first_loss_equal"],
                      "same updates skipped": got["skipped"]}
            for key in KEYS + ("masters",):
                checks[f"{key}: |nccl - A| {got[key]:.3g} <= |B - A| {noise[key]:.3g} + 1e-6"] = \
                    got[key] <= noise[key] + 1e-6
            print(f"\n{dtype}: {dist[2]} buckets; seconds per update: plain {seconds_per_update(plain_a):.4f}, "
                  f"nccl {seconds_per_update(dist):.4f}; bitwise equal to A: "
                  f"{all(got[k] == 0 for k in KEYS + ('masters',))}")
            for name, passed in checks.items():
                print(f"  {'ok  ' if passed else 'FAIL'} {name}")
                ok &= bool(passed)
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
