"""Gradients summed in place (tinygrad3/grad_sum.py): Function.grad_target, ADDED, fresh_grads
and Tensor.grad_buffer.

The engine may offer a backward an array to add its gradient into (the sum of an input's other
uses, or a leaf's grad_buffer). These tests check that the sums are the same as without, that
an array shared by two inputs is never offered (summing into it would corrupt the other), and
that the optimizer's `grads_in_buffer` trains exactly like `.grad`.
"""
import numpy as np
import pytest

import nn
import tinygrad3.functional as F
from tinygrad3 import ADDED, Function, Tensor
from tinygrad3.grad_sum import InPlaceSums
from tinygrad3.gradcheck import gradcheck
from tinygrad3.nn_ops import linear


def leaf(rng, *shape, dtype=np.float64):
    return Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)


def spy_targets(monkeypatch):
    """Record, for every Linear product, whether it was added into an engine target."""
    seen = []
    product = linear._product

    def spy(a, b, trans_a, fast, target, dtype):
        seen.append(target is not None)
        return product(a, b, trans_a, fast, target, dtype)

    monkeypatch.setattr(linear, "_product", spy)
    return seen


def spy_ownership(monkeypatch):
    """Function -> whether its output gradient was owned (offerable in place) when the walk reached it."""
    owned = {}
    pop = InPlaceSums.pop

    def spy(self, fn):
        owned[fn] = fn in self.owned
        return pop(self, fn)

    monkeypatch.setattr(InPlaceSums, "pop", spy)
    return owned


def test_three_linears_of_one_input_add_in_place(rng, monkeypatch):
    """x feeds q, k and v projections (as in attention): the second and third input gradients are
    added into the first by the products themselves; the result equals G_q Wq + G_k Wk + G_v Wv."""
    x0 = leaf(rng, 5, 6)
    x = x0 * 1.0  # an op's output (a leaf's gradient is never summed in place unless it has a grad_buffer)
    w = [leaf(rng, n, 6) for n in (4, 3, 3)]
    g = [rng.standard_normal((5, n)) for n in (4, 3, 3)]
    seen = spy_targets(monkeypatch)
    loss = sum(((F.linear(x, wi) * Tensor(gi)).sum() for wi, gi in zip(w, g)), Tensor(np.zeros(())))
    loss.backward()
    np.testing.assert_allclose(x0.grad, sum(gi @ wi.data for wi, gi in zip(w, g)), rtol=1e-12)
    for wi, gi in zip(w, g):
        np.testing.assert_allclose(wi.grad, gi.T @ x.data, rtol=1e-12)
    assert seen.count(True) == 2, seen  # x's gradient: one new array, two products added into it


def test_multi_use_graph_passes_gradcheck():
    """Outputs used by Linears and by Adds that pass their gradient to two inputs at once: the
    passed-on array is never summed into in place (it would change the other input's gradient),
    so every gradient still matches finite differences."""
    rng = np.random.default_rng(0)

    def fn(x, a, b, c):
        u, w = F.linear(x, a), F.linear(x, b)
        s = u + w               # Add hands one array to u and to w
        z = F.linear(u, c)      # u's gradient: that array + z's product
        t = F.linear(w, c) + s  # w's gradient too
        return (z + t) * 1.5

    gradcheck(fn, [rng.standard_normal((4, 5)), rng.standard_normal((5, 5)), rng.standard_normal((5, 5)),
                   rng.standard_normal((5, 5))])


def test_passed_through_gradient_of_two_inputs_is_not_a_target(rng, monkeypatch):
    """An Add hands one gradient array (here a sum the engine owns) to both its inputs. Neither
    input may treat it as its own: a product later adding into u's gradient in place would change
    w's too. So neither u's nor w's gradient was summable in place when the walk reached them,
    while s's (a sum the engine made) was."""
    x, a, b, c = leaf(rng, 3, 4), leaf(rng, 4, 4), leaf(rng, 4, 4), leaf(rng, 4, 4)
    u, w = F.linear(x, a), F.linear(x, c)
    s = u + w                                    # one array to u and to w
    m = F.linear(s, b) + s * 2.0                 # s used twice: its gradient is a sum the engine made
    single = Tensor(np.ones(3)) + m.sum(axis=1)  # this Add passes its gradient to m alone
    owned = spy_ownership(monkeypatch)
    single.sum().backward()
    assert owned[s._creator]
    assert not owned[u._creator] and not owned[w._creator]
    gs = np.ones((3, 4)) @ b.data + 2
    np.testing.assert_allclose(a.grad, gs.T @ x.data, rtol=1e-12)
    np.testing.assert_allclose(c.grad, gs.T @ x.data, rtol=1e-12)


