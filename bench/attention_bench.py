"""Attention on the GPU, kernel against kernel: forward and forward+backward time and peak memory.

    python bench/attention_bench.py                       # the table, on the Gemma 3 270M shapes
    python bench/attention_bench.py --repeats 50 --rows 16x1024

Shapes: Hq = 4 query heads, Hkv = 1 kv head, D = 256, scale 256**-0.5, for (B, T) = (16, 1024)
and (32, 128), with window 512 (the sliding-window layers) and none (the full-attention layers).
Sides, all float16 in and out:
  flash_attention  our fused kernels (tinygrad3/kernels/flash_attention.py), O and dO (B, Hq, T, D)
  flash +T         the same plus what the model paid for that layout before out_layout="bthd": O
                   transposed into a (B, T, Hq, D) copy for o_proj (kept, as o_proj saves it), and
                   dO arriving as the transposed view of a (B, T, Hq, D) gradient (the kernels'
                   backward copies it)
  flash bthd       the kernels with O and dO in (B, T, Hq, D) (out_layout="bthd"): what the model
                   runs now, no copies
  attention        our cuBLAS GEMMs + fused masked softmax (tinygrad3/kernels/attention.py)
  torch sdpa       torch.nn.functional.scaled_dot_product_attention (is_causal=True; with a
                   window, an explicit boolean mask, which rules out torch's flash backend);
                   skipped when torch with CUDA is not installed
Our families are called at the kernel level (their forward/backward functions on CuPy arrays),
torch's SDPA on tensors that require grad; neither side pays for an autograd graph of ours.

Times: CUDA events around each call, the median of --repeats runs after --warmup runs (which
also compile our kernels). "fwd" is the forward alone (writing what the backward needs: our L or
P, torch's saved tensors); "fwd+bwd" is the forward then the backward for a random dO.
Peak extra memory: the most bytes held at once during one fwd+bwd beyond the inputs and dO
(outputs, saved tensors, gradients, temporaries), from a CuPy memory hook for ours and from
torch.cuda.max_memory_allocated for torch.
"""
import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinygrad3 import backend  # noqa: E402
from tinygrad3.kernels import attention, flash_attention  # noqa: E402

HQ, HKV, D = 4, 1, 256
WINDOWS = (512, None)
ROWS = {"16x1024": (16, 1024), "32x128": (32, 128)}
MIB = 2 ** 20


def median_ms(run, warmup, repeats, start, end, elapsed):
    """Median of `repeats` timings (ms) of run(), each between two events."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return float(np.median(times))


def ours(cp, side, b, t, window, args):
    """fwd ms, fwd+bwd ms, peak extra bytes of one of our sides."""
    rng = np.random.default_rng(0)
    q = cp.asarray(rng.standard_normal((b, HQ, t, D)).astype(np.float16))
    k, v = (cp.asarray(rng.standard_normal((b, HKV, t, D)).astype(np.float16)) for _ in range(2))
    gy = cp.asarray(rng.standard_normal((b, HQ, t, D)).astype(np.float16))
    gy_bthd = cp.ascontiguousarray(gy.transpose(0, 2, 1, 3))
    scale = D ** -0.5
    if side == "flash_attention":
        forward = lambda: flash_attention.forward(q, k, v, scale, window, 0)  # noqa: E731
        both = lambda: flash_attention.backward(gy, q, k, v, *forward(), scale, window, 0)  # noqa: E731
    elif side == "flash +T":
        def forward():
            out, lse = flash_attention.forward(q, k, v, scale, window, 0)
            return cp.ascontiguousarray(out.transpose(0, 2, 1, 3)), out, lse

        def both():
            copy, out, lse = forward()   # the copy lives on through the backward, as o_proj's input
            return flash_attention.backward(gy_bthd.transpose(0, 2, 1, 3), q, k, v, out, lse, scale, window, 0), copy
    elif side == "flash bthd":
        forward = lambda: flash_attention.forward(q, k, v, scale, window, 0, "bthd")  # noqa: E731

        def both():
            return flash_attention.backward(gy_bthd, q, k, v, *forward(), scale, window, 0, out_layout="bthd")
    else:
        forward = lambda: attention.forward(q, k, v, scale, window, 0)  # noqa: E731
        both = lambda: attention.backward(gy, q, k, v, forward()[1], scale, window, 0)  # noqa: E731
    events = cp.cuda.Event(), cp.cuda.Event()
    fwd = median_ms(forward, args.warmup, args.repeats, *events, cp.cuda.get_elapsed_time)
    fwd_bwd = median_ms(both, args.warmup, args.repeats, *events, cp.cuda.get_elapsed_time)
    hook = peak_hook(cp)
    cp.cuda.Device().synchronize()
    with hook:
        both()
        cp.cuda.Device().synchronize()
    return fwd, fwd_bwd, hook.peak


def peak_hook(cp):
    """A CuPy MemoryHook that tracks the most pool bytes held at once while it is active."""
    class PeakHook(cp.cuda.MemoryHook):
        name = "PeakHook"

        def __init__(self):
            self.current = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.current += kw["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kw):
            self.current -= kw["mem_size"]

    return PeakHook()


def torch_sdpa(torch, b, t, window, args):
    import torch.nn.functional as tf
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(b, h, t, D, device="cuda", dtype=torch.float16, generator=gen)  # noqa: E731
    q, k, v = (make(h).requires_grad_() for h in (HQ, HKV, HKV))
    gy = make(HQ)
    mask = None
    if window is not None:
        i = torch.arange(t, device="cuda")
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

    def forward():  # torch's own grouped-query support (repeating k and v costs a copy)
        return tf.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=D ** -0.5, enable_gqa=True)

    def both():
        q.grad = k.grad = v.grad = None
        forward().backward(gy)

    events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    elapsed = lambda s, e: s.elapsed_time(e)  # noqa: E731
    fwd = median_ms(forward, args.warmup, args.repeats, *events, elapsed)
    fwd_bwd = median_ms(both, args.warmup, args.repeats, *events, elapsed)
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    both()
    torch.cuda.synchronize()
    return fwd, fwd_bwd, torch.cuda.max_memory_allocated() - base


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if not backend.cuda_available():
        sys.exit("attention_bench needs a CUDA GPU and CuPy")
    cp = backend.cupy
    try:
        import torch
        torch = torch if torch.cuda.is_available() else None
    except ImportError:
        torch = None

    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    lines = [f"{name}, Hq={HQ} Hkv={HKV} D={D}, float16; "
             f"median of {args.repeats} after {args.warmup} warm-up runs",
             "", "| B x T | window | side | fwd ms | fwd+bwd ms | peak extra MiB |", "|---|---|---|---|---|---|"]
    for row in args.rows:
        b, t = ROWS[row]
        for window in WINDOWS:
            sides = [(side, functools.partial(ours, cp, side, b, t, window, args))
                     for side in ("flash_attention", "flash +T", "flash bthd", "attention")]
            if torch is not None:
                sides.append(("torch sdpa", lambda: torch_sdpa(torch, b, t, window, args)))
            for side, measure in sides:
                fwd, fwd_bwd, peak = measure()
                lines.append(f"| {row} | {window or '-'} | {side} | {fwd:.3f} | {fwd_bwd:.3f} | {peak / MIB:.0f} |")
                print(lines[-1], flush=True)
                cp.get_default_memory_pool().free_all_blocks()
                if torch is not None:
                    torch.cuda.empty_cache()
    if torch is None:
        lines.append("\n(torch with CUDA not installed: no torch rows)")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
