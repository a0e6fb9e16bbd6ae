"""F.rms_norm(x, w, residual=h): h + rms_norm(x, w) as one op, with the unfused pair's exact
values and gradients (float64 gradcheck and torch; the model's float32 stream + float16 branch on
NumPy; the fused kernel on the GPU, bit for bit against the unfused fast path)."""
import numpy as np
import pytest

import tinygrad3.functional as F
from engine_checks import check_grad, compare_with_torch
from tinygrad3 import Tensor, backend
from tinygrad3.kernels import fast


def run(fn, arrays, upstream):
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(upstream)
    return [backend.to_numpy(out.data)] + [backend.to_numpy(t.grad) for t in tensors]


def fused(h, x, w):
    return F.rms_norm(x, w, residual=h)


def unfused(h, x, w):
    return h + F.rms_norm(x, w)


def test_gradcheck_and_torch(xp, torch, rng):
    arrays = [rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8)), 0.1 * rng.standard_normal(8)]
    check_grad(xp, fused, arrays)

    def theirs(h, x, w):
        n = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
        return h + n * (1 + w)
    compare_with_torch(torch, xp, fused, theirs, arrays)


def test_float32_stream_with_float16_branch_equals_the_unfused_pair(xp, rng):
    """The model's case: h float32, x float16, w float32; values and gradients bit for bit."""
    h = xp.asarray(rng.standard_normal((4, 5, 64)).astype(np.float32))
    x = xp.asarray((3 * rng.standard_normal((4, 5, 64))).astype(np.float16))
    w = xp.asarray((0.1 * rng.standard_normal(64)).astype(np.float32))
    gy = xp.asarray(rng.standard_normal((4, 5, 64)).astype(np.float32))
    got, expected = run(fused, [h, x, w], gy), run(unfused, [h, x, w], gy)
    assert got[0].dtype == np.float32 and got[2].dtype == np.float16 and got[3].dtype == np.float32
    for a, b, what in zip(got, expected, ("y", "dh", "dx", "dw")):
        np.testing.assert_array_equal(a, b, err_msg=what)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 7, 640), (2, 5, 1000), (1, 1, 24)])
def test_fused_kernel_equals_the_unfused_fast_path(gpu_xp, rng, shape):
    """One kernel each way (kernels/rmsnorm.py, residual form) against the fast path's own
    norm kernel, add and cast: the same bits, whatever the width."""
    cp = gpu_xp
    h = cp.asarray(rng.standard_normal(shape).astype(np.float32))
    x = cp.asarray((3 * rng.standard_normal(shape)).astype(np.float16))
    w = cp.asarray((0.1 * rng.standard_normal(shape[-1])).astype(np.float32))
    gy = cp.asarray(rng.standard_normal(shape).astype(np.float32))
    with fast(True):
        got, expected = run(fused, [h, x, w], gy), run(unfused, [h, x, w], gy)
    for a, b, what in zip(got, expected, ("y", "dh", "dx")):
        np.testing.assert_array_equal(a, b, err_msg=what)
    np.testing.assert_allclose(got[3], expected[3], rtol=1e-5, atol=1e-5, err_msg="dw")  # per-block sums


def test_errors(xp, rng):
    x = Tensor(xp.asarray(rng.standard_normal((2, 4))))
    w = Tensor(xp.asarray(rng.standard_normal(4)))
    with pytest.raises(ValueError, match="does not match"):
        F.rms_norm(x, w, residual=Tensor(xp.asarray(rng.standard_normal((2, 3)))))
    with pytest.raises(ValueError, match="out_dtype and residual"):
        F.rms_norm(x, w, out_dtype=np.float32, residual=x)
