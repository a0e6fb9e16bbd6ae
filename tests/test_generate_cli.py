"""generate.py: every plain user error one line naming the flag, the kernel path line, context
limits, the tokenizer a run or checkpoint was trained with (bos, eos, decoding, no padding id
sampled); batched greedy generation (models/generation.py) against the one-prompt path; on a GPU,
the fast path against the reference path."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import generate as cli
from data.tokenizer import EOT_ID, GPT2_IDENTITY, gpt2, gpt2_tokenizer, load_tokenizer
from models import Gemma3, Gemma3Config, generate
from models.config import padded_vocab
from models.generation import check_sampling, generate_greedy_batch
from nn.checkpoint import save_checkpoint, save_weights
from tinygrad3 import backend, kernels, no_grad

from small_tokenizers import train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(directory, config, seed=0, best=True, last=True, tokenizer=None, weights=None):
    """A run directory as train.py leaves it: config.json, best.safetensors, last/, and with a
    `tokenizer` its tokenizer/ and its identity in config.json (runs from before have neither)."""
    os.makedirs(directory, exist_ok=True)
    record = {"args": {"preset": "tiny"}, "world_size": 1, "model": config.to_dict()}
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer"))
        record["tokenizer"] = tokenizer.identity()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(record, f)
    weights = weights or Gemma3(config, seed=seed).state_dict()
    if best:
        save_weights(weights, os.path.join(directory, "best.safetensors"))
    if last:
        save_checkpoint(os.path.join(directory, "last"), weights, {"m": np.zeros(4, np.float32)}, {"step": 1})
    return str(directory)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("run") / "tiny", Gemma3Config.tiny())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE tokenizer (358 ids; <bos> 0, <eos> 1), not GPT-2."""
    return load_tokenizer(train_bpe(tmp_path_factory.mktemp("bpe") / "stories-bpe", merges=100))


