"""Fused CUDA kernels: the fast path.

The reference path (plain NumPy/CuPy array code in tinygrad3/nn_ops/) is the default and
the definition of every op. With the fast path on (`TINYGRAD3_FAST=1` in the environment,
or `set_fast(True)`), an op whose inputs are float16 CuPy arrays calls the fused kernel of
its family instead; any other input (NumPy, float32, float64) still takes the reference path.
RMSNorm's kernels also take float32 x and w and write float32 or float16 y, as the model's
float32 residual stream and float32 norm weights need. The AdamW kernel works on the
optimizer's float32 flat buffers (nn/optim.py asks `use_fast` with `dtypes=(np.float32,)`).
The embedding kernel adds float16 or float32 output gradients into a float32 accumulator.

One module per kernel family, each holding its CUDA source, the derivation of what it
computes, and a NumPy function computing the same thing step for step (the kernel's
reference in tests):

    rmsnorm.py        RMSNorm forward/backward, a warp per row with vector loads (also h + norm(x), the residual form)
    geglu.py          gelu_tanh(gate) * up forward/backward, 16-byte accesses
    cross_entropy.py  loss and gradient straight from float16 logits
    gemm.py           cuBLAS GEMMs (the linears' 2-D ones, attention's strided-batched ones),
                      float16 in, float32 accumulation, callable during CUDA-graph capture
    attention.py      attention from those GEMMs and a fused masked softmax
    flash_attention.py  attention fused into one kernel forward, three backward: tiles of queries
                      and keys on tensor cores, online softmax, no T x T scores, masked tiles
                      skipped (taken before `attention` when both are on and it fits the shapes)
    rope.py           rotary embedding, forward and backward in one strided kernel
    qk_norm_rope.py   attention's q/k RMSNorm, head transpose and RoPE, one kernel each way (a warp per row)
    adamw.py          the AdamW update and the float16 weight copy in one pass
    flat_grads.py     many gradient arrays added into the optimizer's flat float32 buffer, one launch
                      (family adamw)
    embedding.py      the embedding's weight gradient: gy rows added into a float32 accumulator at
                      their ids (a warp per row, 16-byte atomics)

Each family can be switched on alone (`set_fast(True, families=("attention",))`), which is
how bench/throughput.py --ablation measures what each one buys.
"""
import contextlib
import os

import numpy as np

from .. import backend

FAMILIES = ("rmsnorm", "geglu", "cross_entropy", "attention", "flash_attention", "rope", "qk_norm_rope", "adamw",
            "gemm", "embedding")

_on = frozenset(FAMILIES) if os.environ.get("TINYGRAD3_FAST", "").strip() not in ("", "0") else frozenset()


def set_fast(enabled, families=FAMILIES):
    """Turn the fast path on (for the given kernel families; all by default) or off."""
    global _on
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}: choose from {FAMILIES}")
    _on = frozenset(families) if enabled else frozenset()


def fast_enabled():
    """The kernel families the fast path currently uses (empty when it is off)."""
    return _on


@contextlib.contextmanager
def fast(enabled=True, families=FAMILIES):
    """Run a block with the fast path on (or off), restoring the previous setting after."""
    previous = _on
    set_fast(enabled, families)
    try:
        yield
    finally:
        set_fast(True, previous)


def use_fast(family, *arrays, dtypes=(np.float16,)):
    """True when `family` is on and every array is a CuPy array of one of `dtypes` (float16
    unless the family's kernels take more)."""
    if family not in _on or backend.cupy is None:
        return False
    return all(isinstance(a, backend.cupy.ndarray) and a.dtype in dtypes for a in arrays)
