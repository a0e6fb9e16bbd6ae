"""Tensor.backward against a textbook reverse loop over the same recorded graph, bit for bit.

`textbook_backward` below is reverse-mode differentiation with nothing but the chain rule: order
the Functions, hand each the sum of its output's gradients, call its backward, add what it returns
to each input's sum as a new array, free what it saved. It offers no in-place targets, keeps no
ownership, no gradient buffers, no hooks. The engine (Tensor.backward with grad_sum.InPlaceSums)
adds the same terms in the same order, some of them in place (t += p rounds as t + p), so every
gradient must have the same bits: float64 and float32, on the tiny Gemma 3 and on seeded random
graphs that reuse values (x * x, one value feeding many ops), broadcast, cast, gather and reduce.
NumPy only: on CuPy scatter-adds (cupy.add.at, the embedding kernel) use atomics, whose order
varies between runs, so two runs of one graph need not agree in their last bits.
"""
import numpy as np
import pytest

import tinygrad3.functional as F
from tinygrad3 import ADDED, Function, Tensor, tensor
from tinygrad3.grad_sum import InPlaceSums


def post_order(root):
    """Functions reachable from root, each after every Function it consumes: depth first, inputs
    taken last to first (the engine's order, so sums of three or more terms round alike)."""
    order, seen, stack = [], {root}, [(root, iter(reversed(root._parents)))]
    while stack:
        fn, inputs = stack[-1]
        nxt = next((p for p in inputs if isinstance(p, Function) and p not in seen), None)
        if nxt is None:
            order.append(stack.pop()[0])
        else:
            seen.add(nxt)
            stack.append((nxt, iter(reversed(nxt._parents))))
    return order


def textbook_backward(loss):
    """d(loss)/d(leaf) into every leaf's .grad (loss: a one-element Tensor made by a Function)."""
    grads = {loss._creator: np.ones_like(loss.data)}  # dL/dL = 1
    for fn in reversed(post_order(loss._creator)):    # every consumer of fn's output before fn
        gy = grads.pop(fn, None)                      # dL/d(fn's output), summed over its uses
        if gy is not None:
            out = fn.backward(gy)                     # the chain rule: dL/d(each input)
            for parent, g in zip(fn._parents, out if isinstance(out, tuple) else (out,)):
                if parent is None or g is None:       # a constant input, or no gradient
                    continue
                dtype = parent.dtype if isinstance(parent, Tensor) else parent._out_dtype
                g = g.astype(dtype, copy=False)       # a gradient has its value's dtype
                if isinstance(parent, Tensor):
                    parent.grad = g if parent.grad is None else parent.grad + g
                else:
                    grads[parent] = g if parent not in grads else grads[parent] + g
        fn._release()                                 # free what fn saved for its backward


def assert_same_bits(got, expected, name):
    assert (got is None) == (expected is None), name
    if expected is not None:
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name, strict=True)


def spy_sums(monkeypatch):
    """Counts of what the engine's accumulator did: targets offered, contributions ADDED in place."""
    seen = {"offered": 0, "added": 0}
    target, add = InPlaceSums.target, InPlaceSums.add

    def spy_target(self, parent):
        t = target(self, parent)
        seen["offered"] += t is not None
        return t

    def spy_add(self, parent, g):
        seen["added"] += parent is not None and g is ADDED
        return add(self, parent, g)

    monkeypatch.setattr(InPlaceSums, "target", spy_target)
    monkeypatch.setattr(InPlaceSums, "add", spy_add)
    return seen


# ----- the tiny Gemma 3 --------------------------------------------------------------------

def gemma_and_loss(dtype, fused_head):
    from models import Gemma3, Gemma3Config
    model = Gemma3(Gemma3Config.tiny(), seed=0)
    model.to(dtype=dtype)
    ids = np.random.default_rng(3).integers(0, 300, (2, 11))
    return model, lambda: model(ids[:, :-1], ids[:, 1:], return_logits=not fused_head)[1]