def _bpe_config(tokenizer):
    return Gemma3Config.tiny(vocab_size=padded_vocab(tokenizer.vocab_size), unpadded_vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, bpe):
    """A run trained with `bpe`: its vocabulary padded from 358 to 384 ids."""
    return _write_run(tmp_path_factory.mktemp("bpe_run") / "run", _bpe_config(bpe), tokenizer=bpe)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe):
    """A random Hugging Face Gemma 3 checkpoint with `bpe`'s tokenizer.json; its embedding table has
    42 more rows than the tokenizer has ids."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma3TextConfig(
        vocab_size=bpe.vocab_size + 42, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
        pad_token_id=bpe.vocab_size, bos_token_id=bpe.bos_id, eos_token_id=bpe.eos_id)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    bpe.save(out)
    return str(out)


def _error(capsys, argv):
    """Run main(argv), expecting exit status 2 and one line on stderr; returns that line."""
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "usage:" not in err and "greedy=" not in err, err
    return err.strip()


def _run(capsys, argv):
    assert cli.main(argv) == 0
    return capsys.readouterr()


# ----- arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,expected", [
    (["--prompt", ""], "--prompt is empty"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0 (for always the most likely "
                             "token, use --greedy)"),
    (["--temperature", "-0.5"], "--temperature must be a finite number > 0, got -0.5"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--top-k", "-3", "--greedy"], "--top-k must be >= 1, got -3"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--top-k", "two"], "argument --top-k: invalid int value: 'two'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_naming_the_flag(capsys, run_dir, extra, expected):
    assert expected in _error(capsys, ["--run", run_dir, *extra])


def test_cuda_without_a_gpu_is_one_line(capsys, run_dir):
    if backend.cuda_available():
        pytest.skip("a GPU is present")
    assert "--device: device 'cuda' was requested but" in _error(capsys, ["--run", run_dir, "--device", "cuda"])


def test_no_source_or_two_sources_are_one_line(capsys, run_dir):
    assert "one of the arguments --run --hf is required" in _error(capsys, [])
    assert "not allowed with argument" in _error(capsys, ["--run", run_dir, "--hf", run_dir])


def test_greedy_ignores_the_temperature_and_edges_are_accepted(run_dir):
    args = cli.parse_args(["--run", run_dir, "--greedy", "--temperature", "0"])
    assert args.greedy
    args = cli.parse_args(["--run", run_dir, "--top-p", "1", "--top-k", "1", "--max-new-tokens", "1"])
    assert (args.top_p, args.top_k, args.device, args.dtype) == (1.0, 1, "cpu", "float32")


# ----- the kernel path -------------------------------------------------------------------------
@pytest.mark.parametrize("extra,env,families,line", [
    ([], None, kernels.FAMILIES, "fast path"),
    (["--reference"], None, (), "reference path (--reference)"),
    (["--dtype", "float32"], None, (), "reference path (the fused kernels take float16, not --dtype float32)"),
    ([], "0", (), "reference path (TINYGRAD3_FAST=0)"),
    ([], "1", kernels.FAMILIES, "fast path"),
    ([], "gemm,rmsnorm", ("rmsnorm", "gemm"), "fast path (rmsnorm, gemm)"),
])
def test_kernel_path_on_cuda(monkeypatch, run_dir, extra, env, families, line):
    monkeypatch.setattr(cli.backend, "check_device", lambda device: "cuda")
    if env is None:
        monkeypatch.delenv("TINYGRAD3_FAST", raising=False)
    else:
        monkeypatch.setenv("TINYGRAD3_FAST", env)
    args = cli.parse_args(["--run", run_dir, *extra])
    assert (args.families, args.path) == (families, line)


def test_kernel_path_on_the_cpu_and_a_bad_environment(monkeypatch, capsys, run_dir):
    for extra in ([], ["--reference"], ["--dtype", "float16"]):
        args = cli.parse_args(["--run", run_dir, "--device", "cpu", *extra])
        assert (args.families, args.path) == ((), "reference path (cpu)")
    monkeypatch.setattr(cli.backend, "check_device", lambda device: "cuda")
    monkeypatch.setenv("TINYGRAD3_FAST", "gemm,warp_drive")
    assert "TINYGRAD3_FAST names unknown kernel families ['warp_drive']" in _error(capsys, ["--run", run_dir])


def test_a_story_on_stdout_and_the_path_on_stderr(capsys, run_dir):
    result = _run(capsys, ["--run", run_dir, "--prompt", "Once upon a time", "--max-new-tokens", "5",
                           "--seed", "0", "--device", "cpu"])
    assert result.err == "reference path (cpu)\n"
    assert result.out.startswith("Once upon a time") and result.out.endswith("\n")
    assert kernels.fast_enabled() == frozenset()
    greedy = _run(capsys, ["--run", run_dir, "--prompt", "Once", "--max-new-tokens", "4", "--greedy",
                           "--weights", "last", "--no-cache"])
    cached = _run(capsys, ["--run", run_dir, "--prompt", "Once", "--max-new-tokens", "4", "--greedy",
                           "--weights", "last"])
    assert greedy.out == cached.out and len(greedy.out) > len("Once\n")


# ----- run directories -------------------------------------------------------------------------
def _copy_run(run_dir, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize("content,expected", [
    ('{"model": {"hidden_', "config.json is damaged (not JSON"),
    ("[1, 2]", "config.json holds no model config (it is damaged, or not a train.py run's)"),
    ('{"args": {}}', "config.json holds no model config"),
    ('{"model": {"hidden_size": 64, "warp": 9}}', "the model config in"),
    ('{"model": {"num_hidden_layers": 2, "layer_types": ["x", "y"]}}', "unknown layer types"),
])
def test_a_damaged_run_config_is_one_line(capsys, run_dir, tmp_path, content, expected):
    copy = _copy_run(run_dir, tmp_path)
    (copy / "config.json").write_text(content)
    line = _error(capsys, ["--run", str(copy)])
    assert line.startswith(f"error: --run {copy}: ") and expected in line, line


def test_a_missing_run_is_one_line(capsys, tmp_path):
    line = _error(capsys, ["--run", str(tmp_path / "nothing")])
    assert "has no config.json: it is not a train.py run directory" in line


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _nan(path):
    from safetensors.numpy import load_file, save_file
    arrays = load_file(str(path))
    arrays["model.norm.weight"][3] = np.nan
    save_file(arrays, str(path))


@pytest.mark.parametrize("damage,reason", [(_truncate, "not a readable safetensors file"),
                                           (_nan, "non-finite values in model.norm.weight")])
def test_damaged_weights_are_refused_naming_the_file_and_the_way_out(capsys, run_dir, tmp_path, damage, reason):
    copy = _copy_run(run_dir, tmp_path)
    damage(copy / "best.safetensors")
    line = _error(capsys, ["--run", str(copy)])
    assert line.startswith(f"error: --weights best: {copy / 'best.safetensors'} is damaged (") and reason in line
    assert line.endswith("try --weights last")
    damage(copy / "last" / "model.safetensors")
    line = _error(capsys, ["--run", str(copy), "--weights", "last"])
    assert f"{copy / 'last' / 'model.safetensors'} is damaged" in line
    assert line.endswith("the run has no other intact weights: train it again")


def test_missing_or_mismatched_weights_are_one_line(capsys, run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path)
    (copy / "best.safetensors").unlink()
    assert "the run has not evaluated yet (try --weights last)" in _error(capsys, ["--run", str(copy)])
    small = dataclasses.replace(Gemma3Config.tiny(), intermediate_size=96)
    save_weights(Gemma3(small).state_dict(), str(copy / "best.safetensors"))
    line = _error(capsys, ["--run", str(copy)])
    assert "--weights best:" in line and "checkpoint shape" in line
    import shutil
    shutil.rmtree(copy / "last")
    assert "the run has saved no checkpoint yet (try --weights best)" in _error(
        capsys, ["--run", str(copy), "--weights", "last"])


def test_last_caught_between_its_renames_is_read_from_last_old(capsys, run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path)
    os.rename(copy / "last", copy / "last.old")
    assert _run(capsys, ["--run", str(copy), "--weights", "last", "--max-new-tokens", "2"]).out.startswith("Once")


def test_hf_at_a_run_and_run_at_an_hf_directory(capsys, run_dir, hf_dir, tmp_path):
    line = _error(capsys, ["--hf", run_dir])
    assert line == f"error: --hf {run_dir} is a train.py run directory: use --run {run_dir}"
    line = _error(capsys, ["--run", hf_dir])
    assert line == (f"error: --run {hf_dir} is a Hugging Face checkpoint directory, not a train.py run: "
                    f"use --hf {hf_dir}")
    fresh = tmp_path / "fresh"  # a run that has written only its config.json so far
    fresh.mkdir()
    (fresh / "config.json").write_text(json.dumps({"args": {}, "model": Gemma3Config.tiny().to_dict()}))
    assert "is a train.py run directory: use --run" in _error(capsys, ["--hf", str(fresh)])
    assert "is not a directory" in _error(capsys, ["--hf", str(tmp_path / "nothing")])


def test_a_hugging_face_directory_generates(capsys, hf_dir):
    result = _run(capsys, ["--hf", hf_dir, "--prompt", "Once upon a time", "--max-new-tokens", "3", "--greedy"])
    assert result.err == "reference path (cpu)\n" and result.out.startswith("Once upon a time")


@pytest.mark.parametrize("damage", ["truncated", "nan", "tokenizer", "no weights"])
def test_a_damaged_hugging_face_directory_is_one_line(capsys, hf_dir, tmp_path, damage):
    import shutil
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    weights = copy / "model.safetensors"
    if damage == "truncated":
        _truncate(weights)
        expected = f"{weights} is damaged (Error while deserializing header"
    elif damage == "nan":
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(weights))
        name = "model.layers.1.mlp.up_proj.weight"
        tensors[name][0, 0] = float("nan")
        save_file(tensors, str(weights), metadata={"format": "pt"})
        expected = f"the weights hold non-finite values in {name}: the checkpoint is damaged"
    elif damage == "tokenizer":
        (copy / "tokenizer.json").write_text('{"model": ')
        expected = "its tokenizer cannot be read ("
    else:
        weights.unlink()
        expected = "no *.safetensors files in"
    line = _error(capsys, ["--hf", str(copy), "--prompt", "Once", "--max-new-tokens", "2"])
    assert line.startswith(f"error: --hf {copy}") and expected in line, line


# ----- the tokenizer ---------------------------------------------------------------------------
STORY = "Once upon a time there was a little cat"


def _recording(monkeypatch):
    """Replace generate.py's generate with one that records (prompt ids, new ids, stop id) of each call."""
    calls = []

    def record(model, prompt, *args, **kwargs):
        new = generate(model, prompt, *args, **kwargs)
        calls.append((list(prompt), new, kwargs["stop_id"]))
        return new

    monkeypatch.setattr(cli, "generate", record)
    return calls


