"""Models built on tinygrad3 and nn: Gemma 3."""
from .config import ConfigError, Gemma3Config, padded_vocab
from .gemma3 import Gemma3

__all__ = ["Gemma3", "Gemma3Config", "ConfigError", "padded_vocab"]
from .hf_checkpoint import CheckpointError, load_hf_checkpoint

__all__ += ["CheckpointError", "load_hf_checkpoint"]
from .generation import filter_probabilities, generate, generate_greedy_batch
from .kv_cache import KVCache

__all__ += ["generate", "generate_greedy_batch", "filter_probabilities", "KVCache"]