@pytest.mark.parametrize("fused_head", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tiny_gemma3_every_gradient_equals_the_textbook_loop(dtype, fused_head, monkeypatch):
    """Every parameter's gradient from Tensor.backward has the textbook loop's bits; the engine did
    sum in place on the way (q, k and v read one input), so the speed machinery was exercised."""
    model, loss_fn = gemma_and_loss(dtype, fused_head)
    seen = spy_sums(monkeypatch)
    loss = loss_fn()
    loss.backward()
    engine = {name: p.grad for name, p in model.named_parameters()}
    assert seen["added"] > 0 and seen["offered"] >= seen["added"]
    for p in model.parameters():
        p.grad = None
    again = loss_fn()
    assert again.item() == loss.item()
    textbook_backward(again)
    for name, p in model.named_parameters():
        assert engine[name] is not None, name
        assert_same_bits(engine[name], p.grad, name)


def test_the_textbook_order_is_the_engines():
    """post_order visits the recorded graph as the engine's topological sort does (a different
    valid order would add three or more terms in another order, and round differently)."""
    _, loss_fn = gemma_and_loss(np.float64, False)
    root = loss_fn()._creator
    assert post_order(root) == tensor._topological_order(root)
    for seed in range(10):
        root = random_graph(seed, np.float64)[0]._creator
        assert post_order(root) == tensor._topological_order(root)


# ----- random graphs -----------------------------------------------------------------------

N, D, V = 4, 3, 5
SHAPES = [(N, D), (1, D), (N, 1), (D,), (D, D)]
ROWS, IDS = np.array([0, 2, 2, 1]), np.array([1, 4, 1, 0])  # repeats: backwards that scatter-add


def _fit(a, b):
    """Do a and b broadcast to one of SHAPES?"""
    try:
        return np.broadcast_shapes(a.shape, b.shape) in SHAPES
    except ValueError:
        return False


def _binary(rng, pick, op):
    a = pick()
    b = a if rng.random() < 0.2 else pick()  # x op x: one tensor in both slots
    if not _fit(a, b):
        return None
    return {"add": a + b, "sub": a - b, "mul": a * b, "div": a / (b * b + 1.0)}[op]


def _reduce(rng, pick, op):
    a = pick()
    if a.ndim != 2 or a.shape[1] != D:
        return None
    axis, keep = (0, bool(rng.random() < 0.5)) if a.shape[0] == D or rng.random() < 0.5 else (1, True)
    return getattr(a, op)(axis=axis, keepdims=keep)


# Linear adds into the engine's targets (its input's gradient into the sum of that input's other
# uses): it comes up four times as often as the others, "qkv" reads one value by three of them,
# and "share" builds what the ownership rules are about (an array passed on to two inputs).
OPS = ["add", "sub", "mul", "div", "matmul", "sum", "mean", "max", "exp", "log", "pow", "cast", "mixed",
       "shift", "transpose", "gather", "embedding", "rms_norm", "reshape", "softmax", "qkv", "share"] + ["linear"] * 4


def _random_op(rng, pick, leaves_of, table, dtype):
    """One op (or a few, returned as a list) on values picked from the pool, or None when the
    picked shapes do not fit."""
    op = rng.choice(OPS)
    if op in ("add", "sub", "mul", "div"):
        return _binary(rng, pick, op)
    if op in ("sum", "mean", "max"):
        return _reduce(rng, pick, op)
    a = pick()
    square = leaves_of((D, D))
    if op in ("matmul", "linear", "qkv", "share") and (a.ndim != 2 or a.shape[1] != D):
        return None
    if op in ("matmul", "linear"):
        return a @ square if op == "matmul" else F.linear(a, square)
    if op == "qkv":
        q, k, v = (F.linear(a, leaves_of((D, D))) for _ in range(3))
        return q * k + v
    if op == "share":  # s's Add hands one array to u and to w; u passes it on to h, which `first` reads
        h, w = F.linear(a, square), F.linear(a, leaves_of((D, D)))
        first = F.linear(h, leaves_of((D, D)))
        u = h + 0.5
        s = u + w
        if rng.random() < 0.5:  # the walk: s's Add, u's, first (adding into h's sum), w * 1.5, w's Linear
            return (s + first) + w * 1.5
        return [first, s, F.linear(s, leaves_of((D, D))) + s]
    if op == "mixed":  # a product in the wider dtype: one input's gradient is cast to its narrower one
        other, b = np.float32 if dtype == np.float64 else np.float64, pick()
        return (a.astype(other) * b).astype(dtype) if _fit(a, b) else None
    if op == "shift":  # an Add with a constant: it passes its gradient on unchanged
        return a + 0.5
    if op == "exp":
        return (a * 0.3).exp()
    if op == "log":
        return (a * a + 1.0).log()
    if op == "pow":
        return (a * 0.5) ** 2
    if op == "cast":  # a branch in the other float dtype, and back
        return a.astype(np.float32 if dtype == np.float64 else np.float64).astype(dtype)
    if op == "transpose":
        return a.T if a.shape == (D, D) else None
    if op == "gather":
        return a[ROWS] if a.shape == (N, D) else None
    if op == "embedding":
        return F.embedding(IDS, table)
    if op == "rms_norm":
        return F.rms_norm(a, leaves_of((D,))) if a.ndim == 2 and a.shape[1] == D else None
    if op == "reshape":
        return a.reshape(-1).reshape(a.shape)
    return F.softmax(a, axis=-1) if a.ndim == 2 else None


def random_graph(seed, dtype, steps=30):
    """(loss, leaves): a seeded graph of `steps` ops over leaves of broadcast-compatible shapes;
    every value stays in the pool, so later ops reuse it (recent values more often)."""
    rng = np.random.default_rng(seed)
    leaves = [Tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in SHAPES for _ in range(2)]
    table = Tensor(rng.standard_normal((V, D)).astype(dtype), requires_grad=True)
    pool = list(leaves)

    def pick():
        return pool[int(len(pool) * rng.random() ** 0.5)]

    def leaves_of(shape):
        return leaves[SHAPES.index(shape) * 2 + int(rng.integers(2))]

    while len(pool) < len(leaves) + steps:
        out = _random_op(rng, pick, leaves_of, table, dtype)
        pool.extend([] if out is None else out if isinstance(out, list) else [out])
    terms = [pool[i] for i in rng.choice(len(pool), size=5)] + pool[-3:]  # fan-in: many uses end here
    loss = sum((t * float(rng.uniform(0.5, 1.5))).sum() for t in terms)
    return loss, leaves + [table]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(40))
def test_random_graphs_equal_the_textbook_loop(seed, dtype):
    loss, leaves = random_graph(seed, dtype)
    loss.backward()
    loss_again, leaves_again = random_graph(seed, dtype)
    assert loss_again.item() == loss.item()
    textbook_backward(loss_again)
    for i, (engine, plain) in enumerate(zip(leaves, leaves_again)):
        assert_same_bits(engine.grad, plain.grad, f"leaf {i}")
        assert engine.grad is None or np.isfinite(engine.grad).all(), f"leaf {i}"


def test_random_graphs_exercise_the_speed_machinery(monkeypatch):
    """Over the seeds the engine takes in-place sums (so the bitwise comparison covers the ownership
    rules), and every leaf, of every shape and the embedding table, gets a gradient in some graph."""
    seen = spy_sums(monkeypatch)
    reached = np.zeros(len(SHAPES) * 2 + 1, bool)
    for seed in range(40):
        loss, leaves = random_graph(seed, np.float64)
        loss.backward()
        reached |= [leaf.grad is not None for leaf in leaves]
    assert seen["added"] >= 20 and seen["offered"] >= seen["added"], seen
    assert reached.all(), reached