def test_a_run_encodes_and_decodes_with_its_own_tokenizer(capsys, monkeypatch, bpe, bpe_run):
    calls = _recording(monkeypatch)
    out = _run(capsys, ["--run", bpe_run, "--prompt", STORY, "--max-new-tokens", "8", "--greedy"]).out
    [(prompt, new, stop)] = calls
    assert prompt == [bpe.bos_id] + bpe.encode(STORY) and prompt != gpt2().encode_ordinary(STORY)
    assert stop == bpe.eos_id == 1
    body = new[:-1] if new[-1] == bpe.eos_id else new
    assert len(body) >= 4 and bpe.decode(body) != gpt2().decode(body)
    assert out == STORY + bpe.decode(body) + "\n"


def _always_eos(config, eos_id):
    """Weights whose every next token is `eos_id`: the layers add nothing to the embedding, whose
    first feature is positive, and only eos's row of the head reads that feature."""
    state = Gemma3(config, seed=0).state_dict()
    for name, array in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight")):
            array[...] = 0
    state["model.embed_tokens.weight"][:, 0] = np.abs(state["model.embed_tokens.weight"][:, 0]) + 1
    state["lm_head.weight"][eos_id, 0] = 1
    return state


def test_generation_stops_at_the_tokenizers_eos(capsys, monkeypatch, bpe, tmp_path):
    config = _bpe_config(bpe)
    run = _write_run(tmp_path / "eos", config, tokenizer=bpe, last=False, weights=_always_eos(config, bpe.eos_id))
    calls = _recording(monkeypatch)
    assert _run(capsys, ["--run", run, "--prompt", STORY, "--max-new-tokens", "5", "--greedy"]).out == STORY + "\n"
    assert [(new, stop) for _, new, stop in calls] == [([bpe.eos_id], bpe.eos_id)]