class AddsIntoTarget(Function):
    """y = 2 x; its backward adds into the engine's target whenever it gets one."""

    fresh_grads = True

    def forward(self, x):
        return 2 * x

    def backward(self, gy):
        target = self.grad_target(0)
        if target is None:
            return 2 * gy
        target += 2 * gy
        return ADDED


def test_a_backward_may_add_into_a_leaf_buffer_and_the_engine_adds_the_rest(rng):
    """grad_buffer: backward adds into it (in its dtype), leaves .grad None, and keeps adding
    over several backward passes."""
    x = leaf(rng, 3, 2, dtype=np.float32)
    x.grad_buffer = np.zeros((3, 2), np.float64)
    for _ in range(2):
        (AddsIntoTarget()(x) * 3.0 + x).sum().backward()
    assert x.grad is None
    np.testing.assert_allclose(x.grad_buffer, 2 * (2 * 3.0 + 1.0))


def test_returning_added_without_a_target_is_an_error(rng):
    class Liar(Function):
        def forward(self, x):
            return x * 1

        def backward(self, gy):
            return ADDED

    x = leaf(rng, 2)
    with pytest.raises(RuntimeError, match="ADDED for an input that had no grad_target"):
        Liar()(x * 1.0).sum().backward()


def test_layers_add_weight_gradients_into_buffers(rng):
    """Linear, Embedding, RMSNorm and the blocked head + loss with float64 buffers on float32
    weights: each buffer ends with the sum of two passes' gradients, in float64, and .grad stays None."""
    ids = rng.integers(0, 7, (3, 4))
    targets = rng.integers(0, 7, (3, 4))
    table, w_in, norm_w, head = (leaf(rng, *s, dtype=np.float32) for s in ((7, 6), (6, 6), (6,), (7, 6)))

    def loss():
        h = F.linear(F.embedding(ids, table), w_in)
        return F.linear_cross_entropy(F.rms_norm(h, norm_w), head, targets, block_rows=5)

    loss().backward()
    expected = [p.grad.astype(np.float64) * 2 for p in (table, w_in, norm_w, head)]
    for p in (table, w_in, norm_w, head):
        p.grad, p.grad_buffer = None, np.zeros(p.shape, np.float64)
    loss().backward()
    loss().backward()
    for p, e in zip((table, w_in, norm_w, head), expected):
        assert p.grad is None
        np.testing.assert_allclose(p.grad_buffer, e, rtol=1e-5, atol=1e-6)


def stacked_leaves(rng, rows, gap=0):
    """Weights of `rows` rows of 6 with float64 grad_buffers that are views of one flat buffer,
    end to end (gap 0) or with `gap` unused values between the first two."""
    ws = [leaf(rng, n, 6) for n in rows]
    flat = np.zeros(sum(rows) * 6 + gap)
    start = 0
    for i, w in enumerate(ws):
        w.grad_buffer = flat[start:start + w.size].reshape(w.shape)
        start += w.size + (gap if i == 0 else 0)
    return ws, flat


