"""Layers with parameters: Linear, Embedding, RMSNorm (the Gemma form)."""
import numpy as np

import tinygrad3.functional as F
from .init import normal
from .module import Module, Parameter


def _rng(rng):
    return rng if rng is not None else np.random.default_rng()


class Linear(Module):
    """y = x W^T with W of shape (out_features, in_features), as PyTorch; no bias (Gemma has none)."""

    def __init__(self, in_features, out_features, bias=False, rng=None):
        super().__init__()
        if bias:
            raise NotImplementedError("Linear has no bias: no layer of Gemma 3 uses one")
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(normal((out_features, in_features), _rng(rng)))

    def forward(self, x):
        return F.linear(x, self.weight)


class Embedding(Module):
    """A lookup table of num_embeddings rows of size embedding_dim."""

    def __init__(self, num_embeddings, embedding_dim, rng=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(normal((num_embeddings, embedding_dim), _rng(rng)), keep_float32=True)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class RMSNorm(Module):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + weight); weight starts at zero."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(np.zeros(dim, dtype=np.float32), keep_float32=True)

    def forward(self, x, out_dtype=None, residual=None):
        """The normalised x in x's dtype, or in out_dtype (one rounding, see F.rms_norm); with
        `residual`, residual + that, as one op."""
        return F.rms_norm(x, self.weight, self.eps, out_dtype, residual)
