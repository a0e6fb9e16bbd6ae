"""Small helpers shared by the nn ops."""
import numpy as np

from .. import backend
from ..backend import get_array_module


def compute_dtype(dtype):
    """The dtype the math runs in: float32 for float16/float32 inputs, float64 for float64.

    Half precision is only a storage format here; float64 stays float64 so that a
    float64 gradcheck exercises exactly the code a float32 run does.
    """
    return np.result_type(dtype, np.float32)


def as_index_array(ids, like, what, size, ignore=None):
    """ids (a raw integer array, a list or an integer Tensor's data) on the device of `like`,
    range-checked (check_range) where they are: ids from the host are checked before the copy."""
    if not hasattr(ids, "dtype"):
        ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
    check_range(ids, size, what, ignore)
    return get_array_module(like).asarray(ids)


def check_range(ids, size, what, ignore=None):
    """Raise ValueError unless every id (other than `ignore`) lies in [0, size).

    NumPy ids are checked at once. For CuPy ids, reading the answer would stall the host until
    the GPU has run all the work queued before it (twice per training micro-batch: the ids, then
    the targets), so the check runs on the GPU and its answer is read later (backend.defer_check):
    the same ValueError is raised at the end of the next backward pass or at the next copy to the
    host (item(), numpy(), a checkpoint), whichever comes first, hence before an optimizer step,
    a logged loss or a saved weight can use anything computed from bad ids. Until then no op
    reads outside its arrays: CuPy's indexing wraps out-of-range ids, and the fused
    cross-entropy kernel reads no logit for an out-of-range target.
    """
    bad = (ids < 0) | (ids >= size)
    if ignore is not None:
        bad &= ids != ignore
    if isinstance(ids, np.ndarray):
        if bad.any():
            raise _range_error(ids, bad, size, what, ignore)
    else:
        backend.defer_check(bad.any(), lambda: _range_error(ids, bad, size, what, ignore, deferred=True))


def _range_error(ids, bad, size, what, ignore, deferred=False):
    first = ids.reshape(-1)[int(bad.reshape(-1).argmax())]
    extra = f" (or ignore_index {ignore})" if ignore is not None else ""
    where = " (checked on the GPU where they were used, reported at this backward pass or copy to the host)"
    return ValueError(f"{what} must lie in [0, {size}){extra}; found {int(first)}{where if deferred else ''}")
