"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling, with or without a KV cache.

`generate` continues one prompt with any of these; `generate_greedy_batch` continues a batch of
equal-length prompts greedily, the argmax taken where the logits are (the GPU), so no step waits
for the host.
"""
import numpy as np

from tinygrad3 import backend, no_grad
from .kv_cache import KVCache


def check_sampling(temperature, top_k, top_p):
    """ValueError for settings that do not describe a distribution to sample from."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature} (use greedy=True for "
                         "argmax decoding)")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k must be >= 1 (or None: no top-k filter), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None: no top-p filter), got {top_p}")


def filter_probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """Next-token probabilities (float64, NumPy) after temperature, top-k and top-p.

    top-k keeps the k most likely ids; top-p keeps the smallest set of most likely ids whose
    probabilities add up to at least p. The kept probabilities are renormalised.
    """
    check_sampling(temperature, top_k, top_p)
    z = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore"):  # masked padding logits (the dtype's minimum) may become -inf: p = 0
        z = (z - z.max()) / temperature
    p = np.exp(z)
    p /= p.sum()
    if top_k is not None and top_k < p.size:
        threshold = np.partition(p, -top_k)[-top_k]
        p = np.where(p >= threshold, p, 0.0)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cumulative, top_p * cumulative[-1])) + 1]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
    return p / p.sum()


def generate(model, prompt_ids, max_new_tokens, greedy=False, temperature=1.0, top_k=None, top_p=None,
             seed=None, stop_id=None, use_cache=True):
    """Continue one prompt (a list of ids); returns the new ids (stop_id included if reached).

    With use_cache the prompt is processed once and every later step feeds one token;
    without it every step recomputes the whole sequence (the reference the cache must equal).
    """
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if not greedy:
        check_sampling(temperature, top_k, top_p)
    rng = np.random.default_rng(seed)
    xp = backend.get_array_module(model.parameters()[0].data)
    ids = list(int(i) for i in prompt_ids)
    cache = KVCache(model.config) if use_cache else None
    new = []
    with no_grad():
        chunk = ids
        for _ in range(max_new_tokens):
            window = chunk if use_cache else ids
            logits, _ = model(xp.asarray([window], dtype=xp.int64), cache=cache)
            last = backend.to_numpy(logits.data[0, -1]).astype(np.float64)
            if greedy:
                token = int(np.argmax(last))
            else:
                token = int(rng.choice(last.size, p=filter_probabilities(last, temperature, top_k, top_p)))
            new.append(token)
            ids.append(token)
            chunk = [token]
            if stop_id is not None and token == stop_id:
                break
    return new


def generate_greedy_batch(model, prompts, max_new_tokens, use_cache=True):
    """Continue equal-length prompts (a list of id lists, or a (B, T) array) greedily for exactly
    max_new_tokens steps; returns the new ids, a (B, max_new_tokens) int64 NumPy array.

    Row b equals `generate(model, prompts[b], max_new_tokens, greedy=True)` without a stop id.
    """
    lengths = sorted({len(p) for p in prompts})
    if len(lengths) != 1 or lengths[0] == 0:
        raise ValueError(f"prompts must be one or more non-empty id lists of one length, got lengths {lengths}")
    ids = np.asarray(prompts, dtype=np.int64)
    xp = backend.get_array_module(model.parameters()[0].data)
    window = xp.asarray(ids)
    cache = KVCache(model.config) if use_cache else None
    new = xp.empty((ids.shape[0], max_new_tokens), dtype=xp.int64)
    with no_grad():
        for t in range(max_new_tokens):
            logits, _ = model(window, cache=cache)
            new[:, t] = xp.argmax(logits.data[:, -1], axis=-1)
            step = new[:, t:t + 1]
            window = step if use_cache else xp.concatenate([window, step], axis=1)
    return backend.to_numpy(new)
