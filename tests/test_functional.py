"""tinygrad3.functional: a float64 gradcheck and a torch.autograd comparison for every op,
plus the behaviours each op promises (masks, caches, ignored targets, errors)."""
import numpy as np
import pytest

import tinygrad3.functional as F
from engine_checks import check_grad, compare_with_torch
from tinygrad3 import Tensor, backend
from tinygrad3.backend import to_numpy
from tinygrad3.kernels import fast


def host(t):
    return to_numpy(t.data if isinstance(t, Tensor) else t)


# ----- linear ------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(5, 3), (2, 3, 3), (3,)])
def test_linear(xp, torch, rng, x_shape):
    x, w = rng.standard_normal(x_shape), rng.standard_normal((4, 3))
    check_grad(xp, F.linear, [x, w])
    compare_with_torch(torch, xp, F.linear, torch.nn.functional.linear, [x, w])


def test_linear_shape_error(xp, rng):
    with pytest.raises(ValueError, match="input features"):
        F.linear(Tensor(xp.asarray(rng.standard_normal((2, 3)))), Tensor(xp.asarray(rng.standard_normal((4, 5)))))


# ----- embedding ---------------------------------------------------------------------------

IDS = np.array([[1, 4, 1], [0, 4, 4]])  # repeated ids


def test_embedding(xp, torch, rng):
    w = rng.standard_normal((5, 3))
    check_grad(xp, lambda w: F.embedding(IDS, w), [w])
    compare_with_torch(torch, xp, lambda w: F.embedding(xp.asarray(IDS), w),
                       lambda w: torch.nn.functional.embedding(torch.as_tensor(IDS), w), [w])


def test_embedding_repeated_ids_accumulate(xp, rng):
    w = Tensor(xp.asarray(rng.standard_normal((4, 2))), requires_grad=True)
    ids = Tensor(xp.asarray([2, 0, 2, 2]))  # an integer Tensor works as well as an array
    out = F.embedding(ids, w)
    np.testing.assert_array_equal(host(out), host(w)[[2, 0, 2, 2]])
    out.sum().backward()
    np.testing.assert_array_equal(host(w.grad), [[1, 1], [0, 0], [3, 3], [0, 0]])


def test_embedding_errors(xp, rng):
    w = Tensor(xp.asarray(rng.standard_normal((4, 2))))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        F.embedding(np.array([0, 4]), w)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        F.embedding(np.array([-1]), w)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0, 1.0]), w)


# ----- ids already on the GPU: their range check is read later, by no sync of its own -------

@pytest.mark.gpu
def test_gpu_ids_out_of_range_raise_at_the_end_of_backward(gpu_xp, rng):
    cp = gpu_xp
    w = Tensor(cp.asarray(rng.standard_normal((4, 2)).astype(np.float32)), requires_grad=True)
    out = F.embedding(cp.asarray([1, 2 ** 40, -3]), w)  # reported later: the forward did not wait
    with pytest.raises(ValueError, match=r"embedding ids must lie in \[0, 4\); found 1099511627776 \(checked on"):
        out.sum().backward()
    assert int(cp.arange(4).sum()) == 6  # the GPU is fine: nothing read or written outside the table
    F.embedding(cp.asarray([1, 3]), w).sum().backward()  # reported once, not again
    with pytest.raises(ValueError, match=r"found 9"):
        F.embedding(cp.asarray([9]), w).numpy()  # or at the next copy to the host


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_targets_out_of_range_raise_at_the_end_of_backward(gpu_xp, rng, fused):
    cp = gpu_xp
    z = Tensor(cp.asarray(rng.standard_normal((3, 8)).astype(np.float16)), requires_grad=True)
    with fast(fused):
        loss = F.cross_entropy(z, cp.asarray([0, -1, 2 ** 40]))
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 8\) \(or ignore_index -1\); found 1099511"):
            (loss * 1024.0).backward()
    assert int(cp.arange(4).sum()) == 6  # no logit was read outside the array (fused: a NaN row)


