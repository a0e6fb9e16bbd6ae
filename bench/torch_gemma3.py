"""A plain PyTorch Gemma 3 text model: Hugging Face Gemma3ForCausalLM's shapes and parameter names,
built from models.Gemma3Config, written for speed under torch.compile (the benchmarks' PyTorch side).

    h = embed(idx) * sqrt(hidden)
    per layer:  h = h + post_attention_layernorm(attention(input_layernorm(h)))
                h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    logits = lm_head(norm(h))        (the embedding table when tie_word_embeddings)

RMSNorm scales by (1 + weight) in float32; q and k are normalised over head_dim, then rotated (RoPE
with the layer's base); scores are scaled by query_pre_attn_scalar**-0.5; the MLP is
down(gelu_tanh(gate(x)) * up(x)). Attention: full layers, and sliding layers whose window covers the
sequence, through F.scaled_dot_product_attention(is_causal=True) (the flash backend on CUDA); sliding
layers with a shorter window through flex_attention with a sliding-window causal block mask (cached
per length), or with sliding="sdpa" through SDPA with a boolean mask (for the CPU, where
flex_attention has no backward). Multi-query K/V go to both without copies (enable_gqa).

    model = Gemma3Torch(config).to(device)
    load_state_dict(model, ours.state_dict())     # our model's arrays, same names
    loss = model.loss(idx, targets)               # over the real (unpadded) vocabulary
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

SLIDING = ("flex", "sdpa")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_tables(seq_len, head_dim, base, device):
    """cos, sin (seq_len, head_dim) in float32, the two halves of each row repeated."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def sliding_window_mask_mod(window):
    """flex_attention's mask_mod: causal, and key kv within `window` positions of query q."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


class SlidingMasks:
    """flex_attention BlockMasks of the sliding-window causal pattern, one per (length, device)."""

    def __init__(self, window, kind):
        self.window, self.kind, self.masks = window, kind, {}

    def get(self, seq_len, device):
        device = device if isinstance(device, torch.device) else torch.device(device)
        key = (int(seq_len), device.type, device.index)
        if key not in self.masks:
            self.masks[key] = create_block_mask(sliding_window_mask_mod(self.window), None, None, seq_len, seq_len,
                                                device=device)
        return self.masks[key]


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled on its own, for eager callers on CUDA (uncompiled it is a slow reference)."""
    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    def __init__(self, config, layer_index, sliding):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.query_pre_attn_scalar ** -0.5
        self.rope_base = c.rope_base(layer_index)
        self.window = c.sliding_window if c.is_sliding(layer_index) else None
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.sliding = sliding

    def heads(self, x, proj):
        """(B, T, hidden) -> (B, heads, T, head_dim)."""
        B, T, _ = x.shape
        return proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)

    def forward(self, x):
        B, T, _ = x.shape
        v = self.heads(x, self.v_proj)
        cos, sin = rope_tables(T, self.head_dim, self.rope_base, x.device)
        # The rotation in float32 (as the reference under autocast), the attention in v's dtype.
        q = rotate(self.q_norm(self.heads(x, self.q_proj)), cos, sin).to(v.dtype)
        k = rotate(self.k_norm(self.heads(x, self.k_proj)), cos, sin).to(v.dtype)
        y = self.attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def attend(self, q, k, v):
        T = q.shape[2]
        gqa = self.num_heads != self.num_kv_heads
        if self.window is None or self.window >= T:
            if q.is_cuda:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        if self.sliding.kind == "sdpa":
            i = torch.arange(T, device=q.device)
            allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < self.window)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=gqa)
        flex = compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return flex(q, k, v, block_mask=self.sliding.get(T, q.device), scale=self.scale, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_index, sliding):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, layer_index, sliding)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, h):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h)))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TextModel(nn.Module):
    def __init__(self, config, sliding):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, sliding) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = math.sqrt(config.hidden_size)

    def forward(self, idx):
        h = self.embed_tokens(idx) * self.embed_scale
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class Gemma3Torch(nn.Module):
    """Gemma 3 causal LM: `model(idx)` gives logits (B, T, vocab_size); `model.loss(idx, targets)`."""

    def __init__(self, config, sliding="flex"):
        super().__init__()
        if sliding not in SLIDING:
            raise ValueError(f"sliding must be one of {SLIDING}, got {sliding!r}")
        self.config = config
        self.sliding = SlidingMasks(config.sliding_window, sliding)
        self.model = TextModel(config, self.sliding)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def block_mask(self, seq_len, device):
        """The sliding layers' BlockMask for sequences of seq_len on `device` (a tensor's device, with its
        index: cuda:0). Made once: call it before torch.compile traces the model, so the compiled code
        reads the cached mask instead of building one."""
        return self.sliding.get(seq_len, device)

    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, idx):
        return F.linear(self.model(idx), self.output_weight())

    def loss(self, idx, targets, ignore_index=-1):
        return real_vocab_cross_entropy(self(idx), targets, self.config, ignore_index)


def real_vocab_cross_entropy(logits, targets, config, ignore_index=-1):
    """Mean cross-entropy in float32 over the real vocabulary: the logits of padding ids
    (>= config.unpadded_vocab_size) take no part, as in models.Gemma3."""
    real = config.unpadded_vocab_size or config.vocab_size
    logits = logits[..., :real].float()
    return F.cross_entropy(logits.reshape(-1, real), targets.reshape(-1), ignore_index=ignore_index)


def load_state_dict(model, state):
    """Copy arrays (name -> NumPy array or tensor, Hugging Face names: our models.Gemma3.state_dict())
    into a torch model's parameters; every name must match. Returns the model."""
    tensors = {name: torch.as_tensor(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
               for name, a in state.items()}
    model.load_state_dict(tensors, strict=True)
    return model
