"""GPU time of the projections that share an input, as separate GEMMs and as one packed GEMM.

    python bench/projection_gemms.py                    # the 270M preset, 16 x 1024 tokens (GPU)
    python bench/projection_gemms.py --tokens 4096

A decoder layer's q, k and v projections read the same normalised input, and so do the MLP's
gate and up projections. Each group can be one GEMM against the weights stacked by rows (they
lie side by side in the optimizer's flat buffer). For each group this times, through
tinygrad3.kernels.gemm (the fast path's cuBLAS calls):
  forward   y = x W^T                         (float16 out)
  dx        dX = G W                          (float16 out; separate: the later GEMMs add into it)
  dW        dW += G^T X                       (float32 buffer, beta 1, as the training step does)
each captured 20 times in one CUDA graph and replayed, so the host's launch cost is not counted.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.config import Gemma3Config  # noqa: E402
from tinygrad3.cuda_graph import CudaGraph  # noqa: E402
from tinygrad3.kernels import gemm  # noqa: E402


def graph_ms(cp, fn, repeats=20, replays=10):
    """Mean GPU ms of fn() from a graph of `repeats` calls, replayed `replays` times."""
    graph = CudaGraph(lambda: [fn() for _ in range(repeats)])
    graph.replay()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / (repeats * replays)


def group_ms(cp, tokens, hidden, outs):
    """(separate ms, packed ms) per pass for projections of widths `outs` from one input."""
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32).astype(np.float16)
    ws = [(rng.standard_normal((o, hidden), dtype=np.float32) * 0.02).astype(np.float16) for o in outs]
    gs = [(rng.standard_normal((tokens, o), dtype=np.float32) * 0.02).astype(np.float16) for o in outs]
    w, g = cp.concatenate(ws), cp.concatenate(gs, axis=1)
    dws = [cp.zeros(wi.shape, np.float32) for wi in ws]
    dw = cp.zeros(w.shape, np.float32)
    dx = cp.empty((tokens, hidden), np.float16)

    def separate_dx():
        gemm.mm(gs[0], ws[0], out=dx)
        for gi, wi in zip(gs[1:], ws[1:]):
            gemm.mm(gi, wi, out=dx)

    passes = {
        "forward": (lambda: [gemm.mm(x, wi, trans_b=True) for wi in ws], lambda: gemm.mm(x, w, trans_b=True)),
        "dx": (separate_dx, lambda: gemm.mm(g, w, out=dx)),
        "dW": (lambda: [gemm.mm(gi, x, trans_a=True, out=d) for gi, d in zip(gs, dws)],
               lambda: gemm.mm(g, x, trans_a=True, out=dw)),
    }
    return {name: (graph_ms(cp, sep), graph_ms(cp, packed)) for name, (sep, packed) in passes.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16 * 1024, help="rows of the GEMMs (batch x block)")
    args = p.parse_args()
    import cupy as cp
    c = Gemma3Config.gemma3_270m()
    groups = {
        "q/k/v": (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                  c.num_key_value_heads * c.head_dim),
        "gate/up": (c.intermediate_size, c.intermediate_size),
    }
    print(f"{args.tokens} tokens, hidden {c.hidden_size}, {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{'group':<8} {'pass':<8} {'separate ms':>12} {'packed ms':>10} {'saved us':>9}")
    total = 0.0
    for name, outs in groups.items():
        for pass_name, (sep, packed) in group_ms(cp, args.tokens, c.hidden_size, outs).items():
            total += sep - packed
            print(f"{name:<8} {pass_name:<8} {sep:12.4f} {packed:10.4f} {1000 * (sep - packed):9.1f}")
    print(f"saved per layer: {1000 * total:.1f} us; per {c.num_hidden_layers}-layer micro-batch: "
          f"{c.num_hidden_layers * total:.3f} ms")


if __name__ == "__main__":
    main()
