"""models/export.py: a tiny train.py run exported for Hugging Face loads with AutoModelForCausalLM and
AutoTokenizer offline and gives our logits, token ids and greedy continuations; bfloat16 is float32
rounded to nearest even; bad runs and a non-empty --out are refused in one line."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train
from data.synthetic import generate_stories
from data.tokenizer import EOT_ID, gpt2, gpt2_tokenizer
from models import Gemma3, Gemma3Config, generate, load_hf_checkpoint
from models import export
from nn.checkpoint import load_weights, save_weights
from tests.train_runs import tiny_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 50257
@pytest.fixture(scope="module")
def gpt2_run(synthetic_dir, tmp_path_factory):
    """A tiny GPT-2 run of 3 updates (best.safetensors and last/ at update 3); train.py writes its
    tokenizer/ folder and config.json's "tokenizer" field."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert train.main(tiny_argv(synthetic_dir, out, "--max-updates", "3", "--eval-every", "3")) == 0
    with open(out / "config.json") as f:
        assert json.load(f)["tokenizer"] == gpt2_tokenizer().identity()
    assert sorted(os.listdir(out / "tokenizer")) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    return str(out)


def export_to(run, out, *extra):
    assert export.main(["--run", run, "--out", str(out), *extra]) == 0
    return str(out)


