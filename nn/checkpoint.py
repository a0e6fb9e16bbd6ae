"""Checkpoints on disk: safetensors for arrays, JSON for the rest, every write atomic and durable.

A checkpoint is a directory:
    model.safetensors      the weights, loadable with Module.load_state_dict
    optimizer.safetensors  the optimizer's arrays (master weights, moments)
    state.json             format version, step, and whatever else the trainer keeps
It is written to a temporary sibling directory (`.tmp-ckpt-*`), every file and that directory
fsync'd, then renamed into place (the previous checkpoint becomes `<dir>.old` for the moment
of the swap), and the parent directory fsync'd: an interrupted save, power loss included, leaves
a whole checkpoint and never a half-written one. Non-finite weights are refused on the way out
and on the way in: a NaN neither reaches disk nor comes back from it.

Loading checks every file (readable safetensors, finite floats, state.json a JSON object with
the required keys). When `<dir>` is damaged and `<dir>.old` is whole, the run falls back to
`<dir>.old` with a warning line on stderr: the damaged directory is moved to `<dir>.damaged` and
`<dir>.old` becomes `<dir>`. A damaged checkpoint cannot be resumed, so the older whole one is
the only thing to continue from; the move keeps the layout a later save expects. Loading a
checkpoint thus may rename directories: call it first in the run's one writer, and in any other
process (the other ranks of a run) only after that call has returned, e.g. after a barrier.

A process killed during a save leaves its temporaries behind; `remove_stale_temporaries`
deletes them (only the names this module creates) once no save can be running.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
TMP_PREFIX = ".tmp-"                   # every temporary this module creates starts so
TMP_CHECKPOINT_PREFIX = ".tmp-ckpt-"   # save_checkpoint's directories
TMP_SUFFIXES = (".safetensors", ".text")  # save_weights' and write_file_atomic's files
_CHUNK = 1 << 22  # elements per finiteness check (a bounded temporary, even for 2 GB arrays)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read."""


class DamagedFileError(CheckpointError):
    """A file whose contents cannot be used: `path` and `reason` for callers that say more."""

    def __init__(self, path, reason, advice):
        super().__init__(f"{path} is damaged ({reason}): {advice}")
        self.path, self.reason = path, reason


