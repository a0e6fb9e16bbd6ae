"""Activation recomputation (tinygrad3.recompute): the same gradients, fewer activations kept.

CPU: the engine (gradcheck, equality with the plain graph, corner cases, leaf hook, deferred GPU
checks), the Gemma 3 switch (gradients, what is kept), data parallelism. GPU (`gpu` marker): the
fast path in fp16, and a micro-batch with recompute captured as a CUDA graph.
"""
import gc
import tracemalloc

import numpy as np
import pytest

import nn
import tinygrad3.functional as F
from models import Gemma3, Gemma3Config
from tinygrad3 import Function, Tensor, backend, gradcheck, is_grad_enabled, no_grad
from tinygrad3.recompute import Recompute, recompute
from tinygrad3.distributed import DataParallel, InProcessGroup
from tinygrad3.kernels import fast


class Counted:
    """fn for recompute that counts its calls and records the arguments it was given."""

    def __init__(self, fn):
        self.fn, self.calls, self.recording = fn, [], []

    def __call__(self, *args):
        self.calls.append(args)
        self.recording.append(is_grad_enabled())
        return self.fn(*args)


def _reachable_functions(t):
    """The Functions of the graph that backward from t would walk (engine internals, test only)."""
    seen, stack = {}, [t._creator]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        stack.extend(p for p in fn._parents if isinstance(p, Function))
    return list(seen.values())


# ----- the engine ------------------------------------------------------------------------------------
def test_gradcheck_through_a_checkpoint_with_closure_leaves_and_constant_arguments():
    """float64 finite differences: x as an input (also used outside), w a listed closure leaf,
    b an unlisted one, a float and an array as constant arguments."""
    rng = np.random.default_rng(0)
    shift = rng.standard_normal(4)

    def model(x, w, b):
        def block(h, power, offset):
            return F.gelu_tanh(h @ w + b) * (h ** power).sum(axis=-1, keepdims=True) + Tensor(offset)
        y = recompute(block, x, 2.0, shift, params=[w])
        return y * x.sum() + x @ w

    assert gradcheck(model, [rng.standard_normal((3, 4)), rng.standard_normal((4, 4)), rng.standard_normal(4)])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_values_and_gradients_equal_those_without_checkpoint(dtype):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(dtype) for s in ((5, 6), (6, 6), (6,))]

    def run(use_checkpoint):
        x, w, b = (Tensor(a, requires_grad=True) for a in arrays)

        def block(h):  # h has three uses inside, w two
            z = F.gelu_tanh(h @ w + b)
            return (z @ w) * h + h

        y = recompute(block, x, params=[w, b]) if use_checkpoint else block(x)
        (y * y).sum().backward()
        return y.data, [t.grad for t in (x, w, b)]

    (y0, g0), (y1, g1) = run(False), run(True)
    np.testing.assert_array_equal(y1, y0)  # the forward is the same computation
    tolerance = dict(rtol=1e-12, atol=0) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
    for ours, plain in zip(g1, g0):
        np.testing.assert_allclose(ours, plain, **tolerance)


def test_fn_runs_once_in_forward_once_in_backward_and_keeps_only_its_inputs():
    rng = np.random.default_rng(2)
    x = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    c = Tensor(rng.standard_normal((3, 4)))  # no gradient wanted
    w = Tensor(rng.standard_normal((4, 4)), requires_grad=True)
    extra = {"scale": 3.0}
    fn = Counted(lambda x, c, extra: F.gelu_tanh(x @ w) * c * extra["scale"] + x * x)
    y = recompute(fn, x, c, extra, params=[w])
    node = y._creator
    assert isinstance(node, Recompute) and len(fn.calls) == 1
    assert fn.recording == [False]  # the forward records no graph inside fn
    assert fn.calls[0][0] is x and fn.calls[0][1] is c and fn.calls[0][2] is extra  # forward: fn(*inputs)
    assert node.args[0] is x.data and node.args[1] is c.data and node.args[2] is extra  # kept: no copies
    assert node._parents == (x, None, None, w)  # x and the listed leaf; c and the dict take no gradient

    gy = rng.standard_normal((3, 4))
    y.backward(gy)
    assert len(fn.calls) == 2 and fn.recording == [False, True]  # the recomputation does
    again = fn.calls[1]
    assert again[0] is not x and again[0].data is x.data and again[0].requires_grad   # detached copy
    assert again[1] is not c and again[1].data is c.data and not again[1].requires_grad
    assert again[2] is extra
    assert c.grad is None
    xp, wp = Tensor(x.data, requires_grad=True), Tensor(w.data, requires_grad=True)
    (F.gelu_tanh(xp @ wp) * c * 3.0 + xp * xp).backward(gy)
    np.testing.assert_allclose(x.grad, xp.grad, rtol=1e-13)
    np.testing.assert_allclose(w.grad, wp.grad, rtol=1e-13)
    assert not hasattr(node, "args") and not hasattr(node, "fn")  # freed like any Function's saved state