def test_a_run_without_a_tokenizer_is_gpt2(capsys, monkeypatch, run_dir, tmp_path):
    calls = _recording(monkeypatch)
    _run(capsys, ["--run", run_dir, "--prompt", STORY, "--max-new-tokens", "2", "--greedy"])
    recorded = _copy_run(run_dir, tmp_path)  # config.json names GPT-2, no tokenizer/
    config = json.loads((recorded / "config.json").read_text())
    (recorded / "config.json").write_text(json.dumps(dict(config, tokenizer=GPT2_IDENTITY)))
    _run(capsys, ["--run", str(recorded), "--prompt", STORY, "--max-new-tokens", "2", "--greedy"])
    gpt2_tokenizer().save(recorded / "tokenizer")  # GPT-2 saved as vocab.json + merges.txt
    _run(capsys, ["--run", str(recorded), "--prompt", STORY, "--max-new-tokens", "2", "--greedy"])
    assert len(calls) == 3
    for prompt, _, stop in calls:
        assert prompt == gpt2().encode_ordinary(STORY) and stop == EOT_ID


def test_a_tokenizer_other_than_the_runs_is_one_line(capsys, bpe, bpe_run, tmp_path):
    other = load_tokenizer(train_bpe(tmp_path / "other", merges=80))
    copy = _copy_run(bpe_run, tmp_path)
    line = _error(capsys, ["--run", str(copy), "--tokenizer", str(tmp_path / "other")])
    assert line == (f"error: --tokenizer {tmp_path / 'other'} is other (sha256 {other.sha256[:8]}, 338 ids), but "
                    f"the model was trained with stories-bpe (sha256 {bpe.sha256[:8]}, 358 ids) (config.json): "
                    "give that tokenizer with --tokenizer SPEC")
    config = json.loads((copy / "config.json").read_text())
    for recorded in (other.identity(), dict(bpe.identity(), vocab_size=359)):
        (copy / "config.json").write_text(json.dumps(dict(config, tokenizer=recorded)))
        line = _error(capsys, ["--run", str(copy)])
        assert line.startswith(f"error: --run {copy}: {copy / 'tokenizer'} is stories-bpe (sha256 {bpe.sha256[:8]}, "
                               "358 ids), but the model was trained with "), line
    (copy / "config.json").write_text(json.dumps(config))
    import shutil
    shutil.rmtree(copy / "tokenizer")
    line = _error(capsys, ["--run", str(copy)])
    assert line == (f"error: --run {copy} has no tokenizer/ directory, but its model was trained with stories-bpe "
                    f"(sha256 {bpe.sha256[:8]}, 358 ids): give that tokenizer with --tokenizer SPEC")
    assert _run(capsys, ["--run", str(copy), "--tokenizer", str(os.path.join(bpe_run, "tokenizer")),
                         "--max-new-tokens", "2"]).out.startswith("Once")
    (copy / "config.json").write_text(json.dumps(dict(config, tokenizer="stories-bpe")))
    assert "the tokenizer field of" in _error(capsys, ["--run", str(copy)])
    line = _error(capsys, ["--run", run_dir_of_gpt2(tmp_path), "--tokenizer", "gpt2"])
    assert line.endswith("has more ids than the model's 358: give the tokenizer the model was trained with "
                         "(--tokenizer SPEC)"), line


