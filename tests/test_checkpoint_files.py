"""Checkpoint files (nn/checkpoint.py): no temporaries left, fsync before and after renames,
damaged or non-finite files refused in one line, the fallback to an intact `<dir>.old`."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nn import checkpoint as ckpt
from nn.checkpoint import (CheckpointError, load_checkpoint, load_weights, remove_stale_temporaries,
                           save_checkpoint, save_weights, write_file_atomic)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"state.json": ("step",), "optimizer.safetensors": ("master", "m", "v")}


def _arrays(step):
    rng = np.random.default_rng(step)
    model = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.full(4, step, np.float32)}
    optimizer = {k: rng.standard_normal(16).astype(np.float32) for k in ("master", "m", "v")}
    return model, optimizer, {"step": step}


def _save(directory, step):
    save_checkpoint(str(directory), *_arrays(step))


def _one_line(message):
    assert "\n" not in str(message).strip() and "Traceback" not in str(message)


def _step(loaded):
    model, optimizer, state = loaded
    return state["step"], float(model["b"][0])


# ----- temporaries -------------------------------------------------------------------------------
def test_successful_saves_leave_no_temporaries(tmp_path):
    _save(tmp_path / "last", 1)
    _save(tmp_path / "last", 2)  # the second save also swaps through last.old
    save_weights(_arrays(1)[0], str(tmp_path / "best.safetensors"))
    write_file_atomic(str(tmp_path / "log.jsonl"), "{}\n")
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors", "last", "log.jsonl"]
    assert sorted(os.listdir(tmp_path / "last")) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert _step(load_checkpoint(str(tmp_path / "last"))) == (2, 2.0)


def test_a_failed_save_removes_its_temporary_and_keeps_the_old_files(tmp_path, monkeypatch):
    _save(tmp_path / "last", 1)
    save_weights(_arrays(1)[0], str(tmp_path / "best.safetensors"))
    write_file_atomic(str(tmp_path / "log.jsonl"), "old\n")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "fsync_path", disk_full)
    with pytest.raises(OSError):
        _save(tmp_path / "last", 2)
    with pytest.raises(OSError):
        save_weights(_arrays(2)[0], str(tmp_path / "best.safetensors"))
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_file_atomic(str(tmp_path / "log.jsonl"), "new\n")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors", "last", "log.jsonl"]
    assert _step(load_checkpoint(str(tmp_path / "last"))) == (1, 1.0)
    assert (tmp_path / "log.jsonl").read_text() == "old\n"


def test_remove_stale_temporaries_takes_only_what_the_saves_create(tmp_path):
    made = [tmp_path / ".tmp-ckpt-abc123", tmp_path / ".tmp-x1y2.safetensors", tmp_path / ".tmp-q.text"]
    made[0].mkdir()
    (made[0] / "model.safetensors").write_bytes(b"x" * 100)
    made[1].write_bytes(b"x" * 100)
    made[2].write_text("half a log")
    kept_files = [".tmp-ckpt-file", ".tmp-notes.txt", "tmp-x.safetensors", "best.safetensors", ".lock"]
    for name in kept_files:
        (tmp_path / name).write_text("mine")
    (tmp_path / ".tmp-dir.safetensors").mkdir()  # a directory with a weights file's name
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / ".tmp-ckpt-inner").mkdir()  # only the directory given is cleaned
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir()
    (outside / "keep").write_text("keep")
    os.symlink(outside, tmp_path / ".tmp-ckpt-link")

    removed = remove_stale_temporaries(str(tmp_path))
    assert removed == sorted(str(p) for p in made)
    assert not any(p.exists() for p in made)
    assert all((tmp_path / name).read_text() == "mine" for name in kept_files)
    assert (tmp_path / ".tmp-dir.safetensors").is_dir() and (tmp_path / "last" / ".tmp-ckpt-inner").is_dir()
    assert (tmp_path / ".tmp-ckpt-link").is_symlink() and (outside / "keep").read_text() == "keep"
    assert remove_stale_temporaries(str(tmp_path)) == []
    assert remove_stale_temporaries(str(tmp_path / "nothing")) == []


KILLED_SAVE = """
import os, signal, sys
import numpy as np
from nn import checkpoint
real = os.replace
def die(src, dst):
    if ".tmp-" in os.path.basename(src):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = die
arrays = {"w": np.ones(8, np.float32)}
if sys.argv[2] == "checkpoint":
    checkpoint.save_checkpoint(sys.argv[1], arrays, {"m": np.zeros(8, np.float32)}, {"step": 2})
else:
    checkpoint.save_weights(arrays, sys.argv[1])
