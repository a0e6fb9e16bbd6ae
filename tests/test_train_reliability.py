"""train.py under interrupts, bad settings, damaged or foreign files, and divergence (CPU, tiny preset).

Every interrupt test compares the interrupted-and-resumed run with an uninterrupted one: every
logged number (losses, evals, lr, loss scale, skips, grad norms, tokens) and the final weights.
"""
import json
import math
import os
import signal

import numpy as np
import pytest

import nn
import train
from train_runs import read_log, tiny_argv
from data.loader import BatchLoader
from models import Gemma3, Gemma3Config
from nn.checkpoint import load_weights
from nn import trainer as nn_trainer
from nn.run_dir import RunLock

TIMING = ("seconds", "tok_s", "mfu")


def _same_run(whole, split):
    a, b = read_log(whole), read_log(split)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    for name in ("best.safetensors", "last/model.safetensors", "last/optimizer.safetensors"):
        wa, wb = load_weights(os.path.join(whole, name)), load_weights(os.path.join(split, name))
        assert wa.keys() == wb.keys()
        for key in wa:
            np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"{name}: {key}")
    sa, sb = (json.loads(open(os.path.join(d, "last", "state.json")).read()) for d in (whole, split))
    for key in ("step", "tokens", "best_val", "scaler", "optimizer", "loaders", "skipped_in_a_row"):
        assert sa[key] == sb[key], key


def _signal_on_call(monkeypatch, owner, name, call, signals=(signal.SIGTERM,)):
    """Make owner.name send `signals` to this process at the start of its call-th call."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


# NumPy float16 is slow (no BLAS): smaller batches; a scale that starts above where this model's
# float16 gradients overflow (2^20 to 2^17 are skipped, halving it) and doubles after 2 clean
# updates, so it moves both ways within a few updates.
FP16 = ("--dtype", "float16", "--loss-scale", str(2.0 ** 20), "--scale-growth-interval", "2",
        "--batch-size", "2", "--block-size", "16", "--eval-batches", "1")


class Uninterrupted(dict):
    """The reference runs, 10 updates each, made on first use: float32, and float16 with a loss
    scale that moves."""

    def __init__(self, data, parent):
        super().__init__()
        self.data, self.parent = data, parent

    def __missing__(self, dtype):
        out = self.parent.mktemp("whole") / dtype
        assert train.main(tiny_argv(self.data, out, "--max-updates", "10", *(FP16 if dtype == "float16" else ()))) == 0
        self[dtype] = str(out)
        return self[dtype]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dir, tmp_path_factory):
    return Uninterrupted(synthetic_dir, tmp_path_factory)


def test_the_fp16_reference_run_moves_its_loss_scale(uninterrupted):
    records = [r for r in read_log(uninterrupted["float16"]) if r["kind"] == "update"]
    scales = [r["scale"] for r in records]
    assert any(r["skipped"] for r in records) and not all(r["skipped"] for r in records)
    assert len(set(scales)) >= 3  # doubled after 2 clean updates, halved on each overflow
    assert any(b < a for a, b in zip(scales, scales[1:])) and any(b > a for a, b in zip(scales, scales[1:]))


@pytest.mark.parametrize("where, dtype, signals", [
    ("eval", "float32", (signal.SIGTERM,)),        # during the evaluation of update 8
    ("save", "float32", (signal.SIGTERM, signal.SIGINT)),  # during the save at update 4, twice
    ("update", "float16", (signal.SIGHUP,)),       # inside AdamW's update of update 6
    ("update", "float32", (signal.SIGTERM,)),      # inside AdamW's update of update 3
])
def test_interrupt_then_resume_equals_the_uninterrupted_run(synthetic_dir, tmp_path, monkeypatch, capfd,
                                                            uninterrupted, where, dtype, signals):
    extra = FP16 if dtype == "float16" else ()
    split = tmp_path / "split"
    if where == "eval":
        _signal_on_call(monkeypatch, train.Trainer, "evaluate", 2, signals)
        stopped_at = 8
    elif where == "save":
        _signal_on_call(monkeypatch, nn_trainer, "save_checkpoint", 1, signals)
        stopped_at = 4
    else:  # AdamW._update runs once per update it does not skip: the signal lands in the third one
        updates = [r for r in read_log(uninterrupted[dtype]) if r["kind"] == "update"]
        stopped_at = [r["step"] for r in updates if not r["skipped"]][2]
        _signal_on_call(monkeypatch, nn.AdamW, "_update", 3, signals)
    assert train.main(tiny_argv(synthetic_dir, split, "--max-updates", "10", *extra)) == 130
    err = capfd.readouterr().err
    assert "Traceback" not in err and signal.Signals(signals[0]).name in err
    if len(signals) > 1:
        assert "already stopping" in err
    state = json.loads((split / "last" / "state.json").read_text())
    assert state["step"] == stopped_at
    assert [r["step"] for r in read_log(split)][-1] == stopped_at
    monkeypatch.undo()
    assert train.main(tiny_argv(synthetic_dir, split, "--max-updates", "10", "--resume", *extra)) == 0
    _same_run(uninterrupted[dtype], str(split))


def test_kill_during_a_log_write_leaves_a_torn_line_that_resume_drops(synthetic_dir, tmp_path, uninterrupted):
    out = tmp_path / "torn"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 0  # saved at 4
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "update", "loss": 3.1')  # update 5's record, cut off
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "10", "--resume")) == 0
    _same_run(uninterrupted["float32"], str(out))


def test_a_failing_log_rewrite_keeps_the_oldread_log(synthetic_dir, tmp_path, monkeypatch):
    out = tmp_path / "rewrite"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 0
    before = (out / "log.jsonl").read_text()

    def no_space(*args):
        raise OSError(28, "No space left on device", str(out / "log.jsonl"))

    monkeypatch.setattr(os, "replace", no_space)
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "8", "--resume")) == 2
    assert (out / "log.jsonl").read_text() == before


def test_the_first_update_has_the_mean_gradient_and_every_lr_is_the_schedule(synthetic_dir, tmp_path):
    """grad_norm of update 1 (no clip) against an independent float64 mean over the micro-batches;
    every logged lr against the closed-form warmup + cosine at the update's index."""
    out = tmp_path / "norm"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "12", "--clip", "0")) == 0
    records = [r for r in read_log(out) if r["kind"] == "update"]

    model = Gemma3(Gemma3Config.tiny(), seed=0)
    model.to(dtype=np.float64)
    loader = BatchLoader(synthetic_dir, 4, 32, seed=train.stream_seed(0), model_vocab_size=model.config.vocab_size)
    losses = [model(*loader.next_batch("train"), return_logits=False)[1] for _ in range(2)]
    mean = (losses[0] + losses[1]) * 0.5
    mean.backward()
    params = {id(p): p for p in model.parameters()}.values()
    norm = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params))
    assert records[0]["loss"] == pytest.approx(float(mean.data), rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)

    peak, floor, warmup, total = 3e-3, 3e-4, 3, 12
    for r in records:
        k = r["step"] - 1  # the update's index: update 1 uses lr(0)
        if k < warmup:
            expected = peak * (k + 1) / warmup
        else:
            expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert r["lr"] == pytest.approx(expected, rel=1e-12), r