def run_dir_of_gpt2(tmp_path):
    """A run from before runs saved their tokenizer whose vocabulary is not GPT-2's."""
    return _write_run(tmp_path / "small", Gemma3Config.tiny(vocab_size=384, unpadded_vocab_size=358), last=False)


def test_a_hugging_face_directory_uses_its_tokenizer(capsys, monkeypatch, bpe, hf_dir, tmp_path):
    calls = _recording(monkeypatch)
    out = _run(capsys, ["--hf", hf_dir, "--prompt", STORY, "--max-new-tokens", "6", "--greedy"]).out
    [(prompt, new, stop)] = calls
    assert prompt == [bpe.bos_id] + bpe.encode(STORY) and stop == bpe.eos_id
    assert out == STORY + bpe.decode(new[:-1] if new[-1] == stop else new) + "\n"
    import shutil
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    (copy / "tokenizer.json").unlink()
    assert _error(capsys, ["--hf", str(copy)]) == (f"error: --hf {copy} has no tokenizer.json, so its text cannot "
                                                   "be encoded: give the checkpoint's tokenizer with --tokenizer SPEC")
    assert _run(capsys, ["--hf", str(copy), "--tokenizer", os.path.join(hf_dir, "tokenizer.json"), "--prompt", STORY,
                         "--max-new-tokens", "6", "--greedy"]).out == out
    line = _error(capsys, ["--hf", hf_dir, "--tokenizer", "gpt2", "--prompt", STORY])
    assert line == (f"error: --prompt encodes to id {max(gpt2().encode_ordinary(STORY))}, which the model's 400 ids "
                    "lack: give the model's own tokenizer (--tokenizer SPEC)")


@pytest.mark.parametrize("source", ["run", "hf"])
def test_no_id_the_tokenizer_lacks_is_ever_sampled(capsys, monkeypatch, bpe, bpe_run, hf_dir, source):
    """Nearly uniform sampling (temperature 1000) for 100 tokens: without the mask, ids above the
    tokenizer's 358 (26 of the run's 384, 42 of the checkpoint's 400) would be drawn."""
    calls = _recording(monkeypatch)
    argv = ["--run", bpe_run] if source == "run" else ["--hf", hf_dir]
    _run(capsys, [*argv, "--prompt", STORY, "--max-new-tokens", "100", "--temperature", "1000", "--top-p", "1",
                  "--seed", "0"])
    [(_, new, _)] = calls
    assert len(new) >= 50 and len(set(new)) >= 40 and max(new) < bpe.vocab_size, new


# ----- the model's context ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    config = dataclasses.replace(Gemma3Config.tiny(), max_position_embeddings=12)
    return _write_run(tmp_path_factory.mktemp("short") / "run", config, last=False)


