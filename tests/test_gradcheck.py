"""gradcheck must be able to fail: a wrong backward raises AssertionError in both modes.

The planted mistakes cover the ways a weakened gradcheck would let a backward through:
a wrong sign (a check comparing absolute values), a backward right only when the upstream
gradient is all ones (a check using ones instead of a random upstream gradient), a small
factor (a tolerance that cannot fail) and a single wrong coordinate.
"""
import re

import numpy as np
import pytest

from tinygrad3 import Function, Tensor, gradcheck


class Square(Function):
    """y = x^2 with a correct backward, or with a planted mistake."""

    def __init__(self, mistake=None):
        self.mistake = mistake

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, gy):
        g = 2 * gy * self.x
        if self.mistake == "factor":  # forgets the 2 from d(x^2)/dx = 2x
            g = gy * self.x
        elif self.mistake == "small_factor":  # 0.1% too large
            g = 1.001 * g
        elif self.mistake == "sign":  # right magnitude, wrong sign
            g = -g
        elif self.mistake == "ignores_gy":  # right only for an all-ones upstream gradient
            g = 2 * self.x
        elif self.mistake == "mean_gy":  # uses the upstream gradient's mean: also right for all ones
            g = 2 * gy.mean() * self.x
        elif self.mistake == "one_entry":  # wrong in a single element only
            g = g.copy()
            g.reshape(-1)[-1] *= 1.5
        return g


class Product(Function):
    """y = a b whose backward forgets b's gradient."""

    def forward(self, a, b):
        self.b = b
        return a * b

    def backward(self, gy):
        return gy * self.b, None


FULL = dict(max_full=10_000)     # every coordinate direction
RANDOM = dict(max_full=0, directions=4)  # random directions only


@pytest.mark.parametrize("mode", [FULL, RANDOM], ids=["full", "random"])
def test_correct_backward_passes(xp, rng, mode):
    assert gradcheck(lambda x: Square()(x), [xp.asarray(rng.standard_normal((3, 4)))], **mode) is True


@pytest.mark.parametrize("mode", [FULL, RANDOM], ids=["full", "random"])
@pytest.mark.parametrize("mistake", ["factor", "small_factor", "sign", "ignores_gy", "mean_gy", "one_entry"])
def test_wrong_backward_fails(xp, rng, mode, mistake):
    with pytest.raises(AssertionError, match="gradient mismatch"):
        gradcheck(lambda x: Square(mistake)(x), [xp.asarray(rng.standard_normal((3, 4)))], **mode)


class ScaleOne(Function):
    """y = a * b (elementwise) whose gradient for b is wrong at one coordinate (factor 1.5)."""

    def __init__(self, coord):
        self.coord = coord

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        gb = gy * self.a
        gb[self.coord] *= 1.5
        return gy * self.b, gb


def _numbers(message):
    found = re.search(r"input (\d+) at coordinate \(([\d, ]+)\): backward gives (\S+), "
                      r"finite differences give (\S+) ", message)
    assert found, message
    index, coord, backward, numeric = found.groups()
    return int(index), tuple(int(c) for c in coord.split(",")), float(backward), float(numeric)


@pytest.mark.parametrize("mode", [FULL, RANDOM], ids=["full", "random"])
def test_failure_names_the_input_the_coordinate_and_both_values(xp, rng, mode):
    """Both modes (random directions by bisection) point at input 1, coordinate (2, 3)."""
    a, b = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    with pytest.raises(AssertionError) as failure:
        gradcheck(lambda a, b: ScaleOne((2, 3))(a, b), [xp.asarray(a), xp.asarray(b)], **mode)
    index, coord, backward, numeric = _numbers(str(failure.value))
    assert (index, coord) == (1, (2, 3))
    w = np.random.default_rng(0).standard_normal((3, 5))  # gradcheck's upstream gradient (seed 0)
    true = w[2, 3] * a[2, 3]
    np.testing.assert_allclose([backward, numeric], [1.5 * true, true], rtol=1e-7)


def test_bisection_finds_one_wrong_entry_of_a_large_input(xp, rng):
    x = xp.asarray(rng.standard_normal((20, 30)))
    with pytest.raises(AssertionError) as failure:
        gradcheck(lambda x: Square("one_entry")(x), [x], directions=2)
    assert _numbers(str(failure.value))[:2] == (0, (19, 29))


class WrongShape(Function):
    """Sums a (3, 4) input over its rows but hands back a (1, 4) gradient."""

    def forward(self, x):
        return x.sum(axis=0)

    def backward(self, gy):
        return gy[None, :]


def test_gradient_of_the_wrong_shape_fails(xp, rng):
    with pytest.raises(AssertionError, match=r"input 0: backward gives shape \(1, 4\)"):
        gradcheck(lambda x: WrongShape()(x), [xp.asarray(rng.standard_normal((3, 4)))])


def test_wrong_entry_found_in_a_large_input_by_random_directions(xp, rng):
    """600 elements (> max_full) are probed along random directions only; one wrong entry fails."""
    x = xp.asarray(rng.standard_normal((20, 30)))
    assert gradcheck(lambda x: Square()(x), [x], directions=3)
    with pytest.raises(AssertionError):
        gradcheck(lambda x: Square("one_entry")(x), [x], directions=3)


@pytest.mark.parametrize("mode", [FULL, RANDOM], ids=["full", "random"])
def test_missing_gradient_fails(xp, rng, mode):
    a, b = xp.asarray(rng.standard_normal(4)), xp.asarray(rng.standard_normal(4))
    with pytest.raises(AssertionError):
        gradcheck(lambda a, b: Product()(a, b), [a, b], **mode)


def test_non_float64_output_is_rejected(xp, rng):
    with pytest.raises(AssertionError, match="float64"):
        gradcheck(lambda x: x.astype(np.float32), [xp.asarray(rng.standard_normal(3))])


def test_integer_inputs_pass_through_unchanged(xp, rng):
    ids = xp.asarray([2, 0, 2])
    seen = []

    def pick(x, index):
        seen.append(index)
        return x[index]

    assert gradcheck(pick, [xp.asarray(rng.standard_normal((3, 2))), ids])
    assert all(s is ids for s in seen) and not isinstance(seen[0], Tensor)
