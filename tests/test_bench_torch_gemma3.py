"""bench/torch_gemma3.py, the plain PyTorch Gemma 3 of the benchmarks, against Hugging Face's
Gemma3ForCausalLM (logits, gradients) and our model (loss); and bench/throughput.py on the CPU."""
import json
import pathlib
import sys
import warnings

import numpy as np
import pytest

from models import Gemma3, Gemma3Config

pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[test]'")
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from torch_gemma3 import Gemma3Torch, load_state_dict  # noqa: E402

T = 20  # longer than the window


def tiny(tie):
    """Two sliding layers (window 8) and a full one, multi-query, a padded vocabulary; bases apart."""
    config = Gemma3Config.tiny(vocab_size=384, unpadded_vocab_size=357)
    config.tie_word_embeddings, config.rope_theta, config.rope_local_base_freq = tie, 10_000.0, 500.0
    return config


def random_state(config, seed=0):
    """Our model's state, every array perturbed (norm weights start at zero) so each one matters."""
    rng = np.random.default_rng(seed)
    return {name: (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
            for name, a in Gemma3(config, seed=seed).state_dict().items()}


def hf_model(config, state):
    hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **config.to_hf(), pad_token_id=None, attn_implementation="eager")).float().eval()
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return hf


def ids(config, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.unpadded_vocab_size, size=(2, T + 1))


def max_rel(a, b):
    """The largest error over the largest value: a single wrong position shows, unlike a norm."""
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("sliding", ["sdpa", "flex"])
def test_logits_match_hugging_face(tie, sliding):
    config = tiny(tie)
    state = random_state(config)
    x = torch.from_numpy(ids(config)[:, :-1])
    plain = load_state_dict(Gemma3Torch(config, sliding=sliding), state).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it is unfused when not compiled
        ref = hf_model(config, state)(x).logits.numpy()
        got = plain(x).numpy()
    assert got.shape == ref.shape == (2, T, config.vocab_size)
    assert max_rel(got, ref) < 1e-5


def test_sliding_window_is_applied():
    """A window wider than the sequence changes the logits: the comparison above sees the window."""
    config = tiny(False)
    state = random_state(config)
    x = torch.from_numpy(ids(config)[:, :-1])
    wide = tiny(False)
    wide.sliding_window = T
    with torch.no_grad():
        narrow = load_state_dict(Gemma3Torch(config, sliding="sdpa"), state)(x).numpy()
        full = load_state_dict(Gemma3Torch(wide, sliding="sdpa"), state)(x).numpy()
    assert np.abs(narrow[:, :8] - full[:, :8]).max() < 1e-5  # the first 8 positions see all keys either way
    assert max_rel(narrow, full) > 1e-2


def test_gradients_match_hugging_face():
    config = tiny(False)
    state = random_state(config)
    sample = ids(config)
    hf = hf_model(config, state)
    plain = load_state_dict(Gemma3Torch(config, sliding="sdpa"), state)
    x, y = torch.from_numpy(sample[:, :-1]), torch.from_numpy(sample[:, 1:])
    logits = hf(x).logits
    torch.nn.functional.cross_entropy(logits[..., :357].reshape(-1, 357), y.reshape(-1)).backward()
    plain.loss(x, y).backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in plain.named_parameters():
        ref = hf_grads[name].grad.numpy()
        assert np.linalg.norm(p.grad.numpy() - ref) / np.linalg.norm(ref) < 1e-5, name


@pytest.mark.parametrize("tie", [False, True])
def test_loss_matches_ours(tie):
    config = tiny(tie)
    state = random_state(config)
    sample = ids(config)
    ours = Gemma3(config)
    ours.load_state_dict(state)
    _, ours_loss = ours(sample[:, :-1], sample[:, 1:])
    plain = load_state_dict(Gemma3Torch(config, sliding="sdpa"), state)
    with torch.no_grad():
        loss = plain.loss(torch.from_numpy(sample[:, :-1]), torch.from_numpy(sample[:, 1:])).item()
        # The padding ids' logits are large: counted, they would change the loss.
        unmasked = torch.nn.functional.cross_entropy(
            plain(torch.from_numpy(sample[:, :-1])).reshape(-1, config.vocab_size),
            torch.from_numpy(sample[:, 1:]).reshape(-1)).item()
    assert abs(loss - ours_loss.item()) < 1e-5 * abs(loss)
    assert abs(unmasked - loss) > 1e-3


def test_compiles_as_one_graph_reading_the_cached_mask():
    """No graph break (CUDA graphs would be split) and no block mask built inside the compiled code."""
    config = tiny(False)
    plain = load_state_dict(Gemma3Torch(config, sliding="flex"), random_state(config)).eval()
    sample = torch.from_numpy(ids(config))
    x, y = sample[:, :-1], sample[:, 1:]
    plain.block_mask(T, x.device)
    compiled = torch.compile(plain.loss, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert compiled(x, y).item() == pytest.approx(plain.loss(x, y).item(), rel=1e-6)
    assert len(plain.sliding.masks) == 1


def test_throughput_runs_on_the_cpu(tmp_path, capsys):
    import throughput
    out = tmp_path / "run.json"
    sides = "ours-ref,torch-eager,torch-plain,torch-plain-reduce-overhead"
    code = throughput.main(["--preset", "tiny", "--device", "cpu", "--rows", "2x32x2", "--sides", sides,
                            "--steps", "1", "--warmup", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["date"] and env["commit"] and "--rows 2x32x2" in env["command"] and env["gpu"] is None
    assert env["gemm_tflops"] is None  # measured on a GPU only
    by_side = {r["side"]: r for r in report["results"]}
    assert list(by_side) == sides.split(",")
    for side in ("ours-ref", "torch-eager", "torch-plain"):
        assert by_side[side]["tok_s"] > 0 and by_side[side]["tokens_per_update"] == 128, side
    assert "CUDA" in by_side["torch-plain-reduce-overhead"]["skipped"]
    best = max(by_side["torch-eager"]["tok_s"], by_side["torch-plain"]["tok_s"])
    assert by_side["ours-ref"]["vs_best_torch"] == pytest.approx(by_side["ours-ref"]["tok_s"] / best)
    assert "| / best torch |" in printed and "skipped: CUDA graphs" in printed and "| ours / best torch |" in printed