"""


@pytest.mark.parametrize("kind", ["checkpoint", "weights"])
def test_a_save_killed_with_sigkill_leaves_temporaries_that_are_then_removed(tmp_path, kind):
    target = tmp_path / ("last" if kind == "checkpoint" else "best.safetensors")
    if kind == "checkpoint":
        _save(target, 1)
    else:
        save_weights({"w": np.zeros(8, np.float32)}, str(target))
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target), kind], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]
    stale = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert len(stale) == 1
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / stale[0])]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    if kind == "checkpoint":  # the previous checkpoint is untouched
        assert _step(load_checkpoint(str(target))) == (1, 1.0)
    else:
        np.testing.assert_array_equal(load_weights(str(target))["w"], np.zeros(8, np.float32))


# ----- durability ------------------------------------------------------------------------------
@pytest.fixture
def events(monkeypatch):
    """Every fsync (as the path of its descriptor) and every rename, in order."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_save_checkpoint_fsyncs_files_and_directories_around_the_renames(tmp_path, events):
    last = str(tmp_path / "last")
    _save(last, 1)
    _save(last, 2)
    swap = [i for i, e in enumerate(events) if e[0] == "replace"][-2:]  # last -> last.old, tmp -> last
    assert events[swap[0]][1:] == (last, last + ".old") and events[swap[1]][2] == last
    tmp = events[swap[1]][1]
    assert os.path.basename(tmp).startswith(".tmp-ckpt-")
    before = [e[1] for e in events[:swap[0]] if e[0] == "fsync"]
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert os.path.join(tmp, name) in before, name
    assert before[-1] == tmp  # the new directory's entries, once its files are on disk
    assert ("fsync", str(tmp_path)) in events[swap[1]:]  # the renames themselves


@pytest.mark.parametrize("write", ["weights", "text"])
def test_single_file_writes_fsync_the_file_then_the_directory(tmp_path, events, write):
    path = str(tmp_path / ("best.safetensors" if write == "weights" else "log.jsonl"))
    if write == "weights":
        save_weights({"w": np.ones(3, np.float32)}, path)
    else:
        write_file_atomic(path, "line\n")
        assert open(path).read() == "line\n"
    (rename,) = [i for i, e in enumerate(events) if e[0] == "replace"]
    tmp = events[rename][1]
    assert events[rename][2] == path and os.path.basename(tmp).startswith(".tmp-")
    assert ("fsync", tmp) in events[:rename]
    assert ("fsync", str(tmp_path)) in events[rename:]


# ----- damaged checkpoints -----------------------------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _bad_header(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"{!!!"
    path.write_bytes(bytes(data))


def _nan_in(key):
    def damage(path):
        from safetensors.numpy import load_file, save_file
        arrays = load_file(str(path))
        arrays[key].reshape(-1)[5] = np.nan if key != "v" else np.inf
        save_file(arrays, str(path))
    return damage


def _without(key):
    def damage(path):
        if path.suffix == ".json":
            state = json.loads(path.read_text())
            del state[key]
            path.write_text(json.dumps(state))
        else:
            from safetensors.numpy import load_file, save_file
            arrays = load_file(str(path))
            del arrays[key]
            save_file(arrays, str(path))
    return damage


