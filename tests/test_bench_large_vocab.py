"""bench/large_vocab.py: google/gemma-3-270m's configuration as built, and the script end to end on the CPU
(--small: the 262,144-token vocabulary with small layers), its ids near the top of the vocabulary included."""
import json
import pathlib
import sys

import numpy as np
import pytest

from models import Gemma3Config

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import large_vocab  # noqa: E402

VOCAB = 262_144


def test_the_built_in_config_is_gemma_3_270m():
    c = large_vocab.build_config(large_vocab.parse_args(["--device", "cpu"]))
    assert (c.vocab_size, c.unpadded_vocab_size, c.tie_word_embeddings) == (VOCAB, None, True)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim) == (640, 2048, 18, 256)
    assert (c.num_attention_heads, c.num_key_value_heads, c.sliding_window) == (4, 1, 512)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (c.rope_theta, c.rope_local_base_freq, c.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert (c.rms_norm_eps, c.max_position_embeddings) == (1e-6, 32_768)


def test_small_keeps_the_vocabulary_and_config_reads_a_file(tmp_path):
    small = large_vocab.build_config(large_vocab.parse_args(["--device", "cpu", "--small"]))
    assert (small.vocab_size, small.tie_word_embeddings, small.hidden_size, small.num_hidden_layers) == \
        (VOCAB, True, 64, 2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(large_vocab.GEMMA3_270M, vocab_size=1024, num_hidden_layers=6,
                                    layer_types=["sliding_attention"] * 5 + ["full_attention"])))
    c = large_vocab.build_config(large_vocab.parse_args(["--device", "cpu", "--config", str(path)]))
    assert (c.vocab_size, c.num_hidden_layers, c.hidden_size) == (1024, 6, 640)


def test_the_batch_holds_the_top_ids_as_inputs_and_targets():
    x, y = large_vocab.fixed_batch(Gemma3Config.tiny(vocab_size=VOCAB, unpadded_vocab_size=None), 2, 16, seed=0)
    assert x.shape == y.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert x.max() == y.max() == VOCAB - 1 and x.min() >= 0 and (y[0, :7] == VOCAB - 2 - np.arange(7)).all()


def test_cpu_run_trains_on_the_full_vocabulary(tmp_path):
    out = tmp_path / "large_vocab.json"
    status = large_vocab.main(["--small", "--device", "cpu", "--check-updates", "4", "--steps", "1",
                               "--commit", "abc1234", "--out", str(out)])
    report = json.loads(out.read_text())
    assert status == 0 and report["passed"]
    assert report["commit"] == "abc1234" and report["device"] == "cpu" and report["gpu"] is None
    assert report["command"].startswith("python bench/large_vocab.py --small") and report["date"]
    assert report["config"]["vocab_size"] == VOCAB and report["config"]["tie_word_embeddings"]
    assert min(report["max_input_id"], report["max_target_id"]) >= 262_000
    assert list(report["paths"]) == ["reference"] and report["first_loss_difference"] is None
    ref = report["paths"]["reference"]
    assert ref["dtype"] == "float32" and len(ref["losses"]) == 4 and ref["finite"] and ref["decreased"]
    assert ref["losses"][-1] < ref["losses"][0] - 0.1  # memorising one batch: a clear fall, not noise
    assert 11.5 < ref["losses"][0] < 13.5  # a random model: about ln(262,144) = 12.48
    assert ref["tok_s"] > 0 and len(ref["times_ms"]) == 1 and ref["pool_peak_gib"] is None


def test_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        large_vocab.parse_args(["--device", "cpu", "--paths", "fast-graphs"])
    assert "--paths fast-graphs needs --device cuda" in capsys.readouterr().err
    assert large_vocab.main(["--device", "cpu", "--small", "--config", "/nonexistent/config.json"]) == 2
    assert "cannot read a Hugging Face config" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_paths_agree_on_the_first_loss(gpu_xp, tmp_path):
    out = tmp_path / "large_vocab.json"
    status = large_vocab.main(["--small", "--device", "cuda", "--batch-size", "2", "--block-size", "64",
                               "--check-updates", "4", "--steps", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert status == 0 and list(report["paths"]) == ["fast-graphs", "reference"] and report["gpu"]
    assert abs(report["first_loss_difference"]) < 1e-2  # the same weights and batch: fp16 roundings apart (loss ~12.5)
    for r in report["paths"].values():
        assert r["dtype"] == "float16" and r["finite"] and r["decreased"] and r["pool_peak_gib"] > 0
