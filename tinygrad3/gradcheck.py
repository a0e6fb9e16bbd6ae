"""Check a hand-written backward against central finite differences in float64.

The function's output is reduced to a scalar L = sum(out * w) with a fixed random w,
so every element of the output's gradient is exercised. For each floating input x the
backward gives g = dL/dx; finite differences give

    dL/dx . d  ~=  (L(x + eps d) - L(x - eps d)) / (2 eps)     (error O(eps^2))

Small inputs are checked along every coordinate direction d = e_i; large ones along a
few random directions perturbing all inputs at once (two forwards per direction), which
catches any wrong entry of g with probability 1 while staying cheap for a full layer.
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
    arrays = [a.astype(xp.float64) if c else a for a, c in zip(arrays, checked)]

    tensors = [Tensor(a, requires_grad=True) if c else a for a, c in zip(arrays, checked)]
    out = fn(*tensors)
    if out.dtype != np.float64:
        raise AssertionError(f"gradcheck needs a float64 output, got {out.dtype}")
    w = xp.asarray(rng.standard_normal(out.shape))
    out.backward(w)
    analytic = [t.grad if c and t.grad is not None else (xp.zeros_like(a) if c else None)
                for t, a, c in zip(tensors, arrays, checked)]

    def objective(values):
        with no_grad():
            return float((fn(*[Tensor(v) if c else v for v, c in zip(values, checked)]).data * w).sum())

    total = sum(int(a.size) for a, c in zip(arrays, checked) if c)
    if total <= max_full:
        probes = []
        for i, (a, c) in enumerate(zip(arrays, checked)):
            if c:
                for j in range(a.size):
                    d = [xp.zeros_like(b) if cc else None for b, cc in zip(arrays, checked)]
                    d[i].reshape(-1)[j] = 1.0
                    probes.append(d)
    else:
        probes = [[xp.asarray(rng.standard_normal(a.shape)) if c else None for a, c in zip(arrays, checked)]
                  for _ in range(directions)]

    for d in probes:
        plus = [a + eps * di if c else a for a, di, c in zip(arrays, d, checked)]
        minus = [a - eps * di if c else a for a, di, c in zip(arrays, d, checked)]
        numeric = (objective(plus) - objective(minus)) / (2 * eps)
        exact = float(sum(float((g * di).sum()) for g, di, c in zip(analytic, d, checked) if c))
        if not abs(numeric - exact) <= atol + rtol * abs(numeric):
            raise AssertionError(f"gradient mismatch along a probe direction: backward gives {exact:.10g}, "
                                 f"finite differences give {numeric:.10g} (|diff| {abs(numeric - exact):.3g})")
    return True
