"""Weight initialisation.

We use what the reference implementation (Hugging Face Gemma 3) uses: every projection and
the embedding drawn from N(0, 0.02^2), norm weights zero (their scale is 1 + weight, so zero
is the identity). Why this trains well here: Gemma normalises every residual branch
*after* the branch (post-attention and post-feed-forward RMSNorm), so a branch adds a
unit-RMS update whatever its weights' scale, and the depth-dependent shrinking that
GPT-2-style pre-norm models need for their output projections would be undone by that norm.
0.02 keeps initial logits small (RMS about 0.02 * sqrt(hidden)), so the first loss is near
ln(vocab) and the first updates are well-behaved; matching the reference also means a
PyTorch run started from our weights behaves like one started from its own.
"""
import numpy as np

INIT_STD = 0.02


def normal(shape, rng, std=INIT_STD, dtype=np.float32):
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
