"""Data for tinygrad3: the offline GPT-2 tokenizer, TinyStories preparation into uint16
memmaps, a synthetic story generator, a batch loader, and `data.resolve` (train.py's --data
as a prepared directory, and the identity of a prepared dataset).

Submodules import lazily what they need: `datasets` only inside `data.prepare`, CuPy only
when a loader runs on 'cuda'.
"""
from .errors import DataError

__all__ = ["DataError"]
