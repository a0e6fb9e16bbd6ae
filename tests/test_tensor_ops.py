"""Tensor operators and the autograd engine: float64 gradchecks, torch.autograd comparisons,
gradient accumulation, graph freeing and error messages."""
import numpy as np
import pytest

from engine_checks import check_grad, compare_with_torch
from tinygrad3 import Function, Tensor, is_grad_enabled, no_grad

IDX = np.array([0, 2, 2, 1, 0, 2])  # repeated rows: the backward must scatter-add
MASK = np.random.default_rng(7).random((3, 5)) > 0.4


def make(rng, spec):
    """'n' + shape: standard normal; 'p' + shape: in [0.5, 2] (log, pow bases, divisors)."""
    kind, shape = spec
    return rng.standard_normal(shape) if kind == "n" else rng.uniform(0.5, 2.0, shape)


# (name, input specs, ours, torch reference); the same lambda serves both when the syntax agrees.
CASES = [
    ("add_broadcast", [("n", (3, 1, 5)), ("n", (4, 5))], lambda a, b: a + b, None),
    ("add_scalar", [("n", (3, 5))], lambda a: 2.5 + a + 1, None),
    ("sub_broadcast", [("n", (2, 3, 5)), ("n", (3, 1))], lambda a, b: a - b, None),
    ("rsub_scalar", [("n", (7,))], lambda a: 1.5 - a, None),
    ("mul_broadcast", [("n", (5,)), ("n", (3, 5))], lambda a, b: a * b, None),
    ("div_broadcast", [("n", (3, 5)), ("p", (5,))], lambda a, b: a / b, None),
    ("div_both_sides", [("p", (2, 1, 3)), ("p", (4, 1))], lambda a, b: a / b, None),
    ("rdiv_scalar", [("p", (3, 5))], lambda a: 2.0 / a, None),
    ("matmul_2d", [("n", (3, 4)), ("n", (4, 5))], lambda a, b: a @ b, None),
    ("matmul_batched_broadcast", [("n", (2, 1, 3, 4)), ("n", (5, 4, 3))], lambda a, b: a @ b, None),
    ("matmul_vec_mat", [("n", (4,)), ("n", (4, 5))], lambda a, b: a @ b, None),
    ("matmul_mat_vec", [("n", (3, 4)), ("n", (4,))], lambda a, b: a @ b, None),
    ("matmul_vec_vec", [("n", (5,)), ("n", (5,))], lambda a, b: a @ b, None),
    ("matmul_batch_vec", [("n", (2, 3, 4)), ("n", (4,))], lambda a, b: a @ b, None),
    ("matmul_vec_batch", [("n", (4,)), ("n", (2, 4, 3))], lambda a, b: a @ b, None),
    ("pow_int", [("n", (3, 5))], lambda a: a ** 3, None),
    ("pow_float", [("p", (3, 5))], lambda a: a ** 0.5, None),
    ("pow_tensor", [("p", (3, 5)), ("n", (5,))], lambda a, b: a ** b, None),
    ("rpow", [("n", (3, 5))], lambda a: 2.0 ** a, None),
    ("neg", [("n", (3, 5))], lambda a: -a, None),
    ("sum_all", [("n", (2, 3, 5))], lambda a: a.sum(), None),
    ("sum_axis", [("n", (2, 3, 5))], lambda a: a.sum(axis=1), lambda a: a.sum(dim=1)),
    ("sum_neg_axis_keep", [("n", (2, 3, 5))], lambda a: a.sum(axis=-1, keepdims=True),
     lambda a: a.sum(dim=-1, keepdim=True)),
    ("sum_tuple_keep", [("n", (2, 3, 5))], lambda a: a.sum(axis=(0, 2), keepdims=True),
     lambda a: a.sum(dim=(0, 2), keepdim=True)),
    ("mean_all", [("n", (2, 3, 5))], lambda a: a.mean(), None),
    ("mean_axis", [("n", (2, 3, 5))], lambda a: a.mean(axis=0), lambda a: a.mean(dim=0)),
    ("mean_tuple", [("n", (2, 3, 5))], lambda a: a.mean(axis=(1, 2)), lambda a: a.mean(dim=(1, 2))),
    ("mean_keep", [("n", (2, 3, 5))], lambda a: a.mean(axis=-2, keepdims=True),
     lambda a: a.mean(dim=-2, keepdim=True)),
    ("max_all", [("n", (2, 3, 5))], lambda a: a.max(), lambda a: a.amax()),
    ("max_axis", [("n", (2, 3, 5))], lambda a: a.max(axis=1), lambda a: a.amax(dim=1)),
    ("max_tuple_keep", [("n", (2, 3, 5))], lambda a: a.max(axis=(0, 2), keepdims=True),
     lambda a: a.amax(dim=(0, 2), keepdim=True)),
    ("reshape", [("n", (2, 3, 5))], lambda a: a.reshape(6, 5) * 1.0, None),
    ("reshape_tuple_infer", [("n", (2, 3, 5))], lambda a: a.reshape((3, -1)), lambda a: a.reshape(3, -1)),
    ("transpose_default", [("n", (2, 3, 5))], lambda a: a.transpose(), lambda a: a.permute(2, 1, 0)),
    ("transpose_axes", [("n", (2, 3, 5))], lambda a: a.transpose(1, 0, 2), lambda a: a.permute(1, 0, 2)),
    ("T", [("n", (3, 5))], lambda a: a.T, None),
    ("exp", [("n", (3, 5))], lambda a: a.exp(), None),
    ("log", [("p", (3, 5))], lambda a: a.log(), None),
    ("getitem_slice", [("n", (4, 5))], lambda a: a[1:3], None),
    ("getitem_step_int", [("n", (5, 5))], lambda a: a[::2, 1], None),
    ("getitem_negative", [("n", (4, 5))], lambda a: a[-1, -3:], None),
    ("getitem_int_array_repeats", [("n", (3, 5))], lambda a: a[IDX], lambda a: a[IDX.tolist()]),
    ("getitem_int_array_and_slice", [("n", (3, 5))], lambda a: a[IDX, 1:4], lambda a: a[IDX.tolist(), 1:4]),
    ("getitem_columns_repeats", [("n", (3, 5))], lambda a: a[:, np.array([4, 1, 4])], lambda a: a[:, [4, 1, 4]]),
    ("getitem_bool_mask", [("n", (3, 5))], lambda a: a[MASK], None),
]