DAMAGE = {
    "truncated model": ("model.safetensors", _truncate, "not a readable safetensors file"),
    "truncated optimizer": ("optimizer.safetensors", _truncate, "not a readable safetensors file"),
    "bad header": ("model.safetensors", _bad_header, "not a readable safetensors file"),
    "empty model": ("model.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    "nan in model": ("model.safetensors", _nan_in("w"), "non-finite values in w"),
    "inf in optimizer": ("optimizer.safetensors", _nan_in("v"), "non-finite values in v"),
    "missing optimizer key": ("optimizer.safetensors", _without("m"), "missing m"),
    "truncated state": ("state.json", _truncate, "not JSON"),
    "edited state": ("state.json", lambda p: p.write_text("[1, 2]"), "a JSON list, not an object"),
    "binary state": ("state.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not JSON"),
    "missing step": ("state.json", _without("step"), "missing step"),
    "missing version": ("state.json", _without("format_version"), "missing format_version"),
    "missing file": ("optimizer.safetensors", lambda p: p.unlink(), "no optimizer.safetensors"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_without_old_is_one_line_naming_the_file(tmp_path, case):
    name, damage, reason = DAMAGE[case]
    last = tmp_path / "last"
    _save(last, 1)
    damage(last / name)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(last), required=REQUIRED)
    message = str(error.value)
    _one_line(message)
    where = str(last) if case == "missing file" else str(last / name)
    assert message.startswith(f"{where} is damaged (") and reason in message, message
    assert "no last.old to fall back to; start over with a new --out" in message


@pytest.mark.parametrize("case", ["truncated optimizer", "nan in model", "truncated state", "missing file"])
def test_a_damaged_checkpoint_falls_back_to_an_intact_old_with_a_warning(tmp_path, capsys, case):
    name, damage, reason = DAMAGE[case]
    last = tmp_path / "last"
    _save(last, 1)
    shutil.copytree(last, str(last) + ".old")  # the whole older checkpoint
    _save(tmp_path / "newer", 2)
    shutil.rmtree(last)
    shutil.copytree(tmp_path / "newer", last)
    damage(last / name)
    assert _step(load_checkpoint(str(last), required=REQUIRED)) == (1, 1.0)
    err = capsys.readouterr().err
    _one_line(err)
    assert err.startswith("warning: ") and reason in err and "last.old (update 1)" in err
    assert "last.damaged" in err
    # The layout is a normal one again: last is the intact checkpoint, the damaged one set aside.
    assert sorted(os.listdir(tmp_path)) == ["last", "last.damaged", "newer"]
    assert _step(load_checkpoint(str(last), required=REQUIRED)) == (1, 1.0)
    assert capsys.readouterr().err == ""
    _save(last, 3)  # and the next save works
    assert _step(load_checkpoint(str(last), required=REQUIRED)) == (3, 3.0)
    assert sorted(os.listdir(tmp_path)) == ["last", "last.damaged", "newer"]


def test_both_damaged_is_one_line_naming_both(tmp_path, capsys):
    last = tmp_path / "last"
    _save(last, 1)
    shutil.copytree(last, str(last) + ".old")
    _truncate(last / "model.safetensors")
    _nan_in("m")(tmp_path / "last.old" / "optimizer.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(last), required=REQUIRED)
    message = str(error.value)
    _one_line(message)
    assert str(last / "model.safetensors") in message
    assert str(tmp_path / "last.old" / "optimizer.safetensors") in message
    assert "start over with a new --out" in message
    assert sorted(os.listdir(tmp_path)) == ["last", "last.old"]  # nothing moved
    assert capsys.readouterr().err == ""


def test_old_alone_is_used_and_a_leftover_old_does_not_block_the_next_save(tmp_path):
    last = tmp_path / "last"
    _save(last, 1)
    os.rename(last, str(last) + ".old")  # killed between the two renames of a save
    assert _step(load_checkpoint(str(last))) == (1, 1.0)
    _save(last, 2)
    assert sorted(os.listdir(tmp_path)) == ["last"]
    shutil.copytree(last, str(last) + ".old")  # killed while deleting last.old after a save
    (tmp_path / "last.old" / "model.safetensors").unlink()  # half deleted
    assert _step(load_checkpoint(str(last))) == (2, 2.0)
    _save(last, 3)
    assert sorted(os.listdir(tmp_path)) == ["last"]
    assert _step(load_checkpoint(str(last))) == (3, 3.0)


def test_a_damaged_old_alone_says_start_over(tmp_path):
    last = tmp_path / "last"
    _save(last, 1)
    os.rename(last, str(last) + ".old")
    _truncate(tmp_path / "last.old" / "state.json")
    with pytest.raises(CheckpointError, match=r"last\.old/state\.json is damaged \(not JSON.*start over") as e:
        load_checkpoint(str(last))
    _one_line(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nothing"))


def test_another_format_version_is_not_damage(tmp_path):
    last = tmp_path / "last"
    _save(last, 1)
    shutil.copytree(last, str(last) + ".old")
    state = json.loads((last / "state.json").read_text())
    (last / "state.json").write_text(json.dumps(dict(state, format_version=99)))
    with pytest.raises(CheckpointError, match="format version 99, this code reads version 1"):
        load_checkpoint(str(last))
    assert sorted(os.listdir(tmp_path)) == ["last", "last.old"]  # no fallback, nothing moved


# ----- weights files ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["truncated", "bad header", "nan", "missing key"])
def test_a_damaged_weights_file_is_one_line(tmp_path, case):
    path = tmp_path / "best.safetensors"
    save_weights({"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float16)}, str(path))
    damage, reason = {"truncated": (_truncate, "not a readable safetensors file"),
                      "bad header": (_bad_header, "not a readable safetensors file"),
                      "nan": (_nan_in("w"), "non-finite values in w"),
                      "missing key": (_without("b"), "missing b")}[case]
    damage(path)
    with pytest.raises(ckpt.DamagedFileError) as error:
        load_weights(str(path), required=("w", "b"))
    _one_line(error.value)
    assert str(error.value).startswith(f"{path} is damaged (") and reason in str(error.value)
    assert error.value.path == str(path) and reason in error.value.reason
    with pytest.raises(CheckpointError, match="no weights file at"):
        load_weights(str(tmp_path / "none.safetensors"))


def test_non_finite_checks_every_element_of_large_and_half_arrays(monkeypatch):
    monkeypatch.setattr(ckpt, "_CHUNK", 7)  # several chunks; the bad value in the last, partial one
    a = np.zeros(50, np.float16)
    a[-1] = np.inf
    ints = np.zeros(3, np.int64)
    assert ckpt.non_finite({"ok": np.zeros((5, 5), np.float32), "a": a, "ints": ints}) == ["a"]
    with pytest.raises(CheckpointError, match="refusing to save the weights: non-finite values in a$"):
        ckpt.check_finite({"a": a}, "the weights")
    many = {f"p{i}": np.full(2, np.nan, np.float32) for i in range(8)}
    assert ckpt._names(ckpt.non_finite(many)) == "p0, p1, p2, p3, p4 and 3 more"