def test_second_backward_raises():
    x = Tensor(np.ones(3), requires_grad=True)
    y = recompute(lambda h: (h * h).sum(), x)
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()
    z = recompute(lambda h: h.exp(), x * 2.0).sum()
    z.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        z.backward()


def test_under_no_grad_it_just_calls_fn():
    x = Tensor(np.ones(3), requires_grad=True)
    results = []
    fn = Counted(lambda h: results.append(h * 2.0) or results[-1])
    with no_grad():
        y = recompute(fn, x, params=[x])
    assert y is results[0] and len(fn.calls) == 1 and not y.requires_grad and y._creator is None


def test_backward_called_inside_no_grad_still_recomputes_with_a_graph():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(5)
    x = Tensor(a, requires_grad=True)
    y = recompute(lambda h: (h.exp() * h).sum(), x)
    with no_grad():
        y.backward()
    np.testing.assert_allclose(x.grad, np.exp(a) * (1 + a), rtol=1e-14)


def test_without_any_input_or_param_requiring_grad_fn_runs_as_usual():
    """Nothing upstream wants a gradient: no node; an unlisted closure leaf still gets its gradient."""
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((2, 3)))
    w = Tensor(rng.standard_normal((3, 3)), requires_grad=True)
    y = recompute(lambda h: (h @ w).exp(), x)
    assert y.requires_grad and not isinstance(y._creator, Recompute)
    y.sum().backward()
    np.testing.assert_allclose(w.grad, x.data.T @ np.exp(x.data @ w.data), rtol=1e-13)
    # Nothing at all needs a gradient: a plain call, no graph.
    frozen = recompute(lambda h: h * 2.0, x)
    assert not frozen.requires_grad and frozen._creator is None


def test_fn_that_does_not_compute_the_same_thing_again_is_an_error():
    x = Tensor(np.ones(4), requires_grad=True)
    shapes = iter([(4,), (2, 2)])
    y = recompute(lambda h: h.reshape(*next(shapes)) * 2.0, x)
    with pytest.raises(RuntimeError, match="recomputation gave"):
        y.sum().backward()
    with pytest.raises(TypeError, match="must return one Tensor"):
        recompute(lambda h: (h, h), x)
    with pytest.raises(TypeError, match="leaf Tensors"):
        recompute(lambda h: h, x, params=[x * 2.0])


def test_leaf_hook_fires_once_per_listed_leaf_when_its_gradient_is_final():
    """w is used by two checkpoints and outside them; v only in one; u is an unlisted closure leaf."""
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    w, v, u = (Tensor(rng.standard_normal((3, 3)), requires_grad=True) for _ in range(3))
    names = {id(x): "x", id(w): "w", id(v): "v", id(u): "u"}

    def forward(ckpt):
        h = ckpt(lambda a: F.gelu_tanh(a @ w), x, params=[w])
        h = ckpt(lambda a: F.gelu_tanh(a @ v) @ w + a @ u, h, params=[w, v])
        return ((h @ w) ** 2.0).sum()

    forward(lambda fn, *a, params: fn(*a)).backward()
    plain = {name: t.grad.copy() for name, t in zip("xwvu", (x, w, v, u))}
    for t in (x, w, v, u):
        t.grad = None

    seen = []
    forward(recompute).backward(leaf_hook=lambda leaf: seen.append((names[id(leaf)], leaf.grad.copy())))
    assert sorted(name for name, _ in seen if name != "u") == ["v", "w", "x"]
    final = {"x": x.grad, "w": w.grad, "v": v.grad, "u": u.grad}
    for name, at_hook in seen:  # nothing was added after the hook saw it
        np.testing.assert_array_equal(at_hook, final[name])
    for name in "xwvu":  # u too: the inner backward accumulates into it
        np.testing.assert_allclose(final[name], plain[name], rtol=1e-12)


class _FakeEvent:
    def __init__(self, log):
        self.log, self.done = log, False

    def synchronize(self):
        self.log.append("wait for the GPU")