def _case(name):
    return next(c for c in CASES if c[0] == name)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_op_gradcheck(xp, name, rng):
    _, specs, ours, _ = _case(name)
    if "bool_mask" in name:  # on the GPU the mask must live there too
        ours = (lambda m: (lambda a: a[m]))(xp.asarray(MASK))
    check_grad(xp, ours, [make(rng, s) for s in specs])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_op_matches_torch(xp, torch, name, rng):
    _, specs, ours, theirs = _case(name)
    if "bool_mask" in name:
        ours, theirs = (lambda m: (lambda a: a[m]))(xp.asarray(MASK)), (lambda a: a[torch.as_tensor(MASK)])
    compare_with_torch(torch, xp, ours, theirs or ours, [make(rng, s) for s in specs])


def _broadcast_pair(rng):
    """Two random shapes (odd sizes included) that broadcast against each other."""
    full = tuple(int(n) for n in rng.choice([1, 2, 3, 5], size=rng.integers(1, 4)))
    other = tuple(1 if rng.random() < 0.4 else n for n in full)[rng.integers(0, len(full)):]
    return (full, other) if rng.random() < 0.5 else (other, full)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow"])
def test_binary_random_broadcast(xp, torch, op, seed):
    rng = np.random.default_rng(seed)
    sa, sb = _broadcast_pair(rng)
    fn = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "div": lambda a, b: a / b, "pow": lambda a, b: a ** b}[op]
    a = rng.uniform(0.5, 2.0, sa) if op == "pow" else rng.standard_normal(sa)
    b = rng.uniform(0.5, 2.0, sb) if op == "div" else rng.standard_normal(sb)
    check_grad(xp, fn, [a, b])
    compare_with_torch(torch, xp, fn, fn, [a, b])


def test_max_ties_share_gradient(xp, torch):
    x = np.array([[1.0, 3.0, 3.0], [2.0, -1.0, 0.5]])
    compare_with_torch(torch, xp, lambda a: a.max(axis=1), lambda a: a.amax(dim=1), [x])
    t = Tensor(xp.asarray(x), requires_grad=True)
    t.max().backward()
    np.testing.assert_array_equal(Tensor(t.grad).numpy(), [[0, 0.5, 0.5], [0, 0, 0]])


# Rows with three, four and two tied maxima (and, for the full reduction, a 4 tied across rows).
TIES = np.array([[1.0, 3.0, 3.0, 3.0, -2.0],
                 [2.0, 2.0, 2.0, 2.0, 0.5],
                 [0.0, 4.0, -1.0, 4.0, 1.0]])