# ----- checks ----------------------------------------------------------------------------------
def non_finite(arrays):
    """Names of the float arrays holding a NaN or an infinity, in order."""
    bad = []
    for name, a in arrays.items():
        if a.dtype.kind == "f":
            flat = a.reshape(-1)
            if not all(np.isfinite(flat[i:i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK)):
                bad.append(name)
    return bad


def _names(names):
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_finite(arrays, what):
    bad = non_finite(arrays)
    if bad:
        raise CheckpointError(f"refusing to save {what}: non-finite values in {_names(bad)}")


# ----- durable writes --------------------------------------------------------------------------
def fsync_path(path):
    """Flush a file's or a directory's contents (a directory: its entries, i.e. renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parent(path):
    return os.path.dirname(os.path.abspath(path))


def write_file_atomic(path, text):
    """Replace `path` by `text`: written to a temporary file beside it, fsync'd, renamed over it,
    and the directory fsync'd, so a crash at any point leaves the old contents or the new."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".text", dir=_parent(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(_parent(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_tensors(arrays, path):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)
    fsync_path(path)


def save_weights(state, path):
    """One safetensors file of weights, written atomically and durably (temp file, fsync, rename)."""
    check_finite(state, path)
    directory = _parent(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        _save_tensors(state, tmp)
        os.replace(tmp, path)
        fsync_path(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(directory, model_state, optimizer_state, state):
    """Write a checkpoint directory atomically and durably; `state` must be JSON-serialisable."""
    check_finite(model_state, "the model weights")
    check_finite(optimizer_state, "the optimizer state")
    parent = _parent(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TMP_CHECKPOINT_PREFIX, dir=parent)
    old = directory + ".old"
    try:
        _save_tensors(model_state, os.path.join(tmp, FILES[0]))
        _save_tensors(optimizer_state, os.path.join(tmp, FILES[1]))
        with open(os.path.join(tmp, FILES[2]), "w") as f:
            json.dump(dict(state, format_version=FORMAT_VERSION), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if os.path.exists(directory):
            # A leftover .old (a save killed while deleting it) is older than `directory`, which
            # loaded whole; it must go before `directory` can be renamed onto its name.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_path(parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(directory):
    """Delete what interrupted saves left in `directory`: `.tmp-ckpt-*` directories and
    `.tmp-*.safetensors` / `.tmp-*.text` files, nothing else (symbolic links are left alone).
    Call it only when no save can be running there. Returns the removed paths, sorted."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.startswith(TMP_PREFIX) or os.path.islink(path):
            continue
        if name.startswith(TMP_CHECKPOINT_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path)
        elif name.endswith(TMP_SUFFIXES) and os.path.isfile(path):
            os.remove(path)
        else:
            continue
        removed.append(path)
    return removed


# ----- loading ---------------------------------------------------------------------------------
def _read_tensors(path, required=(), advice="restore it from a copy or write it again"):
    """name -> array from a safetensors file; DamagedFileError when it cannot be parsed, lacks a
    required name or holds a non-finite float."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        arrays = load_file(path)
    except SafetensorError as e:
        raise DamagedFileError(path, f"not a readable safetensors file: {e}", advice) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise DamagedFileError(path, f"missing {_names(missing)}", advice)
    bad = non_finite(arrays)
    if bad:
        raise DamagedFileError(path, f"non-finite values in {_names(bad)}", advice)
    return arrays


def load_weights(path, required=()):
    """name -> array of one weights file; `required`: names it must hold. A missing, damaged or
    non-finite file is a one-line CheckpointError (DamagedFileError when the contents are bad)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no weights file at {path}")
    return _read_tensors(path, required)


def _read_state(path, required, advice):
    try:
        with open(path) as f:
            state = json.load(f)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError: a truncated or edited file
        raise DamagedFileError(path, f"not JSON: {e}", advice) from None
    if not isinstance(state, dict):
        raise DamagedFileError(path, f"a JSON {type(state).__name__}, not an object", advice)
    missing = [key for key in ("format_version", *required) if key not in state]
    if missing:
        raise DamagedFileError(path, f"missing {_names(missing)}", advice)
    return state


def _read_checkpoint(directory, required, advice):
    paths = [os.path.join(directory, name) for name in FILES]
    missing = [name for name, path in zip(FILES, paths) if not os.path.isfile(path)]
    if missing:
        raise DamagedFileError(directory, f"no {', '.join(missing)}", advice)
    state = _read_state(paths[2], required.get(FILES[2], ()), advice)
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} has format version {state['format_version']}, "
                              f"this code reads version {FORMAT_VERSION}")
    model = _read_tensors(paths[0], required.get(FILES[0], ()), advice)
    optimizer = _read_tensors(paths[1], required.get(FILES[1], ()), advice)
    return model, optimizer, state


def load_checkpoint(directory, required=None):
    """(model_state, optimizer_state, state) from a checkpoint directory, every file checked.

    required: file name -> names that file must hold ({"state.json": ("step",),
    "optimizer.safetensors": ("m",), ...}); a missing one counts as damage.
    If a save was interrupted between its two renames, the previous checkpoint is whole under
    `<directory>.old` and is used. If `<directory>` is damaged and `<directory>.old` is whole,
    that is used too, after a warning line on stderr, and the directories are swapped (see the
    module docstring). Otherwise a damaged checkpoint is a one-line CheckpointError.
    """
    required = required or {}
    old = directory + ".old"
    start_over = "start over with a new --out (or --overwrite)"
    if not os.path.isdir(directory):
        if not os.path.isdir(old):
            raise CheckpointError(f"no checkpoint at {directory}")
        return _read_checkpoint(old, required, start_over)
    if not os.path.isdir(old):
        return _read_checkpoint(directory, required, f"no {os.path.basename(old)} to fall back to; {start_over}")
    try:
        return _read_checkpoint(directory, required, "")
    except DamagedFileError as damage:
        try:
            loaded = _read_checkpoint(old, required, "")
        except DamagedFileError as old_damage:
            raise CheckpointError(f"{damage.path} is damaged ({damage.reason}) and so is {old_damage.path} "
                                  f"({old_damage.reason}): {start_over}") from None
        damaged = directory + ".damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        os.replace(directory, damaged)
        os.replace(old, directory)
        fsync_path(_parent(directory))
        print(f"warning: {damage.path} is damaged ({damage.reason}); resuming from the intact "
              f"{os.path.basename(old)} (update {loaded[2].get('step', '?')}) instead, now {directory}; the "
              f"damaged one is kept as {damaged}: delete it when done", file=sys.stderr)
        return loaded
