"""GPU time of each cuBLAS call of one training micro-batch: cuBLAS's own choice against cuBLASLt's candidates.

    python bench/gemm_algos.py                      # the 270M preset, one 16 x 1024 micro-batch (GPU)
    python bench/gemm_algos.py --batch 32 --block 128

Records every tinygrad3.kernels.gemm call of one micro-batch (forward and backward, the fast path
as the graphed training step runs it), then times each distinct call (shapes, transposes, output
type, beta) by cuBLAS's own choice (cublasGemmStridedBatchedEx, CUBLAS_GEMM_DEFAULT) and by each
algorithm cuBLASLt's heuristic proposes for it (kernels/gemm_lt.py's candidates, same workspace),
with CUDA events over --repeats calls. It prints how much of the micro-batch's GEMM time the best
algorithm per shape saves, and which calls the library times for itself (the others keep cuBLAS's).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throughput import Ours, random_batches  # noqa: E402
import nn  # noqa: E402
from models.config import Gemma3Config  # noqa: E402
from tinygrad3 import backend, kernels  # noqa: E402
from tinygrad3.kernels import gemm, gemm_lt  # noqa: E402


def record_calls(config, batch, block):
    """{call key: count} of gemm's cuBLAS calls in one micro-batch of the graphed step's first (eager) run."""
    calls = {}
    original = gemm._Blas.gemm

    def recording(self, a, b, c, p, alpha, beta):
        key = (tuple(sorted(p.items())), str(c.dtype), float(alpha), float(beta))
        calls[key] = calls.get(key, 0) + 1
        return original(self, a, b, c, p, alpha, beta)

    ours = Ours(config, "cuda", 0)
    cp = ours.xp
    x, y = random_batches(np.random.default_rng(0), config, (batch, block, 1))[0]
    gemm._Blas.gemm = recording
    try:
        with kernels.fast(True, kernels.FAMILIES):
            ours.update([(cp.asarray(x), cp.asarray(y))], nn.GraphedMicroBatch(ours.micro_loss, ours.opt))
    finally:
        gemm._Blas.gemm = original
    return calls


def time_ms(cp, fn, repeats):
    for _ in range(3):
        fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / repeats


worth_timing = gemm_lt.worth_timing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gemma3_270m", choices=Gemma3Config.PRESETS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    cp = backend.cupy
    calls = record_calls(Gemma3Config.preset(args.preset), args.batch, args.block)
    blas = gemm._blas(cp.cuda.Device().id)
    stream = cp.cuda.get_current_stream().ptr
    total_now = total_best = 0.0
    print("| calls | m x n x k (cuBLAS's column-major) | ta tb | batch | C | beta | cuBLAS ms | Lt #0 ms | best ms "
          "(candidate of n) | timed by the library |\n|---:|---|---|---:|---|---:|---:|---:|---:|---|")
    for key, count in sorted(calls.items(), key=lambda kv: -kv[1]):
        p, c_dtype, alpha, beta = dict(key[0]), np.dtype(key[1]), key[2], key[3]
        rng = cp.random.default_rng(0)
        size_a = p["stride_a"] * (p["batch"] - 1) + p["lda"] * (p["k"] if p["transa"] == gemm.OP_N else p["m"])
        size_b = p["stride_b"] * (p["batch"] - 1) + p["ldb"] * (p["n"] if p["transb"] == gemm.OP_N else p["k"])
        ga = rng.standard_normal(size_a, dtype=np.float32).astype(np.float16)  # cuBLAS's A: gemm's b
        gb = rng.standard_normal(size_b, dtype=np.float32).astype(np.float16)
        gc = cp.zeros(p["stride_c"] * p["batch"], c_dtype)
        timed = gemm_lt.worth_timing(p, beta)
        gemm_lt.worth_timing = lambda p, beta: False   # cuBLAS's own call
        try:
            now = time_ms(cp, lambda: blas.gemm(gb, ga, gc, p, alpha, beta), args.repeats)
        finally:
            gemm_lt.worth_timing = worth_timing
        c_type = gemm.CUDA_R_16F if c_dtype == np.float16 else gemm.CUDA_R_32F
        al, be = np.array([alpha], np.float32), np.array([beta], np.float32)
        times = []
        for plan in blas.tuner.candidates(p, c_type):
            try:
                times.append(time_ms(cp, lambda: blas.tuner.matmul(plan, al, ga.data.ptr, gb.data.ptr, be,
                                                                   gc.data.ptr, stream), args.repeats))
            except RuntimeError:
                times.append(float("inf"))
        best = min(range(len(times)), key=times.__getitem__)
        total_now += count * now
        total_best += count * min(now, times[best])
        print(f"| {count} | {p['m']} x {p['n']} x {p['k']} | {'NT'[p['transa']]} {'NT'[p['transb']]} | {p['batch']} "
              f"| {c_dtype} | {beta:g} | {now:.4f} | {times[0]:.4f} | {times[best]:.4f} ({best} of {len(times)}) "
              f"| {'yes' if timed else 'no'} |", flush=True)
    print(f"\nper micro-batch: now {total_now:.3f} ms, best of each {total_best:.3f} ms, "
          f"saved {total_now - total_best:.3f} ms")


if __name__ == "__main__":
    main()
