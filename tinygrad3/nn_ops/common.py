"""Small helpers shared by the nn ops."""
import numpy as np

from ..backend import get_array_module


def compute_dtype(dtype):
    """The dtype the math runs in: float32 for float16/float32 inputs, float64 for float64.

    Half precision is only a storage format here; float64 stays float64 so that a
    float64 gradcheck exercises exactly the code a float32 run does.
    """
    return np.result_type(dtype, np.float32)


def as_index_array(ids, like, what):
    """ids (a raw integer array, a list or an integer Tensor's data) on the device of `like`."""
    xp = get_array_module(like)
    ids = xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
    return ids


def check_range(ids, size, what, ignore=None):
    """Raise ValueError unless every id (other than `ignore`) lies in [0, size)."""
    bad = (ids < 0) | (ids >= size)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        first = ids.reshape(-1)[int(bad.reshape(-1).argmax())]
        extra = f" (or ignore_index {ignore})" if ignore is not None else ""
        raise ValueError(f"{what} must lie in [0, {size}){extra}; found {int(first)}")