@pytest.mark.gpu
def test_gpu_range_checks_do_not_wait_and_are_retired(gpu_xp):
    cp = gpu_xp
    w, ids, a = Tensor(cp.ones((4, 2), np.float32)), cp.asarray([0, 3]), cp.ones((4096, 4096), np.float32)
    F.embedding(ids, w)  # compiles what the check launches
    backend.raise_deferred()
    for _ in range(20):  # tens of ms of queued GPU work
        a @ a
    F.embedding(ids, w)
    assert not cp.cuda.get_current_stream().done  # the check let the host run ahead
    cp.cuda.get_current_stream().synchronize()
    F.embedding(ids, w)
    assert len(backend._deferred) == 1  # the passed check was read and dropped, without waiting
    backend.raise_deferred()
    assert not backend._deferred


# ----- rms_norm ----------------------------------------------------------------------------

def torch_rms_norm(torch, eps):
    return lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


@pytest.mark.parametrize("shape", [(2, 3, 5), (7,)])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("out_dtype", [None, np.float64])
def test_rms_norm(xp, torch, rng, shape, eps, out_dtype):
    x, w = rng.standard_normal(shape), 0.3 * rng.standard_normal(shape[-1])
    fn = lambda x, w: F.rms_norm(x, w, eps=eps, out_dtype=out_dtype)  # noqa: E731
    check_grad(xp, fn, [x, w])
    compare_with_torch(torch, xp, fn, torch_rms_norm(torch, eps), [x, w])


def test_rms_norm_float32_output(xp, torch, rng):
    """float64 math rounded once to a float32 output: gy arrives in float32, dx and dw leave in
    float64. Finite differences see the rounding of y, hence the wider step and tolerance; the
    torch comparison rounds the same float64 y and the same upstream gradient."""
    x, w = rng.standard_normal((2, 3, 5)), 0.3 * rng.standard_normal(5)
    fn = lambda x, w: F.rms_norm(x, w, out_dtype=np.float32)  # noqa: E731
    check_grad(xp, lambda x, w: fn(x, w).astype(np.float64), [x, w], eps=3e-3, atol=1e-4, rtol=1e-4)
    compare_with_torch(torch, xp, fn, lambda x, w: torch_rms_norm(torch, 1e-6)(x, w).float(), [x, w], rtol=2e-7)


# ----- rope --------------------------------------------------------------------------------

def torch_rope(torch, base, offset):
    """Hugging Face's formula: float32 angles, out = x cos + rotate_half(x) sin."""
    def rope(x):
        t, d = x.shape[-2:]
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        angles = torch.arange(offset, offset + t).float()[:, None] * inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * emb.cos().double() + torch.cat([-x2, x1], dim=-1) * emb.sin().double()
    return rope


@pytest.mark.parametrize("base", [10000.0, 100.0])
@pytest.mark.parametrize("offset", [0, 5, 300])
def test_rope(xp, torch, rng, base, offset):
    x = rng.standard_normal((2, 3, 5, 6))
    fn = lambda x: F.rope(x, base, offset=offset)  # noqa: E731
    check_grad(xp, fn, [x])
    # float32 angles carry an error of about one ulp of p * inv_freq, so the tolerance grows with p
    tol = 1e-6 + 2e-7 * (offset + x.shape[-2])
    compare_with_torch(torch, xp, fn, torch_rope(torch, base, offset), [x], rtol=tol, atol=tol)


def test_rope_offset_matches_full_sequence(xp, rng):
    """KV-cache generation rotates one position at a time with offset = its position."""
    x = xp.asarray(rng.standard_normal((1, 2, 9, 4)).astype(np.float32))
    full = host(F.rope(Tensor(x), 10000.0))
    for t in (0, 4, 8):
        one = host(F.rope(Tensor(x[:, :, t:t + 1]), 10000.0, offset=t))
        np.testing.assert_allclose(one, full[:, :, t:t + 1], rtol=1e-6, atol=1e-6)