# ----- the run directory -------------------------------------------------------------------------------
def test_a_run_without_last_is_still_a_run(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 0
    import shutil
    shutil.rmtree(out / "last")
    best = (out / "best.safetensors").read_bytes()
    log = (out / "log.jsonl").read_text()
    capsys.readouterr()
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "best.safetensors").read_bytes() == best and (out / "log.jsonl").read_text() == log
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4", "--resume")) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4", "--seed", "1", "--overwrite")) == 0
    fresh = read_log(out)
    assert [r["step"] for r in fresh if r["kind"] == "update"] == [1, 2, 3, 4]  # replaced, not appended
    assert (out / "best.safetensors").read_bytes() != best


def test_out_that_is_a_file_and_two_runs_at_once_are_refused(synthetic_dir, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert train.main(tiny_argv(synthetic_dir, path, "--max-updates", "3")) == 2
    assert "is a file" in capsys.readouterr().err
    out = tmp_path / "busy"
    with RunLock(str(out)):
        assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "3")) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "another train.py" in err
        assert not (out / "log.jsonl").exists()
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "3")) == 0  # the lock went with its holder
    assert train.main(tiny_argv(synthetic_dir, out, "--resume", "--overwrite")) == 2


def test_stale_temporaries_of_a_killed_save_are_removed(synthetic_dir, tmp_path):
    out = tmp_path / "stale"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 0
    (out / ".tmp-ckpt-abc123").mkdir()
    (out / ".tmp-ckpt-abc123" / "model.safetensors").write_bytes(b"x" * 100)
    (out / ".tmp-xyz.safetensors").write_bytes(b"x" * 100)
    (out / "notes.txt").write_text("mine")
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "8", "--resume")) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == []
    assert (out / "notes.txt").read_text() == "mine"


# ----- what resume checks ------------------------------------------------------------------------------
def test_resume_refuses_other_data_and_another_dtype(synthetic_dir, tmp_path, capsys):
    from data.synthetic import prepare_synthetic
    other = tmp_path / "other-data"
    prepare_synthetic(str(other), n_stories=300, seed=7)
    out = tmp_path / "run"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 0
    capsys.readouterr()
    assert train.main(tiny_argv(str(other), out, "--max-updates", "8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "other data" in err and "--data" in err
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "8", "--resume", "--dtype", "float64")) == 2
    assert "--dtype float32" in capsys.readouterr().err


