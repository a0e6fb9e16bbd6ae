"""train.py's model flags: --model FIELD=VALUE and --model-config over the preset, --tokenizer (the
vocabulary follows it, uint32 data above 65,535 ids), --init-from a run directory; what config.json
records and resume compares; every mistake one line naming the flag."""
import json
import os

import numpy as np
import pytest

import train
from data.errors import DataError
from data.tokenizer import load_tokenizer
from nn.checkpoint import load_weights
from small_tokenizers import train_bpe, widen
from train_runs import read_log, tiny_argv


def run_config(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def one_line_error(capsys, argv):
    """The stderr line of a train.py start refused with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_model_fields_override_the_preset_and_are_recorded(synthetic_dir, tmp_path, capsys):
    (tmp_path / "model.json").write_text(json.dumps({"intermediate_size": 96, "rms_norm_eps": 1e-5}))
    out = tmp_path / "run"
    argv = tiny_argv(synthetic_dir, out, "--max-updates", "2", "--warmup", "1", "--model-config",
                     str(tmp_path / "model.json"), "--model", "hidden_size=32", "num_hidden_layers=2",
                     "intermediate_size=80")
    assert train.main(argv) == 0
    model = run_config(out)["model"]
    assert (model["hidden_size"], model["num_hidden_layers"], model["intermediate_size"]) == (32, 2, 80)  # --model wins
    assert model["rms_norm_eps"] == 1e-5 and model["head_dim"] == 16  # the file's field, the preset's field
    assert model["layer_types"] == ["sliding_attention", "sliding_attention"]  # Hugging Face's pattern for 2 layers
    assert load_weights(os.path.join(out, "best.safetensors"))["model.embed_tokens.weight"].shape == (50304, 32)
    # Resume compares the resolved config: the same flags continue, another size is refused.
    assert train.main(argv[:-4] + ["--model", "hidden_size=32", "num_hidden_layers=2", "intermediate_size=80",
                                   "--max-updates", "3", "--resume"]) == 0
    assert [r["step"] for r in read_log(out) if r["kind"] == "update"] == [1, 2, 3]
    capsys.readouterr()
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "4", "--warmup", "1", "--resume")) == 2
    assert "different model config (differs in hidden_size, intermediate_size" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (("--model", "hidden_sizee=32"), "--model: unknown model field 'hidden_sizee'"),
    (("--model", "hidden_size"), "--model: expected FIELD=VALUE, got 'hidden_size'"),
    (("--model", "hidden_size=big"), "--model: hidden_size must be int, got 'big'"),
    (("--model", "hidden_size=32.5"), "--model: hidden_size must be int, got 32.5"),
    (("--model", "tie_word_embeddings=1"), "--model: tie_word_embeddings must be bool, got 1"),
    (("--model", "num_key_value_heads=3"), "--model: num_attention_heads (4) must be a multiple of"),
    (("--model", "num_hidden_layers=0"), "--model: num_hidden_layers must be a positive number, got 0"),
    (("--model", "layer_types=[\"global\",\"full_attention\",\"full_attention\"]"), "--model: unknown layer types"),
    (("--model", "max_position_embeddings=16"), "--block-size 32 is longer than the tiny model's context (16"),
    (("--init-from", "."), "--preset tiny and --init-from: the model comes from .; drop --preset"),
])
def test_bad_model_flags_are_one_line(synthetic_dir, tmp_path, capsys, flags, says):
    assert says in one_line_error(capsys, tiny_argv(synthetic_dir, tmp_path / "x", *flags))


def test_bad_model_config_files_and_init_from_paths_are_one_line(synthetic_dir, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    err = one_line_error(capsys, tiny_argv(synthetic_dir, tmp_path / "x", "--model-config",
                                           str(tmp_path / "list.json")))
    assert "--model-config" in err and "expected a JSON object of model fields, got list" in err
    err = one_line_error(capsys, tiny_argv(synthetic_dir, tmp_path / "x", "--model-config", str(tmp_path / "none")))
    assert "--model-config" in err and "cannot read a JSON object" in err
    (tmp_path / "empty").mkdir()
    argv = [a for a in tiny_argv(synthetic_dir, tmp_path / "x") if a not in ("--preset", "tiny")]
    err = one_line_error(capsys, argv + ["--init-from", str(tmp_path / "empty")])
    assert "--init-from" in err and "no config.json there" in err


def test_init_from_a_run_starts_from_its_best_weights_with_a_fresh_optimizer(synthetic_dir, tmp_path):
    first = tmp_path / "first"
    assert train.main(tiny_argv(synthetic_dir, first, "--max-updates", "4", "--model", "hidden_size=32")) == 0
    argv = [a for a in tiny_argv(synthetic_dir, tmp_path / "second") if a not in ("--preset", "tiny")]
    trainer = train.setup(train.parse_args(argv + ["--init-from", str(first)]))
    assert trainer.model.config.hidden_size == 32 and trainer.step == 0 and trainer.optimizer.step_count == 0
    best = load_weights(os.path.join(first, "best.safetensors"))
    for name, array in trainer.model.state_dict().items():
        np.testing.assert_array_equal(array, best[name], err_msg=name)
    assert not np.asarray(trainer.optimizer.m).any()  # the moments start at zero
    assert run_config(tmp_path / "second")["tokenizer"] == load_tokenizer("gpt2").identity()


def test_a_tokenizer_sets_the_vocabulary_and_another_tokenizers_data_is_refused(synthetic_dir, tmp_path, capsys):
    tokenizer = train_bpe(tmp_path / "bpe", merges=100, config={"bos_token": "<bos>", "eos_token": "<eos>"})
    vocab = load_tokenizer(tokenizer).vocab_size
    args = train.parse_args(tiny_argv("synthetic", tmp_path / "run", "--tokenizer", str(tokenizer)))
    assert (args.config["vocab_size"], args.config["unpadded_vocab_size"]) == (128 * -(-vocab // 128), vocab)
    # synthetic_dir holds GPT-2 tokens: refused, naming both tokenizers and the fix.
    with pytest.raises(DataError) as error:
        train.setup(train.parse_args(tiny_argv(synthetic_dir, tmp_path / "other", "--tokenizer", str(tokenizer))))
    assert "gpt2" in str(error.value) and "python -m data.prepare --tokenizer" in str(error.value)
    status = train.main(tiny_argv(synthetic_dir, tmp_path / "third", "--tokenizer", str(tokenizer)))
    assert status == 2 and "python -m data.prepare --tokenizer" in capsys.readouterr().err


def test_uint32_data_train_end_to_end(tmp_path):
    """A tokenizer with ids above 65,535: prepared into uint32 bins, loaded and trained on."""
    pytest.importorskip("datasets")
    wide = widen(train_bpe(tmp_path / "bpe", merges=100, config={"bos_token": "<bos>", "eos_token": "<eos>"}),
                 tmp_path / "wide")
    stories = tmp_path / "stories.jsonl"
    from data.synthetic import generate_stories
    stories.write_text("".join(json.dumps({"text": s}) + "\n" for s in generate_stories(200, seed=1)))
    out = tmp_path / "run"
    assert train.main(tiny_argv(str(stories), out, "--tokenizer", str(wide), "--max-updates", "2", "--warmup", "1",
                                "--model", "hidden_size=16", "intermediate_size=32")) == 0
    data = run_config(out)["data"]
    with open(os.path.join(data, "meta.json")) as f:
        assert json.load(f)["dtype"] == "uint32"
    tokens = np.fromfile(os.path.join(data, "train.bin"), dtype=np.uint32)
    assert tokens.min() >= 65536 and run_config(out)["model"]["vocab_size"] > tokens.max()
    losses = [r["loss"] for r in read_log(out) if r["kind"] == "update"]
    assert len(losses) == 2 and all(np.isfinite(losses))
