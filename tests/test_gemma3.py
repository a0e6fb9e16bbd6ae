"""Gemma 3 model on its own: parameter count, padding, gradients, state dicts, modules."""
import dataclasses

import numpy as np
import pytest

import nn
from models import Gemma3, Gemma3Config
from tinygrad3 import Tensor, gradcheck


def _expected_270m_parameters():
    """Counted by hand from the architecture, independently of the model code."""
    vocab, d, ff, layers, heads, kv, hd = 50304, 640, 2048, 18, 4, 1, 256
    attention = d * heads * hd * 2 + d * kv * hd * 2 + 2 * hd   # q, o, k, v, q_norm, k_norm
    mlp = 3 * d * ff
    norms = 4 * d
    return 2 * vocab * d + layers * (attention + mlp + norms) + d


def test_270m_parameter_count():
    config = Gemma3Config.gemma3_270m()
    assert config.layer_types.count("full_attention") == 3
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert config.vocab_size == 50304 and config.vocab_size % 128 == 0
    n = Gemma3(config).num_parameters()
    assert n == _expected_270m_parameters() == 164_715_136


def test_tiny_preset_has_both_layer_types_and_mqa():
    c = Gemma3Config.tiny()
    assert set(c.layer_types) == {"sliding_attention", "full_attention"}
    assert c.num_key_value_heads == 1 < c.num_attention_heads
    assert c.sliding_window < 16


def test_padded_vocabulary_gives_the_unpadded_loss():
    rng = np.random.default_rng(0)
    padded = Gemma3(Gemma3Config.tiny(vocab_size=50304, unpadded_vocab_size=50257), seed=1)
    plain = Gemma3(Gemma3Config.tiny(vocab_size=50257, unpadded_vocab_size=None), seed=2)
    state = padded.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:50257]
    plain.load_state_dict(state)
    ids = rng.integers(0, 50257, size=(2, 12))
    targets = rng.integers(0, 50257, size=(2, 12))
    targets[0, :3] = 50256  # the end-of-text id, the largest real id
    _, loss_padded = padded(ids, targets)
    _, loss_plain = plain(ids, targets)
    assert abs(loss_padded.item() - loss_plain.item()) < 1e-5 * loss_plain.item()
    loss_padded.backward()
    loss_plain.backward()
    head = dict(padded.named_parameters())["lm_head.weight"].grad
    np.testing.assert_allclose(head[:50257], dict(plain.named_parameters())["lm_head.weight"].grad, atol=1e-7)
    assert not head[50257:].any()  # padding rows never receive gradient


def test_loss_gradcheck_on_a_sample_of_parameters():
    """float64 finite differences of the whole model's loss w.r.t. several parameter tensors."""
    config = Gemma3Config.tiny(vocab_size=40, unpadded_vocab_size=37)
    config.hidden_size, config.intermediate_size, config.head_dim, config.query_pre_attn_scalar = 16, 24, 8, 8
    model = Gemma3(config, seed=3).to(dtype=np.float64)
    rng = np.random.default_rng(1)
    for p in model.parameters():  # random norm weights too, so the (1 + w) path is exercised
        p.data = p.data + rng.standard_normal(p.shape) * 0.1
    ids = rng.integers(0, 37, size=(2, 11))  # longer than the window of 8
    targets = rng.integers(0, 37, size=(2, 11))
    targets[1, 4] = -1
    params = dict(model.named_parameters())
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_norm.weight",
             "model.layers.1.mlp.gate_proj.weight", "model.layers.0.post_feedforward_layernorm.weight",
             "model.embed_tokens.weight", "lm_head.weight"]

    def loss_of(*probes):
        originals = [_swap(model, n, t) for n, t in zip(names, probes)]
        try:
            return model(ids, targets)[1]
        finally:
            for n, p in zip(names, originals):
                _swap(model, n, p)

    assert gradcheck(loss_of, [params[n].data.copy() for n in names], eps=1e-6, atol=1e-7, rtol=1e-5)


def _swap(model, dotted, tensor):
    """Put `tensor` where parameter `dotted` was (so the graph runs through it); return the old one."""
    *path, attr = dotted.split(".")
    owner = model
    for part in path:
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    old = getattr(owner, attr)
    setattr(owner, attr, tensor)
    return old


def test_state_dict_errors_are_clear():
    model = Gemma3(Gemma3Config.tiny(vocab_size=128, unpadded_vocab_size=None))
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(nn.StateDictError, match="missing keys: model.norm.weight"):
        model.load_state_dict(missing)
    with pytest.raises(nn.StateDictError, match="unexpected keys: extra.weight"):
        model.load_state_dict(dict(state, **{"extra.weight": np.zeros(3)}))
    wrong = dict(state, **{"model.norm.weight": np.zeros(5, np.float32)})
    with pytest.raises(nn.StateDictError, match=r"model.norm.weight: checkpoint shape \(5,\)"):
        model.load_state_dict(wrong)
    before = model.state_dict()["lm_head.weight"].copy()
    bad = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1, "model.norm.weight": np.zeros(5)})
    with pytest.raises(nn.StateDictError):
        model.load_state_dict(bad)
    np.testing.assert_array_equal(model.state_dict()["lm_head.weight"], before)  # nothing half-loaded
    model.load_state_dict(missing, strict=False)