def test_rope_rotates_pairs_by_position_angle(xp):
    """Position p turns the pair (x_i, x_{i+D/2}) by p * base^(-2i/D): check with D = 2, base any."""
    x = Tensor(xp.asarray(np.ones((1, 1, 3, 2), dtype=np.float64)))
    out = host(F.rope(x, 10.0))[0, 0]
    p = np.arange(3)
    np.testing.assert_allclose(out[:, 0], np.cos(p) - np.sin(p), rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], np.sin(p) + np.cos(p), rtol=1e-6)


def test_rope_errors(xp, rng):
    with pytest.raises(ValueError, match="even"):
        F.rope(Tensor(xp.asarray(rng.standard_normal((1, 1, 2, 5)))), 10000.0)
    with pytest.raises(ValueError, match="offset"):
        F.rope(Tensor(xp.asarray(rng.standard_normal((1, 1, 2, 4)))), 10000.0, offset=-1)


# ----- qk_norm_rope ------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 7])
def test_qk_norm_rope(xp, torch, rng, offset):
    x, w = rng.standard_normal((2, 3, 2, 6)), 0.3 * rng.standard_normal(6)
    fn = lambda x, w: F.qk_norm_rope(x, w, 1e-6, 100.0, offset)  # noqa: E731
    check_grad(xp, fn, [x, w])
    torch_norm, torch_rotate = torch_rms_norm(torch, 1e-6), torch_rope(torch, 100.0, offset)
    tol = 1e-6 + 2e-7 * (offset + x.shape[1])  # float32 angles, as test_rope
    compare_with_torch(torch, xp, fn, lambda x, w: torch_rotate(torch_norm(x, w).transpose(1, 2)), [x, w],
                       rtol=tol, atol=tol)


def qk_norm_rope_reference(torch, eps, base, offset):
    """RMSNorm, head transpose and RoPE written out apart from the engine's helpers: each pair
    (u_i, u_{i+D/2}) turned by the position's float32 angle, as Hugging Face's Gemma."""
    def reference(x, w):
        u = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + w)
        u = u.permute(0, 2, 1, 3)
        t, half = u.shape[2], u.shape[3] // 2
        freq = 1.0 / base ** (torch.arange(half, dtype=torch.float32) * 2 / (2 * half))
        angle = torch.arange(offset, offset + t, dtype=torch.float32)[:, None] * freq
        cos, sin = angle.cos().double(), angle.sin().double()
        u1, u2 = u[..., :half], u[..., half:]
        return torch.cat([u1 * cos - u2 * sin, u2 * cos + u1 * sin], dim=-1)
    return reference


QK_TOLERANCE = {np.float16: 4e-3, np.float32: 1e-6, np.float64: 1e-7}  # of each array's scale (float32 angles)


@pytest.mark.parametrize("on", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_qk_norm_rope_is_the_three_ops(xp, torch, rng, dtype, on):
    """F.qk_norm_rope in x's dtype (float16 on a GPU with the fast path: the fused kernel) against the
    float64 composition of the three ops written independently: output and both gradients."""
    eps, base, offset = 0.1, 1e4, 3
    x = rng.standard_normal((2, 5, 4, 8)).astype(dtype)
    w, gy = (0.3 * rng.standard_normal(8)).astype(np.float32), rng.standard_normal((2, 4, 5, 8)).astype(dtype)
    tx, tw = Tensor(xp.asarray(x), requires_grad=True), Tensor(xp.asarray(w), requires_grad=True)
    with fast(on):
        out = F.qk_norm_rope(tx, tw, eps, base, offset)
        out.backward(xp.asarray(gy))
    leaves = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, w)]
    ref = qk_norm_rope_reference(torch, eps, base, offset)(*leaves)
    ref.backward(torch.tensor(gy.astype(np.float64)))
    pairs = [("output", out.data, ref.detach(), dtype), ("x's gradient", tx.grad, leaves[0].grad, dtype),
             ("w's gradient", tw.grad, leaves[1].grad, np.float32)]
    for name, ours, theirs, want in pairs:
        theirs = theirs.numpy()
        assert ours.dtype == want, (name, ours.dtype)
        tol = QK_TOLERANCE[dtype] * float(np.abs(theirs).max())
        np.testing.assert_allclose(host(ours).astype(np.float64), theirs, rtol=0, atol=tol, err_msg=name)


