"""Gemma 3 (text), built only from tinygrad3: the architecture of Hugging Face's Gemma3ForCausalLM.

    h = embed(idx) * sqrt(hidden)
    per layer:  h = h + post_attn_norm(attention(input_norm(h)))
                h = h + post_ffw_norm(mlp(pre_ffw_norm(h)))
    logits = lm_head(norm(h))

Attention: q/k/v projections; RMSNorm over head_dim on q and k, then RoPE with the layer's base
(both in F.qk_norm_rope); scores scaled by query_pre_attn_scalar**-0.5; causal, or sliding-window
causal on "sliding_attention" layers; multi-query when there is one KV head.
MLP (GeGLU): down(gelu_tanh(gate(x)) * up(x)), gate and up as one GEMM, through F.geglu.
With `recompute=True` each decoder layer runs under tinygrad3.recompute: its activations are
not kept between forward and backward but recomputed, layer by layer, during backward.
Parameter names are Hugging Face's, so their checkpoints load with load_state_dict.
"""
import math

import numpy as np

import tinygrad3.functional as F
from tinygrad3 import Tensor, backend, is_grad_enabled
from tinygrad3.recompute import recompute as recomputed
from nn import Embedding, Linear, Module, ModuleList, RMSNorm
from .config import Gemma3Config


def residual_dtype(compute_dtype):
    """float32 for fp16 computation (as autocast keeps it), else the compute dtype itself."""
    return np.dtype(np.float32) if np.dtype(compute_dtype) == np.float16 else np.dtype(compute_dtype)


def cast(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


class Gemma3Attention(Module):
    def __init__(self, config, layer_index, rng):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.query_pre_attn_scalar ** -0.5
        self.rope_base = c.rope_base(layer_index)
        self.window = c.sliding_window if c.is_sliding(layer_index) else None
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, rng=rng)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, rng=rng)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, rng=rng)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, rng=rng)
        self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)

    def heads(self, x, proj, num_heads):
        """(B, T, hidden) -> (B, T, heads, head_dim)."""
        B, T, _ = x.shape
        return proj(x).reshape(B, T, num_heads, self.head_dim)

    def rotated_heads(self, x, proj, num_heads, norm, offset):
        """(B, T, hidden) -> (B, heads, T, head_dim), normalised over head_dim and rotated (q and k)."""
        return F.qk_norm_rope(self.heads(x, proj, num_heads), norm.weight, norm.eps, self.rope_base, offset)

    def forward(self, x, cache=None):
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.position
        q = self.rotated_heads(x, self.q_proj, self.num_heads, self.q_norm, offset)
        k = self.rotated_heads(x, self.k_proj, self.num_kv_heads, self.k_norm, offset)
        # (B, T, Hkv, D) -> (B, Hkv, T, D): a view, and with one kv head still contiguous (no copy).
        v = self.heads(x, self.v_proj, self.num_kv_heads).transpose(0, 2, 1, 3)
        if cache is None:
            # The output straight in (B, T, Hq, D), so the reshape for o_proj is a view: no transpose
            # copy of it forward nor of its gradient backward (the flash kernels write and read it there).
            y = F.attention(q, k, v, self.scale, window=self.window, out_layout="bthd")
        else:
            y = cache.attend(self, q, k, v).transpose(0, 2, 1, 3)
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim))


class Gemma3MLP(Module):
    def __init__(self, config, rng):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, rng=rng)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, rng=rng)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, rng=rng)

    def forward(self, x):
        # gate and up read the same x: one GEMM against their weights stacked by rows makes
        # [gate | up] (a view, no copy, when they lie side by side in the optimizer's buffer;
        # backward then adds the weight gradient straight into both parameters' buffers).
        gate_up = F.linear(x, (self.gate_proj.weight, self.up_proj.weight))
        return self.down_proj(F.geglu(gate_up))


class Gemma3DecoderLayer(Module):
    def __init__(self, config, layer_index, rng):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Gemma3Attention(config, layer_index, rng)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = Gemma3MLP(config, rng)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, h, cache=None):
        compute = self.mlp.gate_proj.weight.dtype  # the GEMMs' dtype (norm weights may be float32)
        x = self.input_layernorm(h, out_dtype=compute)
        # h + post_norm(branch) as one op (F.rms_norm's residual form: the same values, one kernel).
        h = self.post_attention_layernorm(self.self_attn(x, cache), residual=h)
        x = self.pre_feedforward_layernorm(h, out_dtype=compute)
        return self.post_feedforward_layernorm(self.mlp(x), residual=h)