def test_prompt_and_new_tokens_must_fit_the_context(capsys, short_run):
    prompt = " one two three four five"  # 5 GPT-2 tokens
    assert len(gpt2().encode_ordinary(prompt)) == 5
    line = _error(capsys, ["--run", short_run, "--prompt", prompt, "--max-new-tokens", "8", "--greedy"])
    assert line == ("error: --max-new-tokens 8 after the 5-token prompt runs past the model's context of 12 "
                    "positions: use --max-new-tokens <= 7")
    result = _run(capsys, ["--run", short_run, "--prompt", prompt, "--max-new-tokens", "7", "--greedy"])
    assert result.out.startswith(prompt)
    long = " one" * 12
    line = _error(capsys, ["--run", short_run, "--prompt", long, "--max-new-tokens", "1"])
    assert line == ("error: --prompt is 12 tokens, which leaves no room in the model's context of 12 positions: "
                    "shorten it to at most 11 tokens")
    assert _run(capsys, ["--run", short_run, "--prompt", " one" * 11, "--max-new-tokens", "1"]).out


def test_errors_reach_the_shell_as_one_line(run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path)
    _truncate(copy / "best.safetensors")
    env = dict(os.environ, TINYGRAD3_DEVICE="cpu", PYTHONPATH=ROOT)
    for argv in (["--run", str(copy)], ["--run", run_dir, "--temperature", "0"]):
        run = subprocess.run([sys.executable, "generate.py", *argv], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 2 and run.stdout == "" and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr


# ----- models/generation.py --------------------------------------------------------------------
def _sharp_model(seed=0, dtype=np.float64):
    model = Gemma3(Gemma3Config.tiny(vocab_size=64, unpadded_vocab_size=61), seed=seed).to(dtype=dtype)
    rng = np.random.default_rng(seed)
    for p in model.parameters():  # sharper weights so greedy choices are not near-ties
        p.data = (p.data * 20 + (rng.standard_normal(p.shape) * 0.2 if p.ndim == 1 else 0)).astype(dtype)
    return model


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_rows_equal_the_one_prompt_path(use_cache):
    model = _sharp_model()
    window = model.config.sliding_window
    prompts = np.random.default_rng(3).integers(0, 61, size=(4, window + 3)).tolist()
    steps = 2 * window + 1  # the sliding layers' ring buffer wraps
    batched = generate_greedy_batch(model, prompts, steps, use_cache=use_cache)
    assert batched.shape == (4, steps) and batched.dtype == np.int64
    rows = [generate(model, p, steps, greedy=True, use_cache=use_cache) for p in prompts]
    np.testing.assert_array_equal(batched, np.array(rows))
    assert len({tuple(r) for r in rows}) == 4  # the rows differ, so a mixed-up row would show
    np.testing.assert_array_equal(generate_greedy_batch(model, np.array(prompts[:1]), steps), batched[:1])


def test_batched_greedy_refuses_ragged_or_empty_prompts():
    model = _sharp_model()
    for prompts in ([[1, 2], [3]], [[]], []):
        with pytest.raises(ValueError, match="prompts must be one or more non-empty id lists of one length"):
            generate_greedy_batch(model, prompts, 2)


def test_sampling_settings_are_checked_by_the_library():
    check_sampling(1.0, None, None)
    check_sampling(0.5, 1, 1.0)
    for kwargs, message in ((dict(temperature=0.0), "temperature must be > 0"),
                            (dict(temperature=float("nan")), "temperature must be > 0"),
                            (dict(top_k=0), "top_k must be >= 1"),
                            (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                            (dict(top_p=1.5), r"top_p must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            generate(_sharp_model(), [1, 2], 1, **kwargs)
    assert len(generate(_sharp_model(), [1, 2], 2, greedy=True, temperature=0.0, top_k=0)) == 2


# ----- GPU: the fast path against the reference path --------------------------------------------
def _stepped_logits(model, ids, n_prompt, use_cache):
    """The last-position logits of every generation step along the token sequence `ids`."""
    from models import KVCache
    xp = backend.get_array_module(model.parameters()[0].data)
    cache = KVCache(model.config) if use_cache else None
    rows = []
    with no_grad():
        for end in range(n_prompt, len(ids)):
            window = ids[end - 1:end] if use_cache and end > n_prompt else ids[:end]
            logits, _ = model(xp.asarray([window], dtype=xp.int64), cache=cache)
            rows.append(backend.to_numpy(logits.data[0, -1]).astype(np.float64))
    return np.array(rows)


@pytest.mark.gpu
@pytest.mark.parametrize("use_cache", [True, False])
def test_fast_path_generation_matches_the_reference_path(gpu_xp, monkeypatch, use_cache):
    """Greedy float16 generation, 20 tokens of a random tiny model: the fast path's logits along
    the reference path's tokens agree within float16 rounding (2% of the logits' range), and
    its tokens equal the reference's wherever the reference's top two are further apart than
    the measured difference (a near tie may legitimately go the other way)."""
    config = Gemma3Config.tiny()
    model = Gemma3(config, seed=0).to(device="cuda", dtype=np.float16).eval()
    prompt = [464, 1110, 373, 257, 1310, 3290, 13, 1881, 1110, 11, 339, 3114]  # longer than the window
    steps = 20
    from tinygrad3.kernels import gemm
    calls = []
    real_mm = gemm.mm  # the fast path's linears (gemm.GemmLinear) multiply with it
    monkeypatch.setattr(gemm.GemmLinear, "mm", staticmethod(lambda *a, **k: calls.append(1) or real_mm(*a, **k)))
    with kernels.fast(False):
        ref_new = generate(model, prompt, steps, greedy=True, use_cache=use_cache)
        ref_logits = _stepped_logits(model, prompt + ref_new, len(prompt), use_cache)
    assert not calls
    with kernels.fast(True):
        fast_new = generate(model, prompt, steps, greedy=True, use_cache=use_cache)
        fast_logits = _stepped_logits(model, prompt + ref_new, len(prompt), use_cache)
        batched = generate_greedy_batch(model, [prompt, prompt], steps, use_cache=use_cache)
    assert calls  # the fused kernels did run
    assert ref_logits.shape == (steps, config.vocab_size)
    np.testing.assert_array_equal(np.argmax(ref_logits, axis=1), ref_new)
    diff = np.abs(fast_logits - ref_logits).max()
    scale = ref_logits[:, :config.unpadded_vocab_size].max() - ref_logits[:, :config.unpadded_vocab_size].min()
    assert diff <= 0.02 * scale, (diff, scale)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * diff
    np.testing.assert_array_equal(batched[0], batched[1])
    for tokens in (fast_new, batched[0]):  # equal up to the first near tie, where they may part
        parted = [t for t in range(steps) if tokens[t] != ref_new[t]]
        assert not parted or not clear[parted[0]], (parted, tokens, ref_new, diff)


@pytest.mark.gpu
def test_generate_cli_takes_the_fast_path_on_cuda(gpu_xp, capsys, run_dir):
    argv = ["--run", run_dir, "--device", "cuda", "--greedy", "--max-new-tokens", "8"]
    with kernels.fast(False):  # main turns the fast path on; the previous setting comes back after
        fast = _run(capsys, argv)
        reference = _run(capsys, argv + ["--reference"])
    assert fast.err == "fast path\n" and reference.err == "reference path (--reference)\n"
    assert fast.out.startswith("Once upon a time") and reference.out.startswith("Once upon a time")


# ----- bench/generate_bench.py -----------------------------------------------------------------
def test_generate_bench_smoke_matches_hugging_face_and_reports_a_failed_variant(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import generate_bench
    real = generate_bench.HF.generate

    def static_fails(self, variant, ids, new_tokens):
        if variant == "hf-static":
            raise RuntimeError("no static cache here\nsecond line")
        return real(self, variant, ids, new_tokens)

    monkeypatch.setattr(generate_bench.HF, "generate", static_fails)
    out = tmp_path / "bench.json"
    assert generate_bench.main(["--smoke", "--variants", "ours,hf-dynamic,hf-static", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["logits_rel_diff"] < 1e-5  # the same weights on both sides, float32
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert sorted(rows) == [(v, b) for v in ("hf-dynamic", "hf-static", "ours") for b in (1, 2)]
    for batch in (1, 2):
        assert rows["hf-static", batch]["error"] == "RuntimeError: no static cache here"
        for variant in ("ours", "hf-dynamic"):
            row = rows[variant, batch]
            assert row["same_tokens_as_ours"] == 1.0  # float32: the very same greedy tokens
            assert row["tokens_per_s"] == pytest.approx(batch * 8 / row["seconds"])
    table = capsys.readouterr().out
    assert "| hf-static | 2 | failed: RuntimeError: no static cache here |" in table
    assert "| ours | 1 |" in table and "reference path (cpu)" in table
