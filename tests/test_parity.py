"""bench/parity.py on the CPU: our Trainer and Hugging Face's Gemma3ForCausalLM in torch, same
weights and batches, loss curves compared at every update and eval."""
import csv
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[test]'")

from bench import parity, parity_torch  # noqa: E402

CLIP = 2.5  # the first updates' gradient norms (about 2.8) are clipped, later ones (below 2.5) not


def _run(data, out, dtype, updates, eval_every, tolerance, warmup=5):
    argv = ["--preset", "tiny", "--data", data, "--device", "cpu", "--dtype", dtype, "--out", str(out),
            "--updates", str(updates), "--eval-every", str(eval_every), "--eval-batches", "2",
            "--batch-size", "4", "--block-size", "32", "--grad-accum", "2", "--lr", "1e-3", "--min-lr", "1e-4",
            "--warmup", str(warmup), "--clip", str(CLIP), "--tolerance", str(tolerance),
            "--update-tolerance", str(tolerance)]
    code = parity.main(argv)
    with open(os.path.join(out, "parity.json")) as f:
        return code, json.load(f)


def _worst(report):
    return max([u["rel"] for u in report["updates"]]
               + [max(e["rel_train"], e["rel_val"]) for e in report["evals"]])


def test_float64_curves_agree_to_1e_6_at_every_step(synthetic_dir, tmp_path):
    code, report = _run(synthetic_dir, tmp_path, "float64", updates=30, eval_every=10, tolerance=1e-6)
    assert code == 0, report["summary"]["message"]
    updates, evals = report["updates"], report["evals"]
    assert len(updates) == 30 and [e["step"] for e in evals] == [0, 10, 20, 30]
    assert all(u["rel"] <= 1e-6 for u in updates)
    assert all(e["rel_train"] <= 1e-6 and e["rel_val"] <= 1e-6 for e in evals)
    norms = [u["ours_grad_norm"] for u in updates]
    assert min(norms) < CLIP < max(norms)  # both branches of clipping ran
    assert evals[-1]["ours_val"] < evals[0]["ours_val"] - 1.0  # it learned
    with open(tmp_path / "parity.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "parity.png").stat().st_size > 0


def test_float32_curves_agree(synthetic_dir, tmp_path):
    code, report = _run(synthetic_dir, tmp_path, "float32", updates=6, eval_every=3, tolerance=1e-5)
    assert code == 0, report["summary"]["message"]
    assert _worst(report) <= 1e-5  # measured: about 2e-7 over 30 updates


def test_float64_is_exact_once_the_references_float32_is_widened(synthetic_dir, tmp_path, monkeypatch):
    """What separates the two in float64 is Hugging Face's float32 inside: RMSNorm and the eager
    softmax upcast to float32 (not 64), and its float32 RoPE tables differ from ours by an ulp
    (torch's and NumPy's float32 sin/cos/pow). Widened, the curves agree to rounding of float64."""
    import torch
    from transformers.models.gemma3 import modeling_gemma3 as hf
    from tinygrad3.nn_ops.rope import rope_tables

    softmax = torch.nn.functional.softmax

    def wide_softmax(x, dim=None, dtype=None, **kwargs):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    def our_rope_tables(self, x, position_ids, layer_type):
        base = self.config.rope_parameters[layer_type]["rope_theta"]
        tables = rope_tables(self.config.head_dim, base, int(position_ids.max()) + 1, np)
        return tuple(torch.from_numpy(np.asarray(t)).to(x.dtype)[position_ids] for t in tables)

    monkeypatch.setattr(hf.Gemma3RMSNorm, "forward", lambda self, x: self._norm(x) * (1.0 + self.weight))
    monkeypatch.setattr(torch.nn.functional, "softmax", wide_softmax)
    monkeypatch.setattr(hf.Gemma3RotaryEmbedding, "forward", our_rope_tables)
    code, report = _run(synthetic_dir, tmp_path, "float64", updates=6, eval_every=3, tolerance=1e-13)
    assert code == 0, report["summary"]["message"]  # measured: about 4e-16


def test_a_planted_difference_fails_the_run(synthetic_dir, tmp_path, monkeypatch, capsys):
    real_update = parity_torch.TorchReference.update
    monkeypatch.setattr(parity_torch.TorchReference, "update", lambda self, lr: real_update(self, lr * 1.01))
    code, report = _run(synthetic_dir, tmp_path, "float64", updates=3, eval_every=3, tolerance=1e-6,
                        warmup=1)
    assert code == 1 and not report["summary"]["passed"]
    assert "PARITY FAILED" in capsys.readouterr().out
    assert report["updates"][0]["rel"] < 1e-6 < _worst(report)  # the first loss precedes any update


def _control(data, out, *extra):
    from bench import torch_self_parity

    argv = ["--preset", "tiny", "--data", data, "--device", "cpu", "--out", str(out), "--updates", "4",
            "--eval-every", "2", "--eval-batches", "2", "--batch-size", "4", "--block-size", "32",
            "--warmup", "1", *extra]
    code = torch_self_parity.main(argv)
    with open(out / "parity.json") as f:
        return code, json.load(f)


def test_the_control_runs_pytorch_against_itself_with_the_same_report(synthetic_dir, tmp_path):
    """bench/torch_self_parity.py: eager against SDPA attention, the same table, files and verdict."""
    code, report = _control(synthetic_dir, tmp_path, "--dtype", "float64", "--tolerance", "1e-6")
    assert code == 0
    assert report["summary"]["sides"] == ["eager", "sdpa"] and len(report["updates"]) == 4
    assert [e["step"] for e in report["evals"]] == [0, 2, 4]
    assert all(e["rel_val"] <= 1e-6 for e in report["evals"])  # the same maths in float64
    assert report["evals"][-1]["eager_val"] < report["evals"][0]["eager_val"]  # it trained


def test_the_float32_control_trains_fp16_autocast_against_float32(synthetic_dir, tmp_path):
    code, report = _control(synthetic_dir, tmp_path, "--dtype", "float16", "--control", "float32",
                            "--tolerance", "1e-2")
    assert code == 0, report["summary"]["message"]
    assert report["summary"]["sides"] == ["fp16", "fp32"]
    assert report["updates"][0]["fp16_scale"] == 2.0 ** 16 and report["updates"][0]["fp32_scale"] == 1.0
    assert 0 < report["evals"][0]["rel_val"] < 1e-2  # fp16 rounding, visible but small


def test_single_batch_losses_are_bounded_only_when_asked():
    summary = dict(max_rel_eval=0.01, final_rel_val=0.005, max_rel_update_loss=0.03,
                   tolerance=0.02, final_tolerance=0.01, update_tolerance=None)
    assert parity.verdict(summary)[0]
    assert not parity.verdict(dict(summary, update_tolerance=0.02))[0]
    assert not parity.verdict(dict(summary, max_rel_eval=0.021))[0]
    assert not parity.verdict(dict(summary, final_rel_val=0.011))[0]


def test_grad_precision_ours_fp16_gradients_are_as_close_to_float32_as_autocast(synthetic_dir, tmp_path):
    """bench/grad_precision.py on the CPU: every side's fp16 gradient is off float32 by fp16 rounding
    (not zero, not large), and ours by no more than 1.5x autocast's in any parameter group."""
    from bench import grad_precision

    argv = ["--preset", "tiny", "--data", synthetic_dir, "--device", "cpu", "--batch-size", "2",
            "--block-size", "16", "--grad-accum", "1", "--warmup", "1", "--at", "0", "--out", str(tmp_path)]
    assert grad_precision.main(argv) == 0
    with open(tmp_path / "grad_precision.json") as f:
        (result,) = json.load(f)["results"]
    errors = result["errors"]
    assert set(errors) == {"torch-eager", "torch-sdpa", "ours", "ours-all-fp16"}
    assert all(count == 0 for count in result["nonfinite"].values())
    for group, torch_error in errors["torch-eager"].items():
        assert 1e-5 < errors["ours"][group] < 1.5 * max(torch_error, errors["torch-sdpa"][group]), group
    assert errors["ours"]["all"] < 1e-2
    assert set(result["from_torch_eager"]) == {"torch-sdpa", "ours", "ours-all-fp16"}
