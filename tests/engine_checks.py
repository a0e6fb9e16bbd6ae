"""Helpers for the engine tests: inputs on the backend under test and torch comparisons."""
import numpy as np

from tinygrad3 import Tensor, gradcheck
from tinygrad3.backend import to_numpy


def check_grad(xp, fn, arrays, **kwargs):
    """float64 gradcheck of fn on host arrays moved to xp (integer arrays pass through)."""
    assert gradcheck(fn, [xp.asarray(a) for a in arrays], **kwargs)


def compare_with_torch(torch, xp, ours, theirs, arrays, rtol=1e-9, atol=1e-11, seed=0):
    """Assert ours(Tensors) == theirs(torch float64 leaves), forward and every input gradient.

    arrays are host float64 arrays, all differentiated; anything else the op needs
    (ids, targets, axes) is closed over by the two callables. The upstream gradient is a
    fixed random array so that every output element counts.
    """
    tensors = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    leaves = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in arrays]
    out, ref = ours(*tensors), theirs(*leaves)
    assert tuple(out.shape) == tuple(ref.shape), (out.shape, ref.shape)
    np.testing.assert_allclose(to_numpy(out.data), ref.detach().numpy(), rtol=rtol, atol=atol,
                               err_msg="forward differs from torch")
    upstream = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(xp.asarray(upstream))
    ref.backward(torch.tensor(upstream))
    for i, (t, leaf) in enumerate(zip(tensors, leaves)):
        expected = leaf.grad.numpy() if leaf.grad is not None else np.zeros(leaf.shape)
        assert t.grad is not None, f"input {i} received no gradient"
        np.testing.assert_allclose(to_numpy(t.grad), expected, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} differs from torch")