def test_max_three_and_four_ties_split_evenly_as_torch_amax(xp, torch):
    """k tied maxima get 1/k each (not the 1/2 an average of one-sided derivatives would give),
    as torch.amax and torch's full max(); over rows, over a tuple of axes and over everything."""
    compare_with_torch(torch, xp, lambda a: a.max(axis=1), lambda a: a.amax(dim=1), [TIES])
    compare_with_torch(torch, xp, lambda a: a.max(), lambda a: a.max(), [TIES])
    cube = np.stack([TIES, TIES[::-1], np.full_like(TIES, -5.0)])  # ties across the reduced axes 0 and 2
    compare_with_torch(torch, xp, lambda a: a.max(axis=(0, 2)), lambda a: a.amax(dim=(0, 2)), [cube])
    t = Tensor(xp.asarray(TIES), requires_grad=True)
    t.max(axis=1).sum().backward()
    third, quarter = 1 / 3, 1 / 4
    np.testing.assert_array_equal(Tensor(t.grad).numpy(), [[0, third, third, third, 0],
                                                           [quarter, quarter, quarter, quarter, 0],
                                                           [0, 0.5, 0, 0.5, 0]])


def test_max_gradient_at_ties_against_finite_differences():
    """At a tie the max has no derivative, so finite differences cannot check the gradient entry
    by entry: along one tied coordinate the difference quotient is 1 from the right, 0 from the
    left. What they can check, with the rows' max f (piecewise linear, so the quotients are exact
    up to rounding):
      * along a direction d that is equal on each row's tied entries, f is linear near the tie
        (the tied entries move together and stay the maximum): the central difference must
        equal g . d, which 1/k per tie gives (1/2 each would give k/2 times too much);
      * along any d, the right quotient is the largest d_i over the ties, and g, a subgradient
        of the convex f, satisfies g . d <= it (and >= minus the left quotient).
    """
    rng = np.random.default_rng(0)
    t = Tensor(TIES, requires_grad=True)
    t.max(axis=1).sum().backward()
    f = lambda a: a.max(axis=1).sum()  # noqa: E731
    tied, h = TIES == TIES.max(axis=1, keepdims=True), 1e-6
    for _ in range(20):
        d = rng.standard_normal(TIES.shape)
        along = np.where(tied, rng.standard_normal((3, 1)), d)  # one value per row on its ties
        central = (f(TIES + h * along) - f(TIES - h * along)) / (2 * h)
        assert central == pytest.approx(np.sum(t.grad * along), rel=1e-8, abs=1e-9)
        right, left = (f(TIES + h * d) - f(TIES)) / h, (f(TIES) - f(TIES - h * d)) / h
        assert left - 1e-8 <= np.sum(t.grad * d) <= right + 1e-8
        assert right == pytest.approx(np.where(tied, d, -np.inf).max(axis=1).sum(), rel=1e-8, abs=1e-9)


# ----- the engine -----------------------------------------------------------------------

def leaf(xp, rng, *shape, dtype=np.float64):
    return Tensor(xp.asarray(rng.standard_normal(shape).astype(dtype)), requires_grad=True)


def test_gradient_accumulates_over_uses(xp, rng):
    x = leaf(xp, rng, 4)
    (x * x).sum().backward()
    np.testing.assert_allclose(Tensor(x.grad).numpy(), 2 * x.numpy())

    y = leaf(xp, rng, 4)
    (y + y).sum().backward()
    np.testing.assert_allclose(Tensor(y.grad).numpy(), np.full(4, 2.0))

    z = leaf(xp, rng, 3, 2)
    e = z.exp()  # one intermediate feeding two consumers
    ((e * z).sum() + e.sum()).backward()
    zn = z.numpy()
    np.testing.assert_allclose(Tensor(z.grad).numpy(), np.exp(zn) * zn + 2 * np.exp(zn))


def test_diamond_graph_and_repeated_backward_accumulate(xp, rng):
    x = leaf(xp, rng, 3)
    a = x * 2
    (a + a * 3).sum().backward()  # d/dx (2x + 6x) = 8
    np.testing.assert_allclose(Tensor(x.grad).numpy(), np.full(3, 8.0))
    (x * 5).sum().backward()  # a second graph adds into the same .grad
    np.testing.assert_allclose(Tensor(x.grad).numpy(), np.full(3, 13.0))