def test_damaged_or_non_finite_checkpoints_are_one_line(synthetic_dir, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file
    out = tmp_path / "run"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 0
    path = out / "last" / "optimizer.safetensors"
    arrays = load_file(str(path))
    good = path.read_bytes()
    arrays["m"][3] = np.nan
    save_file(arrays, str(path))
    capsys.readouterr()
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "optimizer.safetensors" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    path.write_bytes(good[:len(good) // 2])  # truncated
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "optimizer.safetensors" in err and len(err.strip().splitlines()) == 1
    path.write_bytes(good)
    state = out / "last" / "state.json"
    state.write_text(state.read_text()[:40])
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "state.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("failure", ["non-finite", "disk full"])
def test_a_save_that_fails_in_the_loop_ends_the_run_with_one_line(synthetic_dir, tmp_path, monkeypatch,
                                                                 capsys, failure):
    def refuse(*args, **kwargs):
        if failure == "disk full":
            raise OSError(28, "No space left on device", "runs/x/last/model.safetensors")
        raise train.CheckpointError("refusing to save the model weights: non-finite values in w")

    monkeypatch.setattr(nn_trainer, "save_checkpoint", refuse)
    assert train.main(tiny_argv(synthetic_dir, tmp_path / "run", "--max-updates", "4")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("No space left" if failure == "disk full" else "non-finite") in err and "--resume" in err


# ----- divergence --------------------------------------------------------------------------------------
def test_a_diverged_float32_run_stops_with_an_error(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "diverged"
    status = train.main(tiny_argv(synthetic_dir, out, "--max-updates", "40", "--lr", "1e3", "--min-lr", "1",
                              "--warmup", "0", "--max-skipped-updates", "3"))
    err = capsys.readouterr().err
    assert status == 3 and "diverged" in err and "--lr" in err and len(err.strip().splitlines()) == 1
    updates = [r for r in read_log(out) if r["kind"] == "update"]
    assert updates[-3:] and all(r["skipped"] for r in updates[-3:]) and len(updates) < 40


def test_skips_stop_the_run_only_when_the_loss_scale_cannot_fall(synthetic_dir, tmp_path):
    trainer = train.setup(train.parse_args(tiny_argv(synthetic_dir, tmp_path / "t", *FP16,
                                                   "--max-skipped-updates", "2")))
    trainer.skipped_in_a_row = 5
    trainer.check_progress()  # scale 2^24: halving can still recover
    trainer.scaler._scale = trainer.scaler.min_scale
    with pytest.raises(train.DivergedError, match="minimum loss scale"):
        trainer.check_progress()
    trainer.skipped_in_a_row = 1
    trainer.check_progress()


# ----- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, says", [
    (("--clip", "-1"), "--clip must be >= 0"),
    (("--eps", "0"), "--eps must be > 0"),
    (("--lr", "0"), "--lr must be > 0"),
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--beta2", "1"), "--beta2 must be in [0, 1)"),
    (("--warmup", "50", "--max-updates", "10"), "--warmup (50) must be between 0 and --max-updates (10)"),
    (("--min-lr", "1e-2"), "--min-lr (0.01) is above --lr (0.003)"),
    (("--block-size", "4096"), "--block-size 4096 is longer than the tiny model's context"),
    (("--loss-scale", "0.5"), "need --min-loss-scale <= --loss-scale <= --max-loss-scale"),
    (("--max-skipped-updates", "0"), "--max-skipped-updates must be >= 1"),
    (("--device", "cuda"), "--device: device 'cuda' was requested but"),
])
def test_bad_settings_are_one_line_naming_the_flag(synthetic_dir, tmp_path, capsys, monkeypatch, flags, says):
    monkeypatch.setattr(train.backend, "cuda_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(tiny_argv(synthetic_dir, tmp_path / "x", *flags))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "warmup_steps" not in err and "peak_lr" not in err


def test_the_count_of_skipped_updates_survives_a_resume(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "diverging"
    diverge = ("--lr", "1e3", "--min-lr", "1", "--warmup", "0", "--max-skipped-updates", "3", "--eval-every", "7")
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "7", *diverge)) == 0
    skipped = [r["skipped"] for r in read_log(out) if r["kind"] == "update"]
    assert skipped[-3:] == [False, True, True]  # the weights overflow after a few updates at lr 1e3
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "12", "--resume", *diverge)) == 3
    assert [r["step"] for r in read_log(out) if r["kind"] == "update"][-1] == 8  # the third skip in a row
    assert "3 updates in a row" in capsys.readouterr().err


def test_ranks_stop_together_when_any_rank_got_a_signal():
    from types import SimpleNamespace
    from tinygrad3.distributed import InProcessGroup

    def rank_main(comm):
        trainer = SimpleNamespace(comm=comm, world_size=comm.world_size, step=0)
        train.Trainer.agree_on_step(trainer, 1.0, False, stop=comm.rank == 2)
        return trainer.stop_agreed

    def no_signal(comm):
        trainer = SimpleNamespace(comm=comm, world_size=comm.world_size, step=0)
        train.Trainer.agree_on_step(trainer, 1.0, False)
        return trainer.stop_agreed

    assert InProcessGroup(3).run(rank_main) == [True, True, True]
    assert InProcessGroup(3).run(no_signal) == [False, False, False]