def test_a_gemm_of_stacked_weights_adds_into_their_adjacent_buffers(rng, monkeypatch):
    """y = x [W1; W2]^T, weights whose grad buffers lie end to end: ONE weight GEMM per pass adds
    straight into the span of both buffers; two passes sum; the gradients equal the separate
    products'. Kills a span over the wrong rows, a pass added twice, and a span offered for
    buffers that are not adjacent (which would write into the gap)."""
    x, g = rng.standard_normal((5, 6)), rng.standard_normal((5, 7))
    ws, flat = stacked_leaves(rng, (4, 3))
    expected = [2 * (g[:, :4].T @ x), 2 * (g[:, 4:].T @ x)]
    seen = spy_targets(monkeypatch)
    for _ in range(2):
        (F.linear(Tensor(x), ws) * Tensor(g)).sum().backward()
    assert seen == [True, True]
    for w, e in zip(ws, expected):
        assert w.grad is None
        np.testing.assert_allclose(w.grad_buffer, e, rtol=1e-12)

    gapped, flat = stacked_leaves(rng, (4, 3), gap=6)
    seen.clear()
    (F.linear(Tensor(x), gapped) * Tensor(g)).sum().backward()
    assert seen == [False]  # no span: one new array, its row blocks added into each buffer
    for w, e in zip(gapped, expected):
        np.testing.assert_allclose(w.grad_buffer, e / 2, rtol=1e-12)
    assert not flat[24:30].any()  # the gap stays untouched


def test_stacked_weights_report_final_leaves_to_the_hook(rng):
    """With a leaf_hook (data parallelism), both stacked weights are reported once their
    gradients are complete."""
    ws, _ = stacked_leaves(rng, (4, 3))
    reported = []
    out = (F.linear(Tensor(rng.standard_normal((5, 6))), ws) ** 2).sum()
    out.backward(leaf_hook=lambda leaf: reported.append((leaf, leaf.grad_buffer.copy())))
    assert sorted(id(leaf) for leaf, _ in reported) == sorted(id(w) for w in ws)
    for leaf_, snapshot in reported:
        np.testing.assert_array_equal(snapshot, leaf_.grad_buffer)
        assert snapshot.any()


def tiny_model_and_batch(dtype):
    from models import Gemma3, Gemma3Config
    model = Gemma3(Gemma3Config.tiny(), seed=0)
    model.to(dtype=dtype)
    ids = np.random.default_rng(1).integers(0, 200, (2, 9))
    return model, ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grads_in_buffer_trains_like_grad(dtype):
    """Three AdamW updates of two micro-batches each, gradients through .grad or straight into the
    optimizer's flat buffer (AdamW.grads_in_buffer): the same weights."""
    results = []
    for in_buffer in (False, True):
        model, x, y = tiny_model_and_batch(dtype)
        opt = nn.AdamW(model.named_parameters(), lr=1e-2)
        for _ in range(3):
            for micro in range(2):
                if in_buffer:
                    with opt.grads_in_buffer():
                        model(x[micro:micro + 1], y[micro:micro + 1])[1].backward()
                    assert all(p.grad is None and p.grad_buffer is None for p in opt.params)
                else:
                    model(x[micro:micro + 1], y[micro:micro + 1])[1].backward()
            opt.step(clip_norm=1.0)
            opt.zero_grad()
        results.append({name: p.data.copy() for name, p in model.named_parameters()})
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.gpu
def test_fast_path_sums_equal_the_engine_sums(gpu_xp):
    """fp16 tiny model on the GPU, fast path: the gradients added in place (q/k/v and gate/up input
    gradients by the GEMMs, the residual stream's by the norm kernels, weights into float32
    buffers) equal those of a pass with in-place sums switched off, within fp16 rounding."""
    from tinygrad3 import kernels
    cp = gpu_xp
    model, x, y = tiny_model_and_batch(np.float16)
    model.to(device="cuda")
    x, y = cp.asarray(x), cp.asarray(y)
    grads = []
    with kernels.fast(True):
        for in_place in (False, True):
            for p in model.parameters():
                p.grad, p.grad_buffer = None, (cp.zeros(p.shape, np.float32) if in_place else None)
            with pytest.MonkeyPatch.context() as patch:
                if not in_place:  # no targets at all: the engine makes every sum
                    patch.setattr(InPlaceSums, "target", lambda self, parent: None)
                (model(x, y, return_logits=False)[1] * 1024.0).backward()
            grads.append([cp.asnumpy(p.grad_buffer if in_place else p.grad).astype(np.float64)
                          for p in model.parameters()])
    for (name, _), plain, summed in zip(model.named_parameters(), *grads):
        scale = np.abs(plain).max() + 1e-3
        np.testing.assert_allclose(summed, plain, rtol=2e-2, atol=2e-2 * scale, err_msg=name)