def test_no_grad_builds_no_graph(xp, rng):
    x = leaf(xp, rng, 3)
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2).exp().sum()
    assert is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


class Saving(Function):
    """y = 3 a, saving an array for the backward and a private note that survives it."""

    def forward(self, a):
        self.saved = a * 1.0
        self._note = "kept"
        return 3 * a

    def backward(self, gy):
        assert self.saved is not None
        return 3 * gy


def test_backward_frees_saved_arrays_and_graph(xp, rng):
    x = leaf(xp, rng, 4)
    fn = Saving()
    y = fn(x)
    square = y * y
    mul, loss = square._creator, square.sum()
    assert hasattr(fn, "saved") and hasattr(mul, "a")
    loss.backward()
    assert not hasattr(fn, "saved") and not hasattr(mul, "a") and not hasattr(mul, "b")
    assert fn._note == "kept"  # underscore attributes are not freed
    np.testing.assert_allclose(Tensor(x.grad).numpy(), 18 * x.numpy())
    with pytest.raises(RuntimeError, match="already freed"):
        loss.backward()


def test_function_without_grad_releases_at_once(xp, rng):
    fn = Saving()
    y = fn(Tensor(xp.asarray(rng.standard_normal(3))))
    assert not y.requires_grad and not hasattr(fn, "saved")


def test_detach_cuts_the_graph(xp, rng):
    x = leaf(xp, rng, 3)
    d = (x * 2).detach()
    assert not d.requires_grad and d.is_leaf
    (d * x).sum().backward()  # d is a constant: the gradient is d, not 4x
    np.testing.assert_allclose(Tensor(x.grad).numpy(), 2 * x.numpy())


def test_astype_casts_gradient_back(xp, rng):
    x = leaf(xp, rng, 5, dtype=np.float32)
    w = rng.standard_normal(5)
    y = x.astype(np.float64)
    assert y.dtype == np.float64
    (y * Tensor(xp.asarray(w))).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(Tensor(x.grad).numpy(), w.astype(np.float32))

    z = leaf(xp, rng, 5)
    h = z.astype(np.float16)
    (h * h).astype(np.float32).sum().backward()
    assert z.grad.dtype == np.float64
    np.testing.assert_allclose(Tensor(z.grad).numpy(), 2 * z.numpy(), rtol=2e-3)


def test_numpy_returns_host_copy(xp, rng):
    host = rng.standard_normal((2, 3))
    t = Tensor(xp.asarray(host))
    out = t.numpy()
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, host)
    out[0, 0] = 123.0
    assert t.numpy()[0, 0] == host[0, 0]


def test_scalar_backward_defaults_to_one(xp, rng):
    x = leaf(xp, rng, 3)
    (x * x).sum().backward()
    np.testing.assert_allclose(Tensor(x.grad).numpy(), 2 * x.numpy())
    y = leaf(xp, rng, 1, 1)
    (y * 4).backward()  # one element, any shape
    np.testing.assert_allclose(Tensor(y.grad).numpy(), [[4.0]])


def test_clear_errors(xp, rng):
    x = leaf(xp, rng, 3)
    with pytest.raises(RuntimeError, match="explicit gradient"):
        (x * 2).backward()
    with pytest.raises(ValueError, match="does not match"):
        (x * 2).backward(xp.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(xp.asarray([1, 2, 3]), requires_grad=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(xp.asarray([1.0, 2.0])).sum().backward()


def test_gradient_keeps_each_tensors_dtype_across_a_mixed_add():
    """fp16 branch + fp32 sum: the sum's fp32 gradient reaches the branch as fp16."""
    import tinygrad3 as tg
    rng = np.random.default_rng(5)
    w = tg.Tensor(rng.standard_normal(4).astype(np.float16), requires_grad=True)
    base = tg.Tensor(rng.standard_normal(4).astype(np.float32), requires_grad=True)
    branch = w * 2.0                      # fp16, not a leaf
    seen = {}

    class Spy(tg.Function):
        def forward(self, x):
            return x

        def backward(self, gy):
            seen["dtype"] = gy.dtype
            return gy

    total = (base + Spy()(branch)).sum()  # promoted to fp32
    total.backward()
    assert total.dtype == np.float32 and seen["dtype"] == np.float16
    assert w.grad.dtype == np.float16 and base.grad.dtype == np.float32
    np.testing.assert_array_equal(w.grad, np.full(4, 2.0, np.float16))
