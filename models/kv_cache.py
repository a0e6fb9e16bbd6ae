"""Key/value cache for generation: each new token costs one position, not the whole sequence.

Full-attention layers keep every past key and value. Sliding-window layers keep only the
last `sliding_window` of them in a ring buffer (position p lives in slot p % W), since no
later query can see anything older. Keys are stored after RoPE, so a cached key never
needs to know where it sits in the buffer: attention scores depend only on the rotated
vectors, and a query at position i may see exactly the keys the window rule allows.
"""
import tinygrad3.functional as F
from tinygrad3 import Tensor, backend


class KVCache:
    """Cache for one batch of sequences; pass it to `model(idx, cache=cache)` for every chunk."""

    def __init__(self, config):
        self.config = config
        self.position = 0  # tokens already processed
        self.layers = [LayerCache(self, config.sliding_window if config.is_sliding(i) else None)
                       for i in range(config.num_hidden_layers)]

    def layer(self, i):
        return self.layers[i]

    def advance(self, n):
        self.position += n


class LayerCache:
    def __init__(self, parent, window):
        self.parent, self.window = parent, window
        self.keys = self.values = None  # raw arrays (B, Hkv, L, D); L <= window for sliding layers

    @property
    def position(self):
        return self.parent.position

    def _past(self):
        """Past keys/values in position order (for a ring buffer: unrolled from slot pos % W)."""
        if self.keys is None:
            return None, None
        if self.window is None or self.position <= self.window:
            return self.keys, self.values
        start = self.position % self.window
        xp = backend.get_array_module(self.keys)
        order = xp.concatenate([xp.arange(start, self.window), xp.arange(0, start)])
        return self.keys[:, :, order], self.values[:, :, order]

    def attend(self, module, q, k, v):
        """Attention of the new queries over past and new keys; then remember the new keys."""
        past_k, past_v = self._past()
        xp = backend.get_array_module(k.data)
        keys = k.data if past_k is None else xp.concatenate([past_k, k.data], axis=2)
        values = v.data if past_v is None else xp.concatenate([past_v, v.data], axis=2)
        q_offset = keys.shape[2] - q.shape[2]
        y = F.attention(q, Tensor(keys), Tensor(values), module.scale, window=self.window, q_offset=q_offset)
        end = self.position + q.shape[2]
        if self.window is None or end <= self.window:
            self.keys, self.values = keys, values  # in position order; nothing to drop yet
        else:  # keep the last W positions, position p in slot p % W
            if self.keys is None or self.keys.shape[2] < self.window:
                self.keys = xp.empty(keys.shape[:2] + (self.window,) + keys.shape[3:], keys.dtype)
                self.values = xp.empty_like(self.keys)
            slots = xp.arange(end - self.window, end) % self.window
            self.keys[:, :, slots] = keys[:, :, -self.window:]
            self.values[:, :, slots] = values[:, :, -self.window:]
        return y