def test_module_registration_train_eval_and_dtype():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(3, 4, rng=np.random.default_rng(0))
            self.norm = nn.RMSNorm(4)

    m = Pair()
    assert [n for n, _ in m.named_parameters()] == ["first.weight", "norm.weight"]
    assert m.first.weight.shape == (4, 3) and not m.norm.weight.data.any()
    assert m.eval().training is False and m.first.training is False
    assert m.train().first.training is True
    m.to(dtype=np.float16)  # mixed precision: the norm weight (keep_float32) stays float32
    assert m.first.weight.dtype == np.float16 and m.norm.weight.dtype == np.float32
    y = m.norm(m.first(Tensor(np.ones((2, 3), np.float16))))
    assert y.shape == (2, 4) and y.dtype == np.float16
    m.to(dtype=np.float64)
    assert all(p.dtype == np.float64 for p in m.parameters())


def test_bad_token_ids_are_a_clear_error():
    model = Gemma3(Gemma3Config.tiny(vocab_size=128, unpadded_vocab_size=None))
    with pytest.raises(ValueError, match=r"embedding ids must lie in \[0, 128\); found 500"):
        model(np.array([[1, 500]]))
    with pytest.raises(ValueError, match="shape"):
        model(np.array([1, 2]))


def test_fp16_model_keeps_a_float32_residual_stream():
    """fp16 weights compute like autocast: the loss stays close to the float32 model's."""
    config = Gemma3Config.tiny(vocab_size=128, unpadded_vocab_size=None)
    full = Gemma3(config, seed=4)
    half = Gemma3(config, seed=4).to(dtype=np.float16)
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 24))
    hidden = half.model(ids)
    assert hidden.dtype == np.float16  # the output of the final norm, cast for the head's GEMM
    logits, loss16 = half(ids, ids)
    _, loss32 = full(ids, ids)
    assert logits.dtype == np.float16
    assert abs(loss16.item() - loss32.item()) < 2e-3 * loss32.item()
    loss16.backward()
    for name, p in half.named_parameters():  # GEMM weights fp16; norm weights and embedding float32
        assert p.dtype == (np.float32 if "norm" in name or "embed" in name else np.float16), name
        assert p.grad.dtype == p.dtype and np.isfinite(p.grad).all(), name


def test_fp16_tied_head_casts_the_float32_table_and_returns_its_gradient_in_float32():
    config = dataclasses.replace(Gemma3Config.tiny(vocab_size=128, unpadded_vocab_size=None), tie_word_embeddings=True)
    full, half = Gemma3(config, seed=5), Gemma3(config, seed=5).to(dtype=np.float16)
    ids = np.random.default_rng(3).integers(0, 128, size=(2, 16))
    logits, loss16 = half(ids, ids)
    _, loss32 = full(ids, ids)
    assert half.output_weight().dtype == np.float32 and logits.dtype == np.float16
    assert abs(loss16.item() - loss32.item()) < 2e-3 * loss32.item()
    loss16.backward()
    loss32.backward()
    table16, table32 = half.model.embed_tokens.weight.grad, full.model.embed_tokens.weight.grad
    assert table16.dtype == np.float32  # both uses (lookup and head) summed in float32
    np.testing.assert_allclose(table16, table32, rtol=0, atol=2e-2 * np.abs(table32).max())


def test_mlp_gate_and_up_are_one_gemm_on_the_optimizers_buffers(monkeypatch):
    """Under AdamW (fp16 weights, float32 masters) each MLP's gate and up weights lie side by side:
    the stacked weight is a view of the fp16 compute buffer (no copy) and, with grads_in_buffer,
    the one weight GEMM adds its gradient straight into both parameters' float32 slices. The
    gradients equal those of the separate parameters without the optimizer."""
    from tinygrad3 import backend
    from tinygrad3.nn_ops import linear
    config = Gemma3Config.tiny(vocab_size=128, unpadded_vocab_size=None)
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 12))
    plain = Gemma3(config, seed=4).to(dtype=np.float16)
    plain(ids, ids)[1].backward()
    model = Gemma3(config, seed=4).to(dtype=np.float16)
    opt = nn.AdamW(model.named_parameters())
    mlps = [layer.mlp for layer in model.model.layers]
    for mlp in mlps:
        joined = backend.stacked_view([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])
        assert joined is not None and joined.shape == (2 * config.intermediate_size, config.hidden_size)
    targets = []
    product = linear._product
    monkeypatch.setattr(linear, "_product", lambda a, b, t, mm, target, dtype: (
        targets.append(target), product(a, b, t, mm, target, dtype))[1])
    with opt.grads_in_buffer():
        model(ids, ids)[1].backward()
        spans = [backend.stacked_view([m.gate_proj.weight.grad_buffer, m.up_proj.weight.grad_buffer]) for m in mlps]
    assert all(s is not None and any(t is not None and t.base is s.base and t.shape == s.shape and
                                     backend.address(t) == backend.address(s) for t in targets) for s in spans)
    grads = dict(zip(opt._names, np.split(opt.grad_buffer, np.cumsum([p.size for p in opt.params])[:-1])))
    for name, p in plain.named_parameters():
        if "mlp" in name:
            np.testing.assert_allclose(grads[name].reshape(p.shape), p.grad.astype(np.float32), rtol=0,
                                       atol=2e-3 * np.abs(p.grad).max() + 1e-6, err_msg=name)
