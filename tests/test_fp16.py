"""float16 inputs: results within float16 tolerances of a float64 reference, no inf/NaN for
extreme logits, gradients in the inputs' dtypes, and loss scaling that survives the cast."""
import numpy as np
import pytest

import nn
import tinygrad3.functional as F
from tinygrad3 import Tensor
from tinygrad3.backend import to_numpy
from tinygrad3.nn_ops.rmsnorm import RMSNorm

TOL = 2e-3  # about two float16 ulps of relative error, measured against the largest value


def assert_close16(actual, expected, tol=TOL, what=""):
    actual = to_numpy(actual).astype(np.float64)
    assert np.isfinite(actual).all(), f"{what}: inf/NaN"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=what)


def compare_fp16(torch, xp, ours, theirs, arrays, rng, out_dtype=np.float16):
    """ours on float16 Tensors vs theirs on the same values in float64 (torch autograd)."""
    arrays = [a.astype(np.float16) for a in arrays]
    tensors = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    leaves = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in arrays]
    out, ref = ours(*tensors), theirs(*leaves)
    assert out.dtype == out_dtype
    assert_close16(out.data, ref.detach().numpy(), what="forward")
    upstream = rng.standard_normal(out.shape).astype(out_dtype)
    out.backward(xp.asarray(upstream))
    ref.backward(torch.tensor(upstream.astype(np.float64)))
    for i, (t, leaf) in enumerate(zip(tensors, leaves)):
        assert t.grad.dtype == np.float16
        assert_close16(t.grad, leaf.grad.numpy(), what=f"gradient {i}")


def test_rms_norm_fp16(xp, torch, rng):
    x, w = 3 * rng.standard_normal((4, 64)), 0.2 * rng.standard_normal(64)
    theirs = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)  # noqa: E731
    compare_fp16(torch, xp, F.rms_norm, theirs, [x, w], rng)


@pytest.mark.parametrize("w_dtype", [np.float32, np.float16])
def test_rms_norm_float32_in_fp16_out(xp, torch, rng, w_dtype):
    """The model's input norms: a float32 residual stream normalised straight to float16."""
    x, w = (3 * rng.standard_normal((4, 64))).astype(np.float32), (0.2 * rng.standard_normal(64)).astype(w_dtype)
    xt, wt = Tensor(xp.asarray(x), requires_grad=True), Tensor(xp.asarray(w), requires_grad=True)
    leaves = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, w)]
    out = F.rms_norm(xt, wt, out_dtype=np.float16)
    ref = leaves[0] * torch.rsqrt(leaves[0].pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + leaves[1])
    assert out.dtype == np.float16
    assert_close16(out.data, ref.detach().numpy(), what="forward")
    upstream = rng.standard_normal(out.shape).astype(np.float16)
    out.backward(xp.asarray(upstream))
    ref.backward(torch.tensor(upstream.astype(np.float64)))
    assert xt.grad.dtype == np.float32 and wt.grad.dtype == w_dtype
    assert_close16(xt.grad, leaves[0].grad.numpy(), tol=1e-5 if w_dtype == np.float32 else TOL, what="dx")
    assert_close16(wt.grad, leaves[1].grad.numpy(), tol=1e-5 if w_dtype == np.float32 else TOL, what="dw")


def test_rms_norm_out_dtype_is_the_cast_of_its_output(xp, rng):
    """nn.RMSNorm(x, out_dtype=float16) equals the float32 norm followed by astype, bit for bit,
    forward and backward (the cast's backward only widens the float16 gradient back)."""
    norm = nn.RMSNorm(64)
    norm.weight.data = xp.asarray((0.2 * rng.standard_normal(64)).astype(np.float32))
    x = xp.asarray((3 * rng.standard_normal((2, 5, 64))).astype(np.float32))
    upstream = xp.asarray(rng.standard_normal((2, 5, 64)).astype(np.float16))
    results = []
    for direct in (True, False):
        xt = Tensor(x, requires_grad=True)
        out = norm(xt, out_dtype=np.float16) if direct else norm(xt).astype(np.float16)
        out.backward(upstream)
        results.append([to_numpy(a) for a in (out.data, xt.grad, norm.weight.grad)])
        norm.zero_grad()
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_attention_fp16(xp, torch, rng):
    q, k, v = rng.standard_normal((1, 4, 9, 16)), rng.standard_normal((1, 2, 9, 16)), rng.standard_normal((1, 2, 9, 16))
    window = 5

    def theirs(q, k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
        scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    compare_fp16(torch, xp, lambda q, k, v: F.attention(q, k, v, 0.25, window=window), theirs, [q, k, v], rng)


def test_cross_entropy_fp16(xp, torch, rng):
    targets = rng.integers(0, 50, 16)
    targets[[3, 7]] = -1
    z16 = (3 * rng.standard_normal((16, 50))).astype(np.float16)
    logits = Tensor(xp.asarray(z16), requires_grad=True)
    loss = F.cross_entropy(logits, targets)
    assert loss.dtype == np.float32
    leaf = torch.tensor(z16.astype(np.float64), requires_grad=True)
    ref = torch.nn.functional.cross_entropy(leaf, torch.as_tensor(targets), ignore_index=-1)
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-5)  # float32 math on exact float16 values
    loss.backward()
    ref.backward()
    assert logits.grad.dtype == np.float16
    assert_close16(logits.grad, leaf.grad.numpy(), what="gradient")


