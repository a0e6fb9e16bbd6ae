"""Checkpoints on disk: safetensors for arrays, JSON for the rest, every write atomic.

A checkpoint is a directory:
    model.safetensors      the weights, loadable with Module.load_state_dict
    optimizer.safetensors  the optimizer's arrays (master weights, moments)
    state.json             format version, step, and whatever else the trainer keeps
It is written to a temporary sibling directory and renamed into place, so an interrupted
save leaves the previous checkpoint intact and never a half-written one. Non-finite
weights are refused: a NaN never reaches disk.
"""
import json
import os
import shutil
import tempfile

import numpy as np

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read."""


def check_finite(arrays, what):
    bad = [name for name, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(f"refusing to save {what}: non-finite values in {', '.join(bad[:5])}")


def _save_tensors(arrays, path):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)


def _load_tensors(path):
    from safetensors.numpy import load_file
    return load_file(path)


def save_weights(state, path):
    """One safetensors file of weights, written atomically (temp file + rename)."""
    check_finite(state, path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        _save_tensors(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"no weights file at {path}")
    return _load_tensors(path)


def save_checkpoint(directory, model_state, optimizer_state, state):
    """Write a checkpoint directory atomically; `state` must be JSON-serialisable."""
    check_finite(model_state, "the model weights")
    check_finite(optimizer_state, "the optimizer state")
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
    try:
        _save_tensors(model_state, os.path.join(tmp, "model.safetensors"))
        _save_tensors(optimizer_state, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, format_version=FORMAT_VERSION), f, indent=1)
        old = directory + ".old"
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(directory):
    """(model_state, optimizer_state, state) from a checkpoint directory.

    If a save was interrupted between its two renames, the previous checkpoint is still
    whole under `<directory>.old` and is used.
    """
    if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
        directory = directory + ".old"
    files = [os.path.join(directory, n) for n in ("model.safetensors", "optimizer.safetensors", "state.json")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"no complete checkpoint at {directory} (missing {', '.join(missing)})")
    with open(files[2]) as f:
        state = json.load(f)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} has format version {state.get('format_version')}, "
                              f"this code reads version {FORMAT_VERSION}")
    return _load_tensors(files[0]), _load_tensors(files[1]), state
