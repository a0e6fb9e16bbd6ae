"""The two builds of the flash kernels, kernel by kernel, on the Gemma 3 270M attention shapes (GPU
of compute capability 9.0): mma.sync (flash_attention.py) against wgmma (flash_attention_sm90.py).

    python bench/flash_builds.py

Shapes: Hq = 4, Hkv = 1, D = 256, (B, T) = (16, 1024), (8, 2048), (4, 4096), window none (causal)
and 512. Each kernel is launched directly with the arguments flash_attention passes (Drow, which
both builds share, is not timed): forward, dQ, dK/dV. Time: CUDA events around 20 back-to-back
launches after one, divided by 20.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinygrad3.kernels import flash_attention as flash  # noqa: E402
from tinygrad3.kernels import flash_attention_sm90 as sm90  # noqa: E402

HQ, HKV, D = 4, 1, 256
ROWS = [(16, 1024, None), (16, 1024, 512), (8, 2048, None), (8, 2048, 512), (4, 4096, 512)]


def mean_ms(cp, fn, n=20):
    fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / n


def row(cp, b, t, window):
    q = cp.random.standard_normal((b, HQ, t, D)).astype(np.float16)
    k, v = (cp.random.standard_normal((b, HKV, t, D)).astype(np.float16) for _ in range(2))
    gy = cp.random.standard_normal((b, HQ, t, D)).astype(np.float16)
    sizes = flash._sizes(HQ, HKV, t, t, 0, window, D ** -0.5, flash._o_strides(HQ, t, D, "bhtd"))
    out, lse = cp.empty_like(q), cp.empty((b, HQ, t), np.float32)
    drow = cp.zeros((b, HQ, t), np.float32)
    gq, gk, gv = cp.empty_like(q), cp.empty_like(k), cp.empty_like(v)
    mma = {
        "forward": lambda: flash._launch(D, "flash_fwd", (HQ, b, -(-t // flash.FWD_BQ)), flash.FWD_THREADS,
                                         (q, k, v, out, lse) + sizes),
        "dQ": lambda: flash._launch(D, "flash_bwd_dq", (HQ, b, -(-t // flash.DQ_BQ)), flash.DQ_THREADS,
                                    (q, k, v, gy, lse, drow, gq) + sizes),
        "dK/dV": lambda: flash._launch(D, "flash_bwd_dkdv", (HKV, b, -(-t // flash.KV_BK)), 128 * flash.kv_split(D),
                                       (q, k, v, gy, lse, drow, gk, gv) + sizes),
    }
    wgmma = {
        "forward": lambda: sm90.forward(q, k, v, out, lse, sizes),
        "dQ": lambda: sm90.backward_dq(q, k, v, gy, lse, drow, gq, sizes),
        "dK/dV": lambda: sm90.backward_dkdv(q, k, v, gy, lse, drow, gk, gv, sizes),
    }
    mma["forward"]()   # a real L for the backward kernels
    return {name: (mean_ms(cp, mma[name]), mean_ms(cp, wgmma[name])) for name in mma}


def main():
    import cupy as cp
    print("| B x T | window | kernel | mma.sync ms | wgmma ms | speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for b, t, window in ROWS:
        for name, (a, w) in row(cp, b, t, window).items():
            print(f"| {b}x{t} | {window or 'none'} | {name} | {a:.3f} | {w:.3f} | {a / w:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
