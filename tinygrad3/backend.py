"""Array backends: NumPy on the CPU, CuPy on CUDA GPUs.

Every tensor holds a raw array of one of the two libraries; `get_array_module`
(the Chainer/DeZero idiom) returns the library an array belongs to, so an op is
written once against `xp` and runs on either device.
"""
import contextlib
import ctypes
import os

import numpy as np

try:  # CuPy is optional: the CPU path never needs it.
    import cupy
except Exception:  # ImportError, or a CuPy built for a CUDA the machine lacks
    cupy = None

DEVICES = ("cpu", "cuda")


def cuda_available():
    """True when CuPy imports and at least one CUDA device answers."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def default_device():
    """'cuda' when a GPU is usable, else 'cpu'; TINYGRAD3_DEVICE overrides."""
    wanted = os.environ.get("TINYGRAD3_DEVICE", "").strip().lower()
    if wanted:
        return check_device(wanted)
    return "cuda" if cuda_available() else "cpu"


def check_device(device):
    """Validate a device name; asking for CUDA without a GPU is an error, never a fallback."""
    device = str(device).lower()
    if device.startswith("cuda"):
        device = "cuda"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if device == "cuda" and not cuda_available():
        why = "CuPy is not installed" if cupy is None else "no CUDA GPU is visible"
        raise RuntimeError(f"device 'cuda' was requested but {why}; "
                           "install cupy-cuda12x/cupy-cuda13x on a GPU machine or use device 'cpu' "
                           "(TINYGRAD3_DEVICE=cpu)")
    return device


def address(a):
    """Where an array's data starts: a CuPy array's device pointer or a NumPy array's host address."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def stacked_view(arrays):
    """The arrays stacked along axis 0 as ONE view, when they already lie end to end in one
    buffer (e.g. parameters that are views of an optimizer's flat buffer): C-contiguous, one
    dtype, one row shape, each starting where the previous ends. Else None (they must be copied).
    """
    first = arrays[0]
    root = _root(first)
    for a in arrays:
        if (not a.flags.c_contiguous or a.dtype != first.dtype or a.shape[1:] != first.shape[1:] or a.size == 0
                or _root(a) is not root):
            return None
    if any(address(b) != address(a) + a.nbytes for a, b in zip(arrays, arrays[1:])):
        return None
    if not root.flags.c_contiguous or root.dtype != first.dtype:
        return None
    start = (address(first) - address(root)) // first.itemsize
    rows = sum(a.shape[0] for a in arrays)
    return root.reshape(-1)[start:start + rows * (first.size // first.shape[0])].reshape((rows,) + first.shape[1:])


def _root(a):
    """The array that owns a view's memory (the view itself when it owns it)."""
    while a.base is not None and hasattr(a.base, "flags"):
        a = a.base
    return a


def get_array_module(*arrays):
    """numpy or cupy, whichever the arrays belong to (numpy for plain Python values)."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return np


def array_module(device):
    """The array library for a device name."""
    return cupy if check_device(device) == "cuda" else np


def device_of(array):
    return "cuda" if get_array_module(array) is not np else "cpu"


def to_device(array, device):
    """Move a raw array to `device` (no copy when it is already there)."""
    device = check_device(device)
    if device == "cuda":
        return cupy.asarray(array)
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return np.asarray(array)


def to_numpy(array):
    """A host (NumPy) copy or view of a raw array; a failed deferred check raises first."""
    if cupy is not None and isinstance(array, cupy.ndarray):
        raise_deferred()
        return cupy.asnumpy(array)
    return np.asarray(array)


# Checks computed on the GPU and not read yet: (event after the flag's copy, pinned flag, error).
_deferred = []
# While a CUDA graph is being captured (tinygrad3/cuda_graph.py): the list its checks go to.
_capture_checks = None


def defer_check(failed, error):
    """Have raise_deferred raise error() if the CuPy boolean scalar `failed` turns out True.

    Reading `failed` now would make the host wait until the GPU has run everything queued
    before it. Instead it is copied, in stream order, to pinned host memory and read once the
    GPU has got there: without waiting at the next defer_check, waiting at raise_deferred.

    During CUDA-graph capture nothing can be copied to the host; the check goes to the graph
    instead, which files it here after each replay (CudaGraph.replay, `file_checks`).
    """
    if _capture_checks is not None:
        _capture_checks.append((failed, error))
        return
    import cupyx
    raise_deferred(wait=False)  # retire the checks the GPU has already passed
    flag = cupyx.empty_pinned((1,), np.bool_)
    stream = cupy.cuda.get_current_stream()
    failed.data.copy_to_host_async(flag.ctypes.data_as(ctypes.c_void_p), 1, stream)
    _deferred.append((stream.record(), flag, error))


def file_checks(checks):
    """defer_check each (failed, error) of a graph whose replay was just queued: the flags are
    the graph's own arrays, which that replay writes."""
    for failed, error in checks:
        defer_check(failed, error)


def raise_deferred(wait=True):
    """Raise the error of the first pending deferred check that failed, forgetting the others.

    wait=True waits for the GPU to pass every pending check (that far only, not through all the
    work queued since); wait=False reads only the checks it has passed already. Inside a CUDA
    graph capture nothing runs yet, so there is nothing to read: it returns at once.
    """
    if _capture_checks is not None:
        return
    while _deferred and (wait or _deferred[0][0].done):
        event, flag, error = _deferred.pop(0)
        event.synchronize()
        if flag[0]:
            _deferred.clear()
            raise error()


@contextlib.contextmanager
def capturing_checks(checks):
    """Within this block deferred checks go to the list `checks` (CUDA-graph capture)."""
    global _capture_checks
    previous, _capture_checks = _capture_checks, checks
    try:
        yield
    finally:
        _capture_checks = previous


def scatter_add(target, index, values):
    """target[index] += values with repeated indices accumulating (in place)."""
    xp = get_array_module(target)
    if xp is np:
        np.add.at(target, index, values)
    else:
        cupy.add.at(target, index, values)
    return target