class Gemma3TextModel(Module):
    def __init__(self, config, rng, recompute=False):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rng=rng)
        self.layers = ModuleList(Gemma3DecoderLayer(config, i, rng) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = math.sqrt(config.hidden_size)
        self.recompute = bool(recompute)

    def compute_dtype(self):
        """The dtype the GEMMs run in: that of the linear weights (float16 in mixed precision)."""
        return self.layers[0].mlp.gate_proj.weight.dtype

    def forward(self, idx, cache=None):
        compute = self.compute_dtype()
        # The residual stream is float32 when the GEMMs are fp16: that is how the reference runs
        # under autocast (fp32 weights, so the embedding, the sums h + branch and their gradients are
        # fp32; only the GEMMs see fp16). An fp16 stream rounds each of the 2 x layers additions and
        # their gradients to 11 bits, enough to make training measurably worse (bench/RESULTS.md).
        # In mixed precision the table itself is float32 (keep_float32), so this cast is a no-op.
        h = cast(F.embedding(idx, self.embed_tokens.weight), residual_dtype(compute))
        # The scale is rounded to the stream's dtype before multiplying, as the reference does.
        h = h * self.embed_scale
        # Recompute: each layer keeps only its input h until backward, which re-runs the layer.
        # Not with a KV cache (the layer would append to it twice) nor without a graph (nothing to save).
        rerun = self.recompute and cache is None and is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if rerun:
                h = recomputed(layer, h, params=layer.parameters())
            else:
                h = layer(h, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.norm(h, out_dtype=compute)


class Gemma3(Module):
    """Gemma 3 causal language model: `logits, loss = model(idx, targets)`.

    recompute=True (or setting `model.recompute` later) runs every decoder layer under
    tinygrad3.recompute when a graph is recorded: about one more forward of the layers per
    backward, for not keeping each layer's activations. The gradients are the same. It is a
    setting of this model object, not of the config (which checkpoints save and compare).
    """

    def __init__(self, config=None, seed=0, recompute=False):
        super().__init__()
        self.config = config = config or Gemma3Config.gemma3_270m()
        rng = np.random.default_rng(seed)
        self.model = Gemma3TextModel(config, rng, recompute)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, rng=rng)
        self._vocab_masks = {}

    @property
    def recompute(self):
        return self.model.recompute

    @recompute.setter
    def recompute(self, value):
        self.model.recompute = bool(value)

    def vocab_mask(self, like):
        """0 for real ids, the most negative finite value of the logits' dtype for padding ids
        (None without padding): after the softmax padding ids have probability 0, so the loss
        and every gradient equal those of the unpadded vocabulary."""
        real, size = self.config.unpadded_vocab_size, self.config.vocab_size
        if real is None or real == size:
            return None
        key = (like.dtype, like.device)
        if key not in self._vocab_masks:
            mask = np.zeros(size, like.dtype)
            mask[real:] = np.finfo(like.dtype).min
            self._vocab_masks[key] = backend.to_device(mask, like.device)
        return self._vocab_masks[key]


    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, idx, targets=None, ignore_index=-1, cache=None, return_logits=True, loss_grad=None):
        """idx: (B, T) integer ids. Returns (logits (B, T, vocab), mean cross-entropy or None).

        With targets and return_logits=False the head and the loss run as one op that never
        holds all the logits (F.linear_cross_entropy: the same loss and gradients, the head's
        memory cut from two (B, T, vocab) arrays to one block); logits is then None. Training
        uses that, and passes loss_grad, the gradient the loss will get in backward (what it
        multiplies the loss by), so that the head's gradients are made in the forward.
        """
        idx = idx.data if isinstance(idx, Tensor) else idx
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (batch, time), got {idx.shape}")
        h = self.model(idx, cache)
        # A tied head reuses the (float32) embedding table: cast it to the GEMM's dtype, as autocast
        # would; the cast's backward hands the gradient back to the table in float32.
        weight = cast(self.output_weight(), h.dtype)
        if targets is not None and not return_logits:
            return None, F.linear_cross_entropy(h, weight, targets, ignore_index, expected_grad=loss_grad,
                                                valid_vocab=self.config.unpadded_vocab_size)
        logits = F.linear(h, weight)
        mask = self.vocab_mask(logits)
        if mask is not None:
            logits = logits + mask
        loss = None if targets is None else F.cross_entropy(logits, targets, ignore_index=ignore_index)
        return logits, loss
