"""Gemma3Config: Hugging Face's Gemma3TextConfig field names, our presets, and reading config.json."""
import dataclasses
import json
import math
import os

LAYER_TYPES = ("sliding_attention", "full_attention")
GPT2_VOCAB = 50257


def padded_vocab(n, multiple=128):
    """Round a vocabulary up to a multiple of 128: the output GEMM runs much faster on such sizes."""
    return int(math.ceil(n / multiple) * multiple)


def gemma_layer_types(num_layers, pattern=6):
    """Hugging Face's default: every `pattern`-th layer (5, 11, 17, ...) has full attention."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


class ConfigError(ValueError):
    """A config that cannot describe a model we build."""


def _checked_value(name, value, kind, source):
    """`value` for field `name` of annotated type `kind` (int, float, bool, str, list), or ConfigError."""
    if name == "unpadded_vocab_size" and value is None:
        return None
    wanted = {int: (int,), float: (int, float), bool: (bool,), str: (str,), list: (list,)}[kind]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, wanted):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    if kind is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {name} must be a list of layer types, got {value!r}")
    return float(value) if kind is float else value


@dataclasses.dataclass
class Gemma3Config:
    vocab_size: int = padded_vocab(GPT2_VOCAB)
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    sliding_window: int = 512
    layer_types: list = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    query_pre_attn_scalar: float = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32_768
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    # Not a Hugging Face field: when the vocabulary is padded (50257 -> 50304), the logits of
    # ids >= unpadded_vocab_size are masked out, so padding never changes the loss.
    unpadded_vocab_size: int = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = gemma_layer_types(self.num_hidden_layers)
        self.layer_types = list(self.layer_types)
        self.validate()

    POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings", "rope_theta",
                "rope_local_base_freq", "query_pre_attn_scalar", "rms_norm_eps")

    def validate(self):
        for name in self.POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"unknown layer types {bad}: use {LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.unpadded_vocab_size is not None and not 0 < self.unpadded_vocab_size <= self.vocab_size:
            raise ConfigError(f"unpadded_vocab_size ({self.unpadded_vocab_size}) must lie in "
                              f"(0, vocab_size={self.vocab_size}]")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # ----- presets -------------------------------------------------------------------------------
    @classmethod
    def gemma3_270m(cls):
        """The seed's model: 18 layers, hidden 640, 4 heads of 256, one KV head; about 164.7M parameters."""
        return cls(unpadded_vocab_size=GPT2_VOCAB)

    @classmethod
    def tiny(cls, vocab_size=padded_vocab(GPT2_VOCAB), unpadded_vocab_size=GPT2_VOCAB):
        """Small enough to train on a CPU in minutes, yet with both layer types, a sliding window
        shorter than typical test sequences, and multi-query attention (4 query heads, 1 KV head)."""
        return cls(vocab_size=vocab_size, unpadded_vocab_size=unpadded_vocab_size, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=16, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   query_pre_attn_scalar=16, max_position_embeddings=2048)

    @classmethod
    def small(cls):
        """About 33M parameters (tied embeddings): learns TinyStories in minutes on one GPU. Six layers of
        hidden 384, three query heads of 128 over one KV head, window 256, the sixth layer global."""
        return cls(unpadded_vocab_size=GPT2_VOCAB, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                   num_attention_heads=3, num_key_value_heads=1, head_dim=128, sliding_window=256,
                   query_pre_attn_scalar=128, max_position_embeddings=2048, tie_word_embeddings=True)

    PRESETS = ("gemma3_270m", "small", "tiny")

    @classmethod
    def preset(cls, name):
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name)()

    # ----- overrides ----------------------------------------------------------------------------
    def override(self, fields, source):
        """A copy with `fields` (field name -> value) replaced; ConfigError naming `source` (the flag)
        and the field for an unknown name, a value of the wrong type, or a config that cannot be built.

        Changing num_hidden_layers without layer_types gives Hugging Face's default layer pattern.
        """
        types = {f.name: f.type for f in dataclasses.fields(self)}
        values = self.to_dict()
        for name, value in fields.items():
            if name not in types:
                raise ConfigError(f"{source}: unknown model field {name!r}; the fields are {', '.join(types)}")
            values[name] = _checked_value(name, value, types[name], source)
        if "num_hidden_layers" in fields and "layer_types" not in fields:
            values["layer_types"] = gemma_layer_types(values["num_hidden_layers"])
        if "vocab_size" in fields and "unpadded_vocab_size" not in fields:
            values["unpadded_vocab_size"] = None
        try:
            return type(self)(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def with_padded_vocab(self):
        """The same model with vocab_size rounded up to a multiple of 128; the extra ids are masked out."""
        real = self.unpadded_vocab_size or self.vocab_size
        if padded_vocab(real) == self.vocab_size:
            return self
        return dataclasses.replace(self, vocab_size=padded_vocab(real), unpadded_vocab_size=real)

    # ----- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, source):
        """Read a Hugging Face Gemma 3 text config (a dict, a config.json path, or its directory).

        Both styles are understood: transformers 4.x (`rope_theta`, `rope_local_base_freq`) and
        5.x (`rope_parameters` keyed by layer type). A multimodal Gemma3Config's `text_config` is used.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.path.join(source, "config.json") if os.path.isdir(source) else source
            try:
                with open(path) as f:
                    source = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"cannot read a Hugging Face config from {path}: {e}") from None
        hf = dict(source.get("text_config", source))
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and k not in ("dtype",)}
        rope = hf.get("rope_parameters")
        if rope:
            for layer_type, key in (("full_attention", "rope_theta"), ("sliding_attention", "rope_local_base_freq")):
                params = rope.get(layer_type) or {}
                kind = params.get("rope_type", "default")
                if kind != "default":
                    raise ConfigError(f"rope_type {kind!r} for {layer_type} layers is not supported "
                                      "(only 'default' rotary embeddings are implemented)")
                if "rope_theta" in params:
                    values[key] = params["rope_theta"]
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"rope_scaling {scaling} is not supported (only default rotary embeddings)")
        for unsupported in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(unsupported) is not None:
                raise ConfigError(f"{unsupported}={hf[unsupported]} is not supported by this model")
        if hf.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention=True is not supported (causal language model only)")
        if "layer_types" not in hf and "sliding_window_pattern" in hf:
            values["layer_types"] = gemma_layer_types(hf["num_hidden_layers"], hf["sliding_window_pattern"])
        values["dtype"] = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        values.setdefault("tie_word_embeddings", True)  # Hugging Face's default for Gemma 3
        return cls(**values)

    def to_hf(self):
        """A transformers 5.x style Gemma3TextConfig dict (what save_pretrained writes)."""
        d = dataclasses.asdict(self)
        d.pop("rope_theta"), d.pop("rope_local_base_freq"), d.pop("unpadded_vocab_size")
        d["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq}}
        d.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                 hidden_activation="gelu_pytorch_tanh", attention_bias=False, attention_dropout=0.0,
                 attn_logit_softcapping=None)
        return d

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    def rope_base(self, layer_index):
        return self.rope_local_base_freq if self.is_sliding(layer_index) else self.rope_theta

    def is_sliding(self, layer_index):
        return self.layer_types[layer_index] == "sliding_attention"