def test_qk_norm_rope_errors(xp, rng):
    x = Tensor(xp.asarray(rng.standard_normal((1, 2, 1, 4))))
    with pytest.raises(ValueError, match="B, T, H, D"):
        F.qk_norm_rope(x, Tensor(xp.zeros(5)), 1e-6, 1e4)
    with pytest.raises(ValueError, match="offset"):
        F.qk_norm_rope(x, Tensor(xp.zeros(4)), 1e-6, 1e4, offset=-1)


# ----- attention ---------------------------------------------------------------------------

def torch_attention(torch, scale, window=None, q_offset=None):
    """Explicit mask and softmax, K/V repeated over the query heads of their group."""
    def attention(q, k, v):
        tq, (hkv, tk) = q.shape[2], k.shape[1:3]
        group = q.shape[1] // hkv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        pos = torch.arange(tq)[:, None] + (tk - tq if q_offset is None else q_offset)
        key = torch.arange(tk)[None, :]
        allowed = key <= pos
        if window is not None:
            allowed &= key > pos - window
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v
    return attention


def attention_inputs(rng, b, hq, hkv, tq, d, tk=None):
    tk = tq if tk is None else tk
    return [rng.standard_normal((b, hq, tq, d)), rng.standard_normal((b, hkv, tk, d)),
            rng.standard_normal((b, hkv, tk, d))]


ATTENTION_CASES = [  # (B, Hq, Hkv, T, D, window)
    (1, 4, 1, 3, 3, 4),     # multi-query, T smaller than the window
    (1, 4, 1, 7, 2, 3),     # multi-query, T larger than the window
    (1, 4, 2, 6, 3, 4),     # grouped, T larger than the window
    (2, 4, 2, 5, 3, None),  # grouped, causal only
    (1, 2, 2, 4, 3, None),  # one kv head per query head
]


@pytest.mark.parametrize("b, hq, hkv, t, d, window", ATTENTION_CASES)
def test_attention(xp, torch, rng, b, hq, hkv, t, d, window):
    arrays, scale = attention_inputs(rng, b, hq, hkv, t, d), d ** -0.5
    fn = lambda q, k, v: F.attention(q, k, v, scale, window=window)  # noqa: E731
    check_grad(xp, fn, arrays)
    compare_with_torch(torch, xp, fn, torch_attention(torch, scale, window), arrays)


def test_attention_large_random_directions(xp, torch, rng):
    """Too big for a full gradcheck (2048 inputs): checked along random directions."""
    arrays = attention_inputs(rng, 2, 4, 2, 16, 8)
    fn = lambda q, k, v: F.attention(q, k, v, 0.3, window=5)  # noqa: E731
    check_grad(xp, fn, arrays, directions=6)
    compare_with_torch(torch, xp, fn, torch_attention(torch, 0.3, 5), arrays)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("q_offset", [None, 1])
def test_attention_queries_at_an_offset(xp, torch, rng, window, q_offset):
    """Fewer queries than keys (KV-cache generation): query i sits at q_offset + i."""
    arrays = attention_inputs(rng, 1, 4, 2, 2, 3, tk=6)
    fn = lambda q, k, v: F.attention(q, k, v, 0.5, window=window, q_offset=q_offset)  # noqa: E731
    check_grad(xp, fn, arrays)
    compare_with_torch(torch, xp, fn, torch_attention(torch, 0.5, window, q_offset), arrays)