@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 7)])
def test_cross_entropy_extreme_fp16_logits(xp, torch, rng, shape):
    z16 = rng.choice(np.array([-60000, -30000, -1, 0, 1, 30000, 60000], dtype=np.float16), size=shape)
    targets = rng.integers(0, shape[-1], shape[:-1])
    logits = Tensor(xp.asarray(z16), requires_grad=True)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    assert np.isfinite(loss.item()) and np.isfinite(to_numpy(logits.grad)).all()
    leaf = torch.tensor(z16.astype(np.float64).reshape(-1, shape[-1]), requires_grad=True)
    ref = torch.nn.functional.cross_entropy(leaf, torch.as_tensor(targets).reshape(-1))
    ref.backward()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-6)
    assert_close16(logits.grad, leaf.grad.numpy().reshape(shape), what="gradient")


def test_cross_entropy_fp16_gradient_keeps_loss_scale(xp, rng):
    """(p - y)/N is ~1e-8 here, below float16's smallest subnormal (6e-8): it survives only
    because the upstream gradient (the loss scale) multiplies it before the cast."""
    n, v, scale = 64, 16, 65536.0
    targets = rng.integers(0, v, n)
    z16 = np.zeros((n, v), dtype=np.float16)
    z16[np.arange(n), targets] = 14.26
    logits = Tensor(xp.asarray(z16), requires_grad=True)
    F.cross_entropy(logits, targets).backward(xp.asarray(scale, dtype=np.float32))
    z = z16.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(n), targets] -= 1
    expected = scale * p / n
    assert np.abs(expected[z16 == 0]).max() / scale < 6e-8  # unscaled, these would flush to zero
    grad = to_numpy(logits.grad).astype(np.float64)
    off_target = z16 == 0
    assert (grad[off_target] != 0).all()
    np.testing.assert_allclose(grad[off_target], expected[off_target], rtol=TOL)
    # p - 1 at the target (about -1e-5) loses digits to float32 cancellation, as in any float32 softmax
    np.testing.assert_allclose(grad[~off_target], expected[~off_target], rtol=2e-2)


@pytest.mark.parametrize("op", ["linear", "embedding", "rope", "gelu_tanh", "softmax", "log_softmax"])
def test_fp16_in_fp16_out(xp, rng, op):
    """Every op keeps float16 storage: float16 output, float16 finite gradients."""
    x = Tensor(xp.asarray((3 * rng.standard_normal((1, 2, 5, 8))).astype(np.float16)), requires_grad=True)
    w = Tensor(xp.asarray(rng.standard_normal((6, 8)).astype(np.float16)), requires_grad=True)
    x.data[0, 0, 0, :2] = xp.asarray([300.0, -300.0], dtype=np.float16)  # x^3 would overflow float16
    out = {"linear": lambda: F.linear(x, w), "embedding": lambda: F.embedding(np.array([[5, 0, 5]]), w),
           "rope": lambda: F.rope(x, 10000.0, offset=3), "gelu_tanh": lambda: F.gelu_tanh(x),
           "softmax": lambda: F.softmax(x), "log_softmax": lambda: F.log_softmax(x)}[op]()
    assert out.dtype == np.float16 and np.isfinite(out.numpy()).all()
    out.backward(xp.asarray(rng.standard_normal(out.shape).astype(np.float16)))
    for t in (x, w):
        if t.grad is not None:
            assert t.grad.dtype == np.float16 and np.isfinite(to_numpy(t.grad)).all()


@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", [(np.float16, np.float32, None),
                                                       (np.float32, np.float32, np.float16),
                                                       (np.float32, np.float16, np.float16),
                                                       (np.float16, np.float16, np.float32)])
def test_backward_returns_each_inputs_dtype(xp, rng, x_dtype, w_dtype, out_dtype):
    """The backward itself (before the engine casts leaf gradients) takes the output's dtype and
    returns x's dtype for x and the weight's dtype for the weight, whichever the three are."""
    x = Tensor(xp.asarray(rng.standard_normal((3, 8)).astype(x_dtype)), requires_grad=True)
    w = Tensor(xp.asarray(rng.standard_normal(8).astype(w_dtype)), requires_grad=True)
    fn = RMSNorm(1e-6, out_dtype)
    out = fn(x, w)
    assert out.dtype == (x_dtype if out_dtype is None else out_dtype)
    gx, gw = fn.backward(xp.ones(out.shape, dtype=out.dtype))
    assert gx.dtype == x_dtype and gw.dtype == w_dtype