class _Logged(Function):
    """Identity whose backward writes to a log (to see when the deferred checks are waited on)."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def forward(self, x):
        return x

    def backward(self, gy):
        self.log.append(self.name)
        return gy


@pytest.mark.parametrize("failed", [False, True])
def test_deferred_gpu_checks_wait_for_the_end_of_the_outer_backward(failed):
    """The inner backward must not wait on the GPU (a host sync); the outer one raises at its end."""
    log = []
    x = Tensor(np.ones(3), requires_grad=True)
    h = _Logged(log, "before the checkpoint")(x)
    y = recompute(lambda a: _Logged(log, "inside the checkpoint")(a * 2.0), h)
    backend._deferred.append((_FakeEvent(log), np.array([failed]), lambda: ValueError("bad ids")))
    try:
        if failed:
            with pytest.raises(ValueError, match="bad ids"):
                y.sum().backward()
        else:
            y.sum().backward()
    finally:
        backend._deferred.clear()
    assert log == ["inside the checkpoint", "before the checkpoint", "wait for the GPU"]
    np.testing.assert_array_equal(x.grad, [2.0, 2.0, 2.0])  # every gradient in before the error


# ----- the model ---------------------------------------------------------------------------------------
def _grads(model, ids, targets):
    _, loss = model(ids, targets)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_tiny_gemma3_loss_and_every_gradient_equal_with_recompute(dtype, rtol):
    config = Gemma3Config.tiny()
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 50257, size=(2, 20))  # longer than the sliding window of 8
    targets = rng.integers(0, 50257, size=(2, 20))
    targets[0, 3] = -1
    plain = Gemma3(config, seed=7).to(dtype=dtype)
    ours = Gemma3(config, seed=7, recompute=True).to(dtype=dtype)
    assert ours.recompute and not plain.recompute and ours.config == plain.config
    loss0, grads0 = _grads(plain, ids, targets)
    loss1, grads1 = _grads(ours, ids, targets)
    assert loss1 == pytest.approx(loss0, rel=rtol)
    for name, g in grads0.items():
        assert grads1[name] is not None, name
        np.testing.assert_allclose(grads1[name], g, rtol=rtol, atol=rtol * np.abs(g).max(), err_msg=name)


def test_recompute_keeps_one_array_per_layer_instead_of_the_layers_activations():
    config = Gemma3Config.tiny(vocab_size=256, unpadded_vocab_size=None)
    rng = np.random.default_rng(8)
    ids, targets = rng.integers(0, 256, size=(2, 4, 64))
    measured = {}
    for flag in (False, True):
        model = Gemma3(config, seed=9, recompute=flag)
        gc.collect()
        tracemalloc.start()  # NumPy reports its array allocations to tracemalloc
        try:
            before = tracemalloc.get_traced_memory()[0]
            _, loss = model(ids, targets)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        measured[flag] = (loss, _reachable_functions(loss), kept)

    # One layer's graph alone: how many Functions the plain forward records per layer.
    layer = Gemma3(config, seed=9).model.layers[0]
    per_layer = len(_reachable_functions(layer(Tensor(rng.standard_normal((4, 64, 64)).astype(np.float32),
                                                       requires_grad=True))))
    layers = config.num_hidden_layers
    (_, plain_fns, plain_bytes), (loss, ours_fns, ours_bytes) = measured[False], measured[True]
    assert per_layer > 20
    assert len(ours_fns) == len(plain_fns) - layers * per_layer + layers  # each layer is one node now
    nodes = [fn for fn in ours_fns if isinstance(fn, Recompute)]
    assert len(nodes) == layers
    for node in nodes:  # what a node keeps: the layer's input, nothing else
        arrays = [a for a in vars(node).values() if isinstance(a, np.ndarray)]
        arrays += [a for a in node.args if isinstance(a, np.ndarray)]
        assert [a.shape for a in arrays] == [(4, 64, 64)]
    assert ours_bytes < plain_bytes / 4, (ours_bytes, plain_bytes)
    loss.backward()  # and the graph still differentiates
    assert all(p.grad is not None for p in model.parameters())


def test_hook_reports_every_parameter_once_with_its_final_gradient():
    config = Gemma3Config.tiny(vocab_size=256, unpadded_vocab_size=None)
    ids, targets = np.random.default_rng(10).integers(0, 256, size=(2, 2, 16))
    model = Gemma3(config, seed=11, recompute=True)
    seen = []
    _, loss = model(ids, targets)
    loss.backward(leaf_hook=lambda leaf: seen.append((leaf, leaf.grad.copy())))
    params = model.parameters()
    assert sorted(id(t) for t, _ in seen) == sorted(id(p) for p in params)
    for leaf, at_hook in seen:
        np.testing.assert_array_equal(at_hook, leaf.grad)
    assert id(model.model.embed_tokens.weight) == id(seen[-1][0])  # the embedding is final last


def test_generation_and_no_grad_never_recompute():
    config = Gemma3Config.tiny(vocab_size=256, unpadded_vocab_size=None)
    model = Gemma3(config, seed=12, recompute=True)
    ids = np.random.default_rng(13).integers(0, 256, size=(1, 10))
    with no_grad():
        logits_ng, _ = model(ids)
    model.recompute = False
    logits, _ = model(ids)
    np.testing.assert_array_equal(logits_ng.data, logits.data)
    assert model.model.recompute is False


# ----- data parallelism ------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_with_recompute_equals_without(world):
    """Every bucket still starts during backward, and the summed gradients are the plain ones."""
    config = Gemma3Config.tiny(vocab_size=256, unpadded_vocab_size=None)
    data = [np.random.default_rng(20 + r).integers(0, 256, size=(2, 2, 12)) for r in range(world)]

    def rank_main(comm, recompute):
        model = Gemma3(config, seed=14, recompute=recompute).to(dtype=np.float64)
        dp = DataParallel(model.parameters(), comm, bucket_bytes=60_000)
        launched = []
        real_allreduce = comm.allreduce
        comm.allreduce = lambda array, op="sum": launched.append(array.size) or real_allreduce(array, op)
        ids, targets = data[comm.rank]
        _, loss = model(ids, targets)
        (loss * (1.0 / world)).backward(leaf_hook=dp.leaf_hook)
        during_backward = len(launched)
        dp.finish()
        return during_backward, len(dp.buckets), {n: p.grad.copy() for n, p in model.named_parameters()}

    plain = InProcessGroup(world).run(lambda comm: rank_main(comm, False))
    ours = InProcessGroup(world).run(lambda comm: rank_main(comm, True))
    for (started, buckets, grads), (_, _, expected) in zip(ours, plain):
        assert buckets > 3 and started == buckets  # all of them before finish(), none left for it
        for name, g in expected.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-12, atol=1e-15, err_msg=name)


# ----- GPU: the fast path and CUDA-graph capture -----------------------------------------------------
def _fp16_tiny(recompute, seed):
    model = Gemma3(Gemma3Config.tiny(), seed=seed, recompute=recompute)
    masters = model.state_dict()
    model.to(device="cuda", dtype=np.float16)
    opt = nn.AdamW(model.named_parameters(), lr=1e-3)
    opt.set_masters(masters)
    return model, opt


def _gpu_batches(cp, count, seed):
    ids = np.random.default_rng(seed).integers(0, 50257, size=(count, 4, 33))
    return [(cp.asarray(b[:, :-1].copy()), cp.asarray(b[:, 1:].copy())) for b in ids]


@pytest.mark.gpu
def test_fast_path_fp16_gradients_equal_with_recompute(gpu_xp):
    """fp16 weights, float32 residual stream and norm weights, fused kernels: the same gradients."""
    cp = gpu_xp
    (x, y), = _gpu_batches(cp, 1, seed=15)
    grads = {}
    with fast(True):
        for recompute in (False, True):
            model, _ = _fp16_tiny(recompute, seed=16)
            _, loss = model(x, y)
            (loss * 1024.0).backward()
            grads[recompute] = {n: cp.asnumpy(p.grad).astype(np.float32) for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        assert np.isfinite(grads[True][name]).all(), name
        np.testing.assert_allclose(grads[True][name], g, rtol=0, atol=1e-3 * float(np.abs(g).max()), err_msg=name)


@pytest.mark.gpu
def test_recompute_inside_a_captured_cuda_graph(gpu_xp):
    """Capture fails on any host synchronisation (a read of a GPU value, a copy to the host), so a
    micro-batch with recompute that captures, replays and matches the plain model also shows that
    the recomputation syncs nowhere. Calls: eager warm-up, capture + replay, replay."""
    cp = gpu_xp
    batches = _gpu_batches(cp, 3, seed=18)
    runs = {}
    with fast(True):
        for recompute in (False, True):
            model, opt = _fp16_tiny(recompute, seed=19)
            graphed = nn.GraphedMicroBatch(lambda x, y, w: model(x, y)[1], opt)
            losses = [float(graphed(x, y, 256.0 / len(batches))) for x, y in batches]
            result = opt.step(inv_scale=1 / 256.0, clip_norm=None)
            runs[recompute] = losses, result.grad_norm, result.found_inf
    (plain_losses, plain_norm, plain_inf), (losses, norm, found_inf) = runs[False], runs[True]
    assert not plain_inf and not found_inf
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-3)
    assert norm == pytest.approx(plain_norm, rel=1e-3)
