"""Our Gemma 3 against Hugging Face's Gemma3ForCausalLM: same weights, same logits and gradients."""
import numpy as np
import pytest

from models import Gemma3, Gemma3Config, load_hf_checkpoint
from tinygrad3 import Tensor


def _hf_model(torch, tie, kv_heads=1, seed=0):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[test]'")
    config = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=10_000.0, rope_local_base_freq=500.0, query_pre_attn_scalar=12,
        max_position_embeddings=64, tie_word_embeddings=tie, attn_implementation="eager",
        # No padding row: with pad_token_id set, torch's Embedding zeroes that row's gradient,
        # but in the GPT-2 vocabulary every id is a real token.
        pad_token_id=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():  # norm weights start at zero: randomise everything so each one matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("tie,kv_heads", [(False, 1), (True, 2)])
def test_logits_and_gradients_match_hugging_face(torch, tmp_path, tie, kv_heads):
    hf = _hf_model(torch, tie, kv_heads)
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(str(tmp_path))
    assert ours.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert ours.config.rope_local_base_freq == 500.0 and ours.config.tie_word_embeddings == tie

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, size=(2, 13))  # longer than the window of 5
    with torch.no_grad():
        ref_logits = hf(torch.from_numpy(ids)).logits.numpy()
    logits, _ = ours(ids)
    assert _rel(logits.numpy(), ref_logits) < 1e-5

    # Loss gradient of every parameter: Hugging Face shifts the labels inside; we pass shifted targets.
    hf.zero_grad()
    hf(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss.backward()
    targets = np.concatenate([ids[:, 1:], np.full((2, 1), -1)], axis=1)
    _, loss = ours(ids, targets)
    loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    assert set(ours_grads) == set(hf_grads)
    for name, g in ours_grads.items():
        assert g is not None, name
        assert _rel(g, hf_grads[name]) < 1e-4, name


def test_loaded_state_dict_has_hugging_face_names(torch, tmp_path):
    hf = _hf_model(torch, tie=False)
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(str(tmp_path))
    assert set(ours.state_dict()) == set(hf.state_dict())
    for name, array in hf.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[name], array.numpy())


def test_bf16_checkpoint_is_widened_exactly(torch, tmp_path):
    hf = _hf_model(torch, tie=True).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(str(tmp_path))
    assert ours.config.dtype == "bfloat16"
    ours_state = ours.state_dict()
    assert "lm_head.weight" not in ours_state  # tied: the embedding is the output head
    for name, p in hf.state_dict().items():
        if name != "lm_head.weight":
            np.testing.assert_array_equal(ours_state[name], p.float().numpy())


def test_config_reads_both_transformers_styles():
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                  query_pre_attn_scalar=16, rms_norm_eps=1e-6, max_position_embeddings=256)
    v4 = Gemma3Config.from_hf(dict(common, rope_theta=1e6, rope_local_base_freq=1e4, torch_dtype="bfloat16"))
    v5 = Gemma3Config.from_hf(dict(common, dtype="bfloat16", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    for c in (v4, v5):
        assert (c.rope_theta, c.rope_local_base_freq, c.dtype) == (1e6, 1e4, "bfloat16")
        assert c.layer_types[5] == "full_attention" and c.layer_types[:5] == ["sliding_attention"] * 5
        assert c.tie_word_embeddings is True
    assert Gemma3Config.from_hf(v5.to_hf()) == v5


def test_unsupported_hf_config_is_a_clear_error():
    from models import ConfigError
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4)
    with pytest.raises(ConfigError, match="rope_type"):
        Gemma3Config.from_hf(dict(base, rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0}}))
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        Gemma3Config.from_hf(dict(base, final_logit_softcapping=30.0))


def test_checkpoint_directory_errors(tmp_path):
    from models import CheckpointError
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, '
        '"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 4}')
    with pytest.raises(CheckpointError, match="safetensors"):
        load_hf_checkpoint(str(tmp_path))


def test_model_logits_dtype_follows_parameters():
    model = Gemma3(Gemma3Config.tiny(vocab_size=128, unpadded_vocab_size=None)).to(dtype=np.float16)
    logits, loss = model(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
    assert logits.dtype == np.float16 and loss.dtype == np.float32
    assert np.isfinite(loss.item())
    assert isinstance(logits, Tensor)
