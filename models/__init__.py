"""Models built on tinygrad3 and nn: Gemma 3."""
from .config import ConfigError, Gemma3Config, padded_vocab
from .gemma3 import Gemma3
from .generation import filter_probabilities, generate, generate_greedy_batch
from .hf_load import CheckpointError, load_hf_checkpoint
from .kv_cache import KVCache

__all__ = ["Gemma3", "Gemma3Config", "ConfigError", "padded_vocab", "CheckpointError", "load_hf_checkpoint",
           "generate", "generate_greedy_batch", "filter_probabilities", "KVCache"]
