"""Check a hand-written backward against central finite differences in float64.

The function's output is reduced to a scalar L = sum(out * w) with a fixed random w,
so every element of the output's gradient is exercised. For each floating input x the
backward gives g = dL/dx; finite differences give

    dL/dx . d  ~=  (L(x + eps d) - L(x - eps d)) / (2 eps)     (error O(eps^2))

Small inputs are checked along every coordinate direction d = e_i; large ones along a
few random directions perturbing all inputs at once (two forwards per direction), which
catches any wrong entry of g with probability 1 while staying cheap for a full layer.
A failing random direction is narrowed down by bisection (first to one input, then to
one coordinate), so every failure names the input, the coordinate and both values.
"""
import numpy as np

from . import backend
from .tensor import Tensor, no_grad


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, directions=8, max_full=512, seed=0):
    """Raise AssertionError unless fn's backward matches finite differences; return True.

    fn: Tensors -> Tensor. inputs: Tensors or arrays; floating ones are promoted to float64
    and checked, the rest (ids, targets) are passed through unchanged.
    """
    rng = np.random.default_rng(seed)
    arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
    xp = backend.get_array_module(*[a for a in arrays if hasattr(a, "dtype")])
    checked = [hasattr(a, "dtype") and a.dtype.kind == "f" for a in arrays]
    arrays = [xp.ascontiguousarray(a.astype(xp.float64)) if c else a for a, c in zip(arrays, checked)]

    tensors = [Tensor(a, requires_grad=True) if c else a for a, c in zip(arrays, checked)]
    out = fn(*tensors)
    if out.dtype != np.float64:
        raise AssertionError(f"gradcheck needs a float64 output, got {out.dtype}")
    w = xp.asarray(rng.standard_normal(out.shape))
    out.backward(w)
    analytic = [t.grad if c and t.grad is not None else (xp.zeros_like(a) if c else None)
                for t, a, c in zip(tensors, arrays, checked)]
    for i, (g, a, c) in enumerate(zip(analytic, arrays, checked)):
        if c and g.shape != a.shape:
            raise AssertionError(f"gradient mismatch in input {i}: backward gives shape {g.shape}, "
                                 f"the input has shape {a.shape}")

    def objective(values):
        with no_grad():
            return float((fn(*[Tensor(v) if c else v for v, c in zip(values, checked)]).data * w).sum())

    def compare(d):
        """(backward, finite differences, within tolerance) along the direction d."""
        plus = [a + eps * di if c else a for a, di, c in zip(arrays, d, checked)]
        minus = [a - eps * di if c else a for a, di, c in zip(arrays, d, checked)]
        numeric = (objective(plus) - objective(minus)) / (2 * eps)
        exact = float(sum(float((g * di).sum()) for g, di, c in zip(analytic, d, checked) if c))
        return exact, numeric, abs(numeric - exact) <= atol + rtol * abs(numeric)

    def restrict(d, i, lo, hi):
        """d's entries lo:hi (flat) of input i, zero elsewhere."""
        part = [xp.zeros(a.shape) if c else None for a, c in zip(arrays, checked)]
        part[i].reshape(-1)[lo:hi] = d[i].reshape(-1)[lo:hi]
        return part

    def report(i, j, exact, numeric, along=""):
        coord = tuple(int(k) for k in np.unravel_index(j, arrays[i].shape))
        raise AssertionError(f"gradient mismatch in input {i} at coordinate {coord}: backward gives "
                             f"{exact:.10g}, finite differences give {numeric:.10g} "
                             f"(|diff| {abs(numeric - exact):.3g}){along}")

    def locate(d, exact, numeric):
        """Bisect a failing direction down to one coordinate of one input, then report it."""
        along = (f"; found from a random direction along which backward gives {exact:.10g}, "
                 f"finite differences give {numeric:.10g}")
        gap = lambda r: abs(r[1] - r[0])  # noqa: E731
        i = max((k for k, c in enumerate(checked) if c),
                key=lambda k: gap(compare(restrict(d, k, 0, arrays[k].size))))
        lo, hi = 0, arrays[i].size
        while hi - lo > 1:
            mid = (lo + hi) // 2
            left, right = compare(restrict(d, i, lo, mid)), compare(restrict(d, i, mid, hi))
            lo, hi = (lo, mid) if gap(left) >= gap(right) else (mid, hi)
        unit = restrict([xp.ones(a.shape) if c else None for a, c in zip(arrays, checked)], i, lo, hi)
        unit_exact, unit_numeric, unit_ok = compare(unit)
        if unit_ok:
            along += " (each coordinate alone is within the tolerance: the error is spread over many)"
        report(i, lo, unit_exact, unit_numeric, along)

    total = sum(int(a.size) for a, c in zip(arrays, checked) if c)
    if total <= max_full:
        ones = [xp.ones(a.shape) if c else None for a, c in zip(arrays, checked)]
        for i, (a, c) in enumerate(zip(arrays, checked)):
            for j in range(a.size if c else 0):
                exact, numeric, ok = compare(restrict(ones, i, j, j + 1))
                if not ok:
                    report(i, j, exact, numeric)
    else:
        for _ in range(directions):
            d = [xp.asarray(rng.standard_normal(a.shape)) if c else None for a, c in zip(arrays, checked)]
            exact, numeric, ok = compare(d)
            if not ok:
                locate(d, exact, numeric)
    return True