@pytest.fixture(scope="module")
def exported(gpt2_run, tmp_path_factory):
    return export_to(gpt2_run, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def hf_float32(exported):
    return hf_load(exported)


def ours(run, weights="best.safetensors"):
    with open(os.path.join(run, "config.json")) as f:
        model = Gemma3(Gemma3Config.from_dict(json.load(f)["model"]))
    model.load_state_dict(load_weights(os.path.join(run, weights)))
    return model


def hf_load(directory):
    """(Gemma3ForCausalLM, its loading info) read offline; every key must have been in the file."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[test]'")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def assert_same_logits(torch, hf, model, ids):
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.float().numpy()
    mine = model(ids)[0].numpy()
    assert theirs.shape == ids.shape + (hf.config.vocab_size,)
    diff = np.abs(theirs - mine[..., :hf.config.vocab_size]).max()
    assert diff <= 1e-5 * max(1.0, np.abs(mine).max()), diff


def assert_same_greedy(torch, hf, model, prompts, n=20):
    """HF generate(do_sample=False) equals our greedy generation token for token; returns ours."""
    continuations = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        mine = generate(model, prompt, n, greedy=True, stop_id=EOT_ID)
        assert theirs[0, len(prompt):].tolist() == mine
        continuations += mine
    return continuations


def test_float32_export_gives_our_logits_and_vocabulary(torch, gpt2_run, exported, hf_float32):
    hf = hf_float32
    assert hf.config.vocab_size == VOCAB and hf.dtype == torch.float32 and not hf.config.tie_word_embeddings
    assert hf.model.embed_tokens.weight.shape[0] == VOCAB and hf.lm_head.weight.shape[0] == VOCAB
    special = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert [getattr(c, k) for c in (hf.config, hf.generation_config) for k in special] == [EOT_ID] * 6
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 40))  # longer than the sliding window of 8
    model = ours(gpt2_run)
    assert_same_logits(torch, hf, model, ids)
    back = load_hf_checkpoint(exported)  # and our own reader takes it back
    np.testing.assert_allclose(back(ids)[0].numpy(), model(ids)[0].numpy()[..., :VOCAB], rtol=0, atol=1e-5)
    with open(os.path.join(exported, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}


def test_tokenizer_gives_our_ids(exported):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert len(tokenizer) == VOCAB and tokenizer.eos_token_id == EOT_ID
    texts = generate_stories(4, seed=7) + ["  Tabs\tand   spaces, naïve café “quotes” 😀 1234567 it's"]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == gpt2().encode_ordinary(text)


def test_greedy_generation_equals_ours(torch, gpt2_run, hf_float32):
    prompts = [gpt2().encode_ordinary(story)[:12] for story in generate_stories(2, seed=3)]
    assert_same_greedy(torch, hf_float32, ours(gpt2_run), prompts)


def test_bfloat16_export_is_our_float32_rounded_to_nearest_even(torch, gpt2_run, tmp_path):
    out = export_to(gpt2_run, tmp_path / "bf16", "--dtype", "bfloat16")
    hf = hf_load(out)
    assert hf.dtype == torch.bfloat16 and hf.config.dtype == torch.bfloat16
    masters = load_weights(os.path.join(gpt2_run, "best.safetensors"))
    params = dict(hf.named_parameters())
    assert set(params) == set(masters)
    for name, master in masters.items():
        expected = torch.from_numpy(master[:VOCAB] if "embed" in name or "lm_head" in name else master)
        expected = expected.to(torch.bfloat16)  # torch rounds to nearest, ties to even
        assert torch.equal(params[name].detach().view(torch.int16), expected.view(torch.int16)), name


def test_bfloat16_bits_round_ties_to_even(torch):
    # 1 + 2^-8 (a tie, to even: down), 1 + 3 * 2^-8 (a tie, up), just above a tie, negatives,
    # a subnormal, the largest finite bfloat16 and a carry into the exponent.
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0xBF808000, 0xBF818000, 0x00018000, 0x7F7F0000,
                     0x3FFFFFFF, 0x00000000, 0x80000000], dtype=np.uint32)
    values = bits.view(np.float32)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(export.bfloat16_bits(values), expected)
    random = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    expected = torch.from_numpy(random).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(export.bfloat16_bits(random), expected)


def tied_run(directory, gpt2_run):
    """A run directory holding a tied-embedding model with random weights: the embedding at its initial
    scale, everything else (the norms too) large, so that greedy text varies."""
    os.makedirs(directory)
    config = dataclasses.replace(Gemma3Config.tiny(), tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal(a.shape) * (0.02 if "embed" in name else 0.3)).astype(np.float32)
               for name, a in Gemma3(config).state_dict().items()}
    save_weights(weights, os.path.join(directory, "best.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"args": {"preset": "tiny"}, "model": config.to_dict(), "tokenizer": gpt2_tokenizer().identity()},
                  f)
    shutil.copytree(os.path.join(gpt2_run, "tokenizer"), os.path.join(directory, "tokenizer"))
    return str(directory)


def test_tied_embeddings_export_without_a_head(torch, gpt2_run, tmp_path):
    run = tied_run(tmp_path / "tied", gpt2_run)
    out = export_to(run, tmp_path / "hf")
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in f.keys() and f.get_slice("model.embed_tokens.weight").get_shape()[0] == VOCAB
    hf = hf_load(out)
    assert hf.config.tie_word_embeddings and hf.config.vocab_size == VOCAB
    model = ours(run)
    assert_same_logits(torch, hf, model, np.random.default_rng(1).integers(0, VOCAB, size=(2, 24)))
    prompts = [gpt2().encode_ordinary(story)[50:56] for story in generate_stories(2, seed=5)]
    assert len(set(assert_same_greedy(torch, hf, model, prompts))) > 10  # a continuation that tells something


def test_weights_last_exports_the_checkpoint(gpt2_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(gpt2_run, run)
    best = os.path.join(run, "best.safetensors")
    save_weights({name: a * 2 for name, a in load_weights(best).items()}, best)  # best now differs from last
    from safetensors.numpy import load_file
    for which, source in (("last", os.path.join(run, "last", "model.safetensors")), ("best", best)):
        out = export_to(run, tmp_path / which, "--weights", which)
        written = load_file(os.path.join(out, "model.safetensors"))
        for name, array in load_weights(source).items():
            np.testing.assert_array_equal(written[name], array[:VOCAB] if name.endswith("embed_tokens.weight")
                                          or name == "lm_head.weight" else array)


def refusing_run(directory, gpt2_run, damage):
    """A copy of the run's config.json and tokenizer/ with the weights the case asks for."""
    os.makedirs(directory)
    shutil.copyfile(os.path.join(gpt2_run, "config.json"), os.path.join(directory, "config.json"))
    if damage != "no tokenizer":
        shutil.copytree(os.path.join(gpt2_run, "tokenizer"), os.path.join(directory, "tokenizer"))
    best = os.path.join(gpt2_run, "best.safetensors")
    if damage == "truncated weights":
        with open(best, "rb") as f, open(os.path.join(directory, "best.safetensors"), "wb") as g:
            g.write(f.read(4096))
    elif damage != "no weights":
        os.symlink(best, os.path.join(directory, "best.safetensors"))
    if damage == "no tokenizer field":
        with open(os.path.join(gpt2_run, "config.json")) as f:
            config = json.load(f)
        config.pop("tokenizer")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
    return str(directory)


@pytest.mark.parametrize("damage,expected", [
    ("no weights", "has no best.safetensors (try --weights last)"),
    ("truncated weights", "best.safetensors is damaged"),
    ("no tokenizer", "has no tokenizer files"),
    ("no tokenizer field", "config.json has no \"tokenizer\" field"),
])
def test_a_bad_run_is_one_line(capsys, gpt2_run, tmp_path, damage, expected):
    run = refusing_run(tmp_path / "run", gpt2_run, damage)
    assert export.main(["--run", run, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing written, no temporaries left


def test_a_missing_or_foreign_run_is_one_line_from_the_shell(tmp_path):
    os.makedirs(tmp_path / "empty")
    for run, expected in ((tmp_path / "missing", "is not a directory"), (tmp_path / "empty", "has no config.json")):
        done = subprocess.run([sys.executable, "-m", "models.export", "--run", str(run), "--out",
                               str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()


def test_a_non_empty_out_needs_overwrite(capsys, gpt2_run, tmp_path):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")
    assert export.main(["--run", gpt2_run, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--overwrite" in err, err
    assert os.listdir(out) == ["keep.txt"]
    assert export.main(["--run", gpt2_run, "--out", str(gpt2_run), "--overwrite"]) == 2  # would delete the run
    assert "holds the run" in capsys.readouterr().err and os.path.isfile(os.path.join(gpt2_run, "best.safetensors"))
    export_to(gpt2_run, out, "--overwrite")
    assert "keep.txt" not in os.listdir(out) and {"config.json", "model.safetensors", "vocab.json"} <= set(
        os.listdir(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_interrupted_export_leaves_the_old_directory_whole(monkeypatch, capsys, gpt2_run, tmp_path):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")

    def disk_full(path, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_json", disk_full)  # after model.safetensors is written
    assert export.main(["--run", gpt2_run, "--out", str(out), "--overwrite"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    assert export.main(["--run", gpt2_run, "--out", str(tmp_path / "new")]) == 1
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no directory that looks like an export
