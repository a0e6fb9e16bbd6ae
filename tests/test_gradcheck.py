"""gradcheck must be able to fail: a wrong backward raises AssertionError in both modes."""
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
@pytest.mark.parametrize("mistake", ["factor", "one_entry"])
def test_wrong_backward_fails(xp, rng, mode, mistake):
    with pytest.raises(AssertionError, match="gradient mismatch"):
        gradcheck(lambda x: Square(mistake)(x), [xp.asarray(rng.standard_normal((3, 4)))], **mode)


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