def test_attention_last_queries_match_full_sequence(xp, rng):
    q, k, v = (Tensor(xp.asarray(a)) for a in attention_inputs(rng, 1, 4, 1, 7, 4))
    full = host(F.attention(q, k, v, 0.5, window=3))
    last = host(F.attention(q[:, :, 5:], k, v, 0.5, window=3))
    middle = host(F.attention(q[:, :, 2:4], k, v, 0.5, window=3, q_offset=2))
    np.testing.assert_allclose(last, full[:, :, 5:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(middle, full[:, :, 2:4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_sees_exactly_the_window(xp, rng, window):
    """Output row i depends on v_j exactly for i - W < j <= i (all j <= i without a window)."""
    t = 6
    q, k, v = (Tensor(xp.asarray(a), requires_grad=True) for a in attention_inputs(rng, 1, 2, 1, t, 3))
    for i in range(t):
        v.grad = None
        upstream = np.zeros((1, 2, t, 3))
        upstream[0, :, i] = 1.0
        F.attention(q, k, v, 1.0, window=window).backward(xp.asarray(upstream))
        touched = np.flatnonzero(np.abs(host(v.grad)[0, 0]).sum(axis=-1) > 0)
        lo = 0 if window is None else max(0, i - window + 1)
        np.testing.assert_array_equal(touched, np.arange(lo, i + 1))


def test_attention_partial_gradients(xp, rng):
    """Each input alone gets the gradient it gets when all three require one."""
    arrays = [xp.asarray(a) for a in attention_inputs(rng, 1, 4, 2, 5, 3)]
    upstream = xp.asarray(rng.standard_normal((1, 4, 5, 3)))
    fn = lambda q, k, v: F.attention(q, k, v, 0.4, window=3)  # noqa: E731
    all_grad = [Tensor(a, requires_grad=True) for a in arrays]
    fn(*all_grad).backward(upstream)
    for i in range(3):
        one = [Tensor(a, requires_grad=(j == i)) for j, a in enumerate(arrays)]
        out = fn(*one)
        saved = out._creator
        assert (saved.q is None) == (i != 1) and (saved.k is None) == (i != 0) and (saved.v is None) == (i == 2)
        out.backward(upstream)
        np.testing.assert_allclose(host(one[i].grad), host(all_grad[i].grad), rtol=1e-12, atol=1e-12)
        assert all(t.grad is None for j, t in enumerate(one) if j != i)


@pytest.mark.parametrize("window, q_offset, tk", [(None, None, 5), (3, None, 5), (2, 1, 6), (None, 3, 7)])
def test_attention_bthd(xp, torch, rng, window, q_offset, tk):
    """out_layout="bthd": the output (B, Tq, Hq, D), contiguous, the default one transposed."""
    arrays = attention_inputs(rng, 2, 4, 2, 3, 3, tk=tk)
    fn = lambda q, k, v: F.attention(q, k, v, 0.5, window=window, q_offset=q_offset, out_layout="bthd")  # noqa: E731
    check_grad(xp, fn, arrays)
    theirs = torch_attention(torch, 0.5, window, q_offset)
    compare_with_torch(torch, xp, fn, lambda q, k, v: theirs(q, k, v).transpose(1, 2), arrays)
    q, k, v = (Tensor(xp.asarray(a)) for a in arrays)
    out = fn(q, k, v).data
    assert out.shape == (2, 3, 4, 3) and out.flags.c_contiguous
    default = host(F.attention(q, k, v, 0.5, window=window, q_offset=q_offset))
    np.testing.assert_array_equal(to_numpy(out), default.transpose(0, 2, 1, 3))


def test_attention_errors(xp, rng):
    q, k, v = (Tensor(xp.asarray(a)) for a in attention_inputs(rng, 1, 3, 2, 4, 2))
    with pytest.raises(ValueError, match="multiple"):
        F.attention(q, k, v, 1.0)
    q, k, v = (Tensor(xp.asarray(a)) for a in attention_inputs(rng, 1, 2, 1, 4, 2, tk=3))
    with pytest.raises(ValueError, match="only 3"):
        F.attention(q, k, v, 1.0)
    q, k, v = (Tensor(xp.asarray(a)) for a in attention_inputs(rng, 1, 2, 1, 4, 2))
    with pytest.raises(ValueError, match="out_layout"):
        F.attention(q, k, v, 1.0, out_layout="BTHD")


# ----- linear and rms_norm with one input frozen -------------------------------------------

@pytest.mark.parametrize("op", ["linear", "rms_norm"])
def test_partial_gradients(xp, rng, op):
    arrays = [xp.asarray(rng.standard_normal((2, 3, 4))), xp.asarray(rng.standard_normal((5, 4) if op == "linear"
                                                                                         else (4,)))]
    fn = getattr(F, op)
    upstream = xp.asarray(rng.standard_normal(fn(*[Tensor(a) for a in arrays]).shape))
    all_grad = [Tensor(a, requires_grad=True) for a in arrays]
    fn(*all_grad).backward(upstream)
    for i in range(2):
        one = [Tensor(a, requires_grad=(j == i)) for j, a in enumerate(arrays)]
        fn(*one).backward(upstream)
        np.testing.assert_allclose(host(one[i].grad), host(all_grad[i].grad), rtol=1e-12, atol=1e-12)
        assert one[1 - i].grad is None


def test_linear_frozen_weight_does_not_keep_x(xp, rng):
    x = Tensor(xp.asarray(rng.standard_normal((2, 3))), requires_grad=True)
    out = F.linear(x, Tensor(xp.asarray(rng.standard_normal((4, 3)))))
    assert out._creator.x2 is None and out._creator.w is not None


# ----- pointwise and softmax family --------------------------------------------------------

def test_linear_of_stacked_weights(xp, torch, rng):
    """F.linear(x, (W1, W2, W3)) is x [W1; W2; W3]^T: finite differences, torch, and a weight that
    needs no gradient gets None while the others get theirs."""
    x, ws = rng.standard_normal((2, 3, 5)), [rng.standard_normal((n, 5)) for n in (4, 1, 2)]
    check_grad(xp, lambda x, a, b, c: F.linear(x, [a, b, c]), [x, *ws])
    compare_with_torch(torch, xp, lambda x, a, b, c: F.linear(x, (a, b, c)),
                       lambda x, a, b, c: x @ torch.cat([a, b, c]).T, [x, *ws])
    a, b = Tensor(xp.asarray(ws[0]), requires_grad=True), Tensor(xp.asarray(ws[1]))
    F.linear(Tensor(xp.asarray(x)), (a, b)).sum().backward()
    assert b.grad is None and a.grad.shape == (4, 5)
    np.testing.assert_allclose(to_numpy(a.grad), np.broadcast_to(x.sum(axis=(0, 1)), (4, 5)), rtol=1e-12)


def test_stacked_weights_laid_end_to_end_are_a_view_else_a_copy(xp, rng):
    """Weights that are views of one flat buffer, in order, are stacked without a copy (the view is
    what backward keeps for dX = G W); out of order, with a gap, or repeated, they are not a view,
    and a Linear whose input wants a gradient keeps a copy of both. The values are the same."""
    flat = xp.asarray(rng.standard_normal(40))
    a, b, c = (flat[i:j].reshape(-1, 4) for i, j in ((0, 12), (12, 20), (24, 40)))
    assert xp.shares_memory(backend.stacked_view([a, b]), flat)
    np.testing.assert_array_equal(to_numpy(backend.stacked_view([a, b])), to_numpy(flat[:20]).reshape(5, 4))
    for parts in ([b, a], [a, c], [a, a]):
        assert backend.stacked_view(parts) is None
    x = Tensor(xp.asarray(rng.standard_normal((3, 4))), requires_grad=True)
    for parts, shared in (([a, b], True), ([b, a], False), ([a, c], False)):
        out = F.linear(x, [Tensor(p) for p in parts])
        assert bool(xp.shares_memory(out._creator.w, flat)) == shared
        expected = to_numpy(x.data) @ np.concatenate([to_numpy(p) for p in parts]).T
        np.testing.assert_allclose(to_numpy(out.data), expected, rtol=1e-12)


def test_inference_with_stacked_weights_not_end_to_end_copies_no_weight(xp, rng, monkeypatch):
    """Without a gradient (generation), weights that are not end to end are multiplied one by one
    and the outputs joined: no copy of the weights on every call."""
    from tinygrad3 import no_grad
    w1, w2, x = (xp.asarray(rng.standard_normal(s)) for s in ((4, 5), (3, 5), (2, 5)))
    joined, concatenate = [], xp.concatenate
    monkeypatch.setattr(xp, "concatenate", lambda arrays, *a, **k: (
        joined.append([tuple(t.shape) for t in arrays]), concatenate(arrays, *a, **k))[1])
    with no_grad():
        out = F.linear(Tensor(x), (Tensor(w1), Tensor(w2)))
    assert joined == [[(2, 4), (2, 3)]]
    expected = to_numpy(x) @ np.concatenate([to_numpy(w1), to_numpy(w2)]).T
    np.testing.assert_allclose(to_numpy(out.data), expected, rtol=1e-12)


def test_linear_rejects_stacked_weights_of_two_dtypes(rng):
    x = Tensor(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="one dtype"):
        F.linear(x, (Tensor(np.zeros((3, 5), np.float32)), Tensor(np.zeros((3, 5), np.float64))))


def test_gelu_tanh(xp, torch, rng):
    x = 3 * rng.standard_normal((3, 7))
    check_grad(xp, F.gelu_tanh, [x])
    compare_with_torch(torch, xp, F.gelu_tanh, lambda x: torch.nn.functional.gelu(x, approximate="tanh"), [x])


def test_geglu(xp, torch, rng):
    """x = [gate | up]: a finite-difference check, and torch's gelu(gate) * up on x's two halves."""
    x = rng.standard_normal((2, 3, 14)) * np.r_[3 * np.ones(7), np.ones(7)]
    check_grad(xp, F.geglu, [x])

    def torch_geglu(x):
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    compare_with_torch(torch, xp, F.geglu, torch_geglu, [x])


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_family(xp, torch, rng, name, axis):
    x = 2 * rng.standard_normal((3, 5, 4))
    fn = lambda x: getattr(F, name)(x, axis=axis)  # noqa: E731
    check_grad(xp, fn, [x])
    compare_with_torch(torch, xp, fn, lambda x: getattr(torch, name)(x, dim=axis), [x])


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family_is_shift_stable(xp, torch, rng, name):
    """Huge inputs (exp would overflow float64) give the same result as shifted ones."""
    x = rng.standard_normal((2, 6))
    big = host(getattr(F, name)(Tensor(xp.asarray(x + 1e4))))
    ref = getattr(torch, name)(torch.tensor(x), dim=-1).numpy()
    np.testing.assert_allclose(big, ref, rtol=1e-9, atol=1e-9)


# ----- cross_entropy -----------------------------------------------------------------------

def torch_cross_entropy(torch, targets, ignore_index=-1):
    return lambda z: torch.nn.functional.cross_entropy(
        z.reshape(-1, z.shape[-1]), torch.as_tensor(targets).reshape(-1), ignore_index=ignore_index)


@pytest.mark.parametrize("targets", [np.array([0, 4, -1, 2, 2, -1]),
                                     np.array([[1, -1, 3], [4, 0, 0]])], ids=["2d", "3d"])
def test_cross_entropy(xp, torch, rng, targets):
    z = 2 * rng.standard_normal(targets.shape + (5,))
    fn = lambda z: F.cross_entropy(z, targets)  # noqa: E731
    check_grad(xp, fn, [z])
    compare_with_torch(torch, xp, fn, torch_cross_entropy(torch, targets), [z])


def test_cross_entropy_tensor_targets_and_custom_ignore(xp, torch, rng):
    targets = np.array([3, -100, 1, 0])
    z = rng.standard_normal((4, 6))
    fn = lambda z: F.cross_entropy(z, Tensor(xp.asarray(targets)), ignore_index=-100)  # noqa: E731
    check_grad(xp, fn, [z])
    compare_with_torch(torch, xp, fn, torch_cross_entropy(torch, targets, -100), [z])


def test_cross_entropy_float32_scalar(xp, rng):
    loss = F.cross_entropy(Tensor(xp.asarray(rng.standard_normal((3, 4)).astype(np.float32))), np.array([0, 1, 3]))
    assert loss.shape == () and loss.dtype == np.float32


def test_cross_entropy_all_ignored_is_zero(xp, rng):
    z = Tensor(xp.asarray(rng.standard_normal((3, 4)).astype(np.float32)), requires_grad=True)
    loss = F.cross_entropy(z, np.array([-1, -1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad.dtype == np.float32
    np.testing.assert_array_equal(host(z.grad), np.zeros((3, 4)))


def test_cross_entropy_errors(xp, rng):
    z = Tensor(xp.asarray(rng.standard_normal((3, 4))))
    with pytest.raises(ValueError, match=r"\[0, 4\).*found 4"):
        F.cross_entropy(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"found -2"):
        F.cross_entropy(z, np.array([0, -2, -1]))
    with pytest.raises(ValueError, match="do not match"):
        F.cross_entropy(z, np.array([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(z, np.array([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("family, choose, fused, reference", [
    ("gemm", lambda a: F._linear_class(a["x"], a["w"]), "gemm.GemmLinear", "Linear"),
    ("embedding", lambda a: F._embedding_class(a["w"]), "embedding.FusedEmbedding", "Embedding"),
    ("rmsnorm", lambda a: F._rms_norm_class(a["x"], a["w"], None), "rmsnorm.FusedRMSNorm", "RMSNorm"),
    ("rope", lambda a: F._rope_class(a["x"]), "rope.FusedRoPE", "RoPE"),
    ("flash_attention", lambda a: F._attention_class(a["q"], a["q"], a["q"], None, 0),
     "flash_attention.FlashAttention", "Attention"),
    ("attention", lambda a: F._attention_class(a["q"], a["q"], a["q"], None, 0), "attention.FusedAttention",
     "Attention"),
    ("geglu", lambda a: F._geglu_class(a["x"]), "geglu.FusedGeGLU", "GeGLU"),
    ("cross_entropy", lambda a: F._cross_entropy_class(a["x"]), "cross_entropy.FusedCrossEntropy", "CrossEntropy"),
])
def test_each_op_takes_its_kernel_function_exactly_when_its_family_is_on(monkeypatch, family, choose, fused,
                                                                         reference):
    """functional's one choice per op: the kernel module's Function with the op's own family on (and
    arrays it takes), the reference Function with every other family on. Kills a choice that reads
    another family's switch or returns another op's Function."""
    import tinygrad3.kernels as kernels_pkg
    module, name = fused.split(".")
    arrays = {"x": np.zeros((2, 3, 4, 16), np.float16), "w": np.zeros((16, 16), np.float16),
              "q": np.zeros((1, 2, 4, 16), np.float16)}
    arrays["w"] = arrays["w"][0] if family == "rmsnorm" else arrays["w"]
    on = {family}
    monkeypatch.setattr(F, "use_fast", lambda fam, *a, dtypes=None: fam in on)
    assert choose(arrays) is getattr(getattr(kernels_pkg, module), name)
    on = set(kernels_pkg.FAMILIES) - ({"flash_attention", "attention"} if "attention" in family else {family})
    assert choose(arrays) is getattr(F, reference)
    if family == "flash_attention":  # flash off, attention on: the GEMM path; flash declining the shape: too
        on = {"attention"}
        assert choose(arrays) is kernels_pkg.attention.FusedAttention
        on = {"flash_attention", "attention"}
        assert F._attention_class(arrays["q"][..., :8], arrays["q"][..., :8], arrays["q"][..., :8], None, 0) \
            is kernels_pkg.attention.FusedAttention


def test_qk_norm_rope_and_residual_norm_take_their_kernels_only_with_their_family(monkeypatch):
    x, w, h = np.zeros((1, 4, 2, 16), np.float16), np.zeros(16, np.float32), np.zeros((1, 4, 2, 16), np.float32)
    for on, expected in (({"qk_norm_rope"}, True), ({"rmsnorm"}, False), (set(), False)):
        monkeypatch.setattr(F, "use_fast", lambda fam, *a, dtypes=None: fam in on)
        assert F._qk_norm_rope_fused(x, w) is expected
    for on, expected in (({"rmsnorm"}, True), ({"qk_norm_rope"}, False)):
        monkeypatch.setattr(F, "use_fast", lambda fam, *a, dtypes=None: fam in on)
        assert F._residual_rms_norm_fused(h, x, w) is expected
