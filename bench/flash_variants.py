"""The flash_attention kernel variants (flash_attention.VARIANTS) against each other on a GPU.

    python bench/flash_variants.py [--repeats 50] [--warmup 5] [--variants default,kv_roles]

Gemma 3 270M shapes: B = 16, T = 1024, Hq = 4, Hkv = 1, D = 256, scale 256**-0.5, O and dO in
(B, T, Hq, D) (out_layout="bthd"), window 512 (15 of the 18 layers) and causal (3). Per variant
(flash_attention.VARIANT switched in this process: the launches read it, each variant is its own
build): the median over --repeats runs, after --warmup runs, of CUDA events around the forward,
the forward + backward, and each backward kernel (events around each launch inside backward).
"270M" sums 15 window + 3 causal layers (one 16 x 1024 micro-batch). Inputs: random, drawn anew on
every run of the script, the same for every variant; "rel diff" is each variant's largest
|output - default's| over the largest |default's| (O, dQ, dK, dV; O and dQ should be 0).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cupy as cp  # noqa: E402

from tinygrad3.kernels import flash_attention as flash  # noqa: E402

B, T, HQ, HKV, D = 16, 1024, 4, 1, 256
KERNELS = ("flash_bwd_drow", "flash_bwd_dq", "flash_bwd_dkdv")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", default=",".join(flash.VARIANTS))
    args = ap.parse_args()
    variants = args.variants.split(",")
    if "default" not in variants:
        variants.insert(0, "default")

    launches = []   # (name, start event, end event) of the backward kernels of the current call
    plain_launch = flash._launch

    def timed_launch(d, name, grid, threads, fargs):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        plain_launch(d, name, grid, threads, fargs)
        end.record()
        launches.append((name, start, end))

    flash._launch = timed_launch
    rng = np.random.default_rng()
    scale = D ** -0.5
    rows = []
    for mask, window in (("window", 512), ("causal", None)):
        q = cp.asarray(rng.standard_normal((B, HQ, T, D)).astype(np.float16))
        k, v = (cp.asarray(rng.standard_normal((B, HKV, T, D)).astype(np.float16)) for _ in range(2))
        gy = cp.asarray(rng.standard_normal((B, T, HQ, D)).astype(np.float16))
        reference = None
        for variant in variants:
            flash.VARIANT = variant
            fwd = lambda: flash.forward(q, k, v, scale, window, 0, "bthd")  # noqa: E731

            def step():
                out, lse = fwd()
                return (out,) + flash.backward(gy, q, k, v, out, lse, scale, window, 0, out_layout="bthd")

            times = {"fwd": [], "fwd+bwd": [], **{n: [] for n in KERNELS}}
            for i in range(args.warmup + args.repeats):
                for what, fn in (("fwd", fwd), ("fwd+bwd", step)):
                    launches.clear()
                    start, end = cp.cuda.Event(), cp.cuda.Event()
                    start.record()
                    result = fn()
                    end.record()
                    end.synchronize()
                    if i < args.warmup:
                        continue
                    times[what].append(cp.cuda.get_elapsed_time(start, end))
                    if what == "fwd+bwd":
                        for name, s, e in launches:
                            if name in times:
                                times[name].append(cp.cuda.get_elapsed_time(s, e))
            outputs = [cp.asnumpy(x).astype(np.float64) for x in result]
            if reference is None:
                reference = outputs
            diff = [np.abs(a - r).max() / np.abs(r).max() for a, r in zip(outputs, reference)]
            rows.append((variant, mask, {n: float(np.median(t)) for n, t in times.items()}, diff))
    flash._launch = plain_launch

    cols = ("fwd", "fwd+bwd") + KERNELS
    print(f"B={B} T={T} Hq={HQ} Hkv={HKV} D={D} bthd; ms per call, median of {args.repeats}; 270M = 15 window + 3 causal")
    print(f"{'variant':12} {'mask':7} " + " ".join(f"{c.replace('flash_bwd_', ''):>8}" for c in cols)
          + "   rel diff vs default (O, dQ, dK, dV)")
    for variant, mask, t, diff in rows:
        print(f"{variant:12} {mask:7} " + " ".join(f"{t[c]:8.3f}" for c in cols)
              + "   " + " ".join(f"{x:.1e}" for x in diff))
    for variant in variants:
        t = {m: tt for v, m, tt, _ in rows if v == variant}
        print(f"{variant:12} {'270M':7} " + " ".join(f"{15 * t['window'][c] + 3 * t['causal'][c]:8.3f}" for c in cols))


if __name__ == "__main__":
    main()
