"""KV-cache generation equals recomputation; sampling filters keep the right ids."""
import numpy as np
import pytest

from models import Gemma3, Gemma3Config, KVCache, filter_probabilities, generate
from tinygrad3 import no_grad


def _model(seed=0):
    model = Gemma3(Gemma3Config.tiny(vocab_size=64, unpadded_vocab_size=61), seed=seed).to(dtype=np.float64)
    rng = np.random.default_rng(seed)
    for p in model.parameters():  # sharper weights so greedy choices are not near-ties
        p.data = p.data * 20 + (rng.standard_normal(p.shape) * 0.2 if p.ndim == 1 else 0)
    return model


def test_cached_logits_equal_full_recomputation_past_the_window():
    model = _model()
    window = model.config.sliding_window
    ids = np.random.default_rng(1).integers(0, 61, size=(1, 3 * window + 5))
    with no_grad():
        full, _ = model(ids)
        cache = KVCache(model.config)
        pieces = [ids[:, :5]] + [ids[:, t:t + 1] for t in range(5, 2 * window)]
        pieces.append(ids[:, 2 * window:])  # a multi-token chunk after the ring has wrapped
        stepped = np.concatenate([model(p, cache=cache)[0].data for p in pieces], axis=1)
    assert cache.position == ids.shape[1]
    np.testing.assert_allclose(stepped, full.data, rtol=1e-9, atol=1e-9)


def test_sliding_layers_keep_only_the_window():
    model = _model()
    cache = KVCache(model.config)
    with no_grad():
        model(np.arange(20)[None] % 61, cache=cache)
    for i, layer in enumerate(cache.layers):
        expected = model.config.sliding_window if model.config.is_sliding(i) else 20
        assert layer.keys.shape[2] == expected


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_with_cache_equals_without(greedy):
    model = _model(seed=2)
    prompt = [5, 9, 2, 33]
    kwargs = dict(max_new_tokens=3 * model.config.sliding_window, greedy=greedy, temperature=0.8,
                  top_k=20, top_p=0.95, seed=7)
    cached = generate(model, prompt, use_cache=True, **kwargs)
    plain = generate(model, prompt, use_cache=False, **kwargs)
    assert cached == plain
    assert len(cached) == kwargs["max_new_tokens"]
    assert max(cached) < 61  # padding ids are never produced


def test_generation_stops_at_the_stop_id():
    model = _model(seed=3)
    first = generate(model, [1, 2, 3], max_new_tokens=1, greedy=True)[0]
    out = generate(model, [1, 2, 3], max_new_tokens=10, greedy=True, stop_id=first)
    assert out == [first]


def test_filter_probabilities():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    np.testing.assert_allclose(filter_probabilities(logits), [0.5, 0.2, 0.15, 0.1, 0.05])
    np.testing.assert_allclose(filter_probabilities(logits, top_k=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    np.testing.assert_allclose(filter_probabilities(logits, top_p=0.8), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    sharp = filter_probabilities(logits, temperature=0.5)
    squared = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2  # temperature 1/2 squares the probabilities
    np.testing.assert_allclose(sharp, squared / squared.sum())
    with pytest.raises(ValueError, match="temperature"):
        filter_probabilities(logits, temperature=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(_model(), [], max_new_tokens=2)
