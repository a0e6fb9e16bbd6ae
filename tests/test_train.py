"""train.py and generate.py on the CPU: exact resume, learning, checkpoints, end to end."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import train
from train_runs import read_log, tiny_argv
from data.synthetic import unigram_entropy
from data.loader import BatchLoader
from models import Gemma3, Gemma3Config
from nn.checkpoint import load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resumed_run_is_bit_identical(synthetic_dir, tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train.main(tiny_argv(synthetic_dir, whole, "--max-updates", "10")) == 0

    calls = {"n": 0}
    real_update = train.Trainer.update

    def interrupted_update(self):
        calls["n"] += 1
        if calls["n"] == 7:  # Ctrl-C in the middle of update 7 (after the eval at update 4)
            os.kill(os.getpid(), signal.SIGINT)
        return real_update(self)

    monkeypatch.setattr(train.Trainer, "update", interrupted_update)
    assert train.main(tiny_argv(synthetic_dir, split, "--max-updates", "10")) == 130
    monkeypatch.setattr(train.Trainer, "update", real_update)
    with open(split / "last" / "state.json") as f:
        assert json.load(f)["step"] == 7  # update 7 finished, then the run stopped and saved
    assert train.main(tiny_argv(synthetic_dir, split, "--max-updates", "10", "--resume")) == 0

    a, b = read_log(whole), read_log(split)
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for ra, rb in zip(a, b):  # same losses to the last bit, evals included
        for key in ("loss", "train", "validation", "grad_norm", "lr"):
            assert ra.get(key) == rb.get(key), (ra, rb)
    wa, wb = load_weights(str(whole / "best.safetensors")), load_weights(str(split / "best.safetensors"))
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name])


def test_tiny_model_learns_far_below_unigram_entropy(synthetic_dir, tmp_path):
    out = tmp_path / "learn"
    argv = tiny_argv(synthetic_dir, out, "--max-updates", "120", "--eval-every", "60", "--batch-size", "8",
                 "--grad-accum", "1", "--warmup", "10")
    assert train.main(argv) == 0
    tokens = BatchLoader(synthetic_dir, 1, 8).data["train"]
    entropy = unigram_entropy(np.asarray(tokens))
    final = [r for r in read_log(out) if r["kind"] == "eval"][-1]
    assert entropy > 4.0
    assert final["validation"] < 0.5 * entropy, (final, entropy)


def test_run_directory_outputs_and_checkpoint_checks(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 0
    for name in ("config.json", "log.jsonl", "loss.png", "best.safetensors", "last/state.json",
                 "last/model.safetensors", "last/optimizer.safetensors"):
        assert (out / name).exists(), name
    records = read_log(out)
    assert [r["step"] for r in records if r["kind"] == "update"] == [1, 2, 3, 4]
    assert all(r["skipped"] is False for r in records if r["kind"] == "update")
    model = Gemma3(Gemma3Config.tiny())
    model.load_state_dict(load_weights(str(out / "best.safetensors")))  # the model file loads as is

    # A second run into the same directory must not silently overwrite it.
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4")) == 2
    # Resuming with another model config is refused with a clear error.
    config = json.loads((out / "last" / "state.json").read_text())
    config["config"]["hidden_size"] = 32
    (out / "last" / "state.json").write_text(json.dumps(config))
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "8", "--resume")) == 2


def test_recompute_trains_with_the_same_losses(synthetic_dir, tmp_path):
    """--recompute (each decoder layer re-run in backward) changes memory and time, not the numbers."""
    logs = {}
    for flag in ((), ("--recompute",)):
        out = tmp_path / ("recompute" if flag else "plain")
        assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "3", "--eval-every", "3", *flag)) == 0
        logs[bool(flag)] = read_log(out)
        assert json.loads((out / "config.json").read_text())["args"]["recompute"] == bool(flag)
    plain, ours = logs[False], logs[True]
    assert [r["kind"] for r in ours] == [r["kind"] for r in plain] == ["update"] * 3 + ["eval"]
    for a, b in zip(plain, ours):  # float32: the same bits in our runs; allow last-bit differences
        for key in ("loss", "grad_norm", "train", "validation"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (key, a, b)
    assert plain[0]["loss"] != plain[2]["loss"]  # the updates did change the model
    # It is not part of what a resume must keep: a plain run continues with it.
    assert train.main(tiny_argv(synthetic_dir, tmp_path / "plain", "--max-updates", "4", "--resume",
                            "--recompute")) == 0
    assert [r["step"] for r in read_log(tmp_path / "plain") if r["kind"] == "update"] == [1, 2, 3, 4]
    args = train.parse_args(tiny_argv(synthetic_dir, tmp_path / "x", "--recompute"))
    assert args.recompute and not train.parse_args(tiny_argv(synthetic_dir, tmp_path / "x")).recompute


def test_train_then_generate_end_to_end(synthetic_dir, tmp_path):
    out = tmp_path / "e2e"
    env = dict(os.environ, TINYGRAD3_DEVICE="cpu", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "train.py", *tiny_argv(synthetic_dir, out, "--max-updates", "24",
                                                             "--eval-every", "12")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--block-size: 32" in run.stdout  # every setting is printed at the start
    gen = subprocess.run([sys.executable, "generate.py", "--run", str(out), "--prompt", "Once upon a time",
                          "--max-new-tokens", "20", "--seed", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("Once upon a time") and len(gen.stdout) > len("Once upon a time") + 5
    missing = subprocess.run([sys.executable, "generate.py", "--run", str(tmp_path / "nothing")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "no config.json" in missing.stderr
