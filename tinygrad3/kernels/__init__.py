"""Fused CUDA kernels: the fast path.

The reference path (plain NumPy/CuPy array code in tinygrad3/nn_ops/) is the library's default
and the definition of every op. With the fast path on (`set_fast(True)`, or `with fast():` for
a block), an op whose inputs are float16 CuPy arrays calls the fused kernel of its family
instead; any other input (NumPy, float32, float64) still takes the reference path. train.py and
generate.py turn it on themselves on CUDA with float16 (`--reference` keeps it off). The
environment variable TINYGRAD3_FAST (1, 0, or a comma-separated list of families) is read once
at import as an override of that default (`environment_families`).
RMSNorm's kernels also take float32 x and w and write float32 or float16 y, as the model's
float32 residual stream and float32 norm weights need. The AdamW kernel works on the
optimizer's float32 flat buffers (nn/optim.py asks `use_fast` with `dtypes=(np.float32,)`).
The embedding kernel adds float16 or float32 output gradients into a float32 accumulator.

One module per kernel family, each holding its CUDA source, the derivation of what it
computes, the fast path's Function (a subclass of the op's reference Function in nn_ops/,
picked by tinygrad3/functional.py, the one place that chooses), and a NumPy function
computing the same thing step for step (the kernel's reference in tests):

    rmsnorm.py        RMSNorm forward/backward, a warp per row with vector loads (also h + norm(x), the residual form)
    geglu.py          gelu_tanh(gate) * up forward/backward, 16-byte accesses
    cross_entropy.py  loss and gradient straight from float16 logits
    linear_cross_entropy.py  the head's gradients made in the forward, scaled and added in one pass (or none)
    gemm.py           cuBLAS GEMMs (the linears' 2-D ones, attention's strided-batched ones),
                      float16 in, float32 accumulation, callable during CUDA-graph capture
    gemm_lt.py        the algorithm of each large product that overwrites its output: cuBLASLt's
                      candidates timed once per shape, the fastest kept (family gemm)
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



def environment_families(value=None):
    """The kernel families TINYGRAD3_FAST names (value: that variable's text), or None when unset.

    An override for code that does not choose itself: "1" means every family, "0" none, and a
    comma-separated list those families. train.py and generate.py choose by their flags and take
    it only in place of their default."""
    value = (os.environ.get("TINYGRAD3_FAST", "") if value is None else value).strip()
    if value == "":
        return None
    if value in ("0", "1"):
        return FAMILIES if value == "1" else ()
    families = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"TINYGRAD3_FAST names unknown kernel families {unknown}: use 0, 1 or some of "
                         f"{', '.join(FAMILIES)}")
    return families


try:
    _on = frozenset(environment_families() or ())
except ValueError:  # reported by whoever reads it with a flag to name (train.py, generate.py)
    _on = frozenset()


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
