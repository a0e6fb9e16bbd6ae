"""LRSchedule: values at known steps (computed here by hand), validation, the constant kind."""
import math

import pytest

from nn.schedule import LRSchedule


def test_warmup_is_linear_from_peak_over_warmup():
    s = LRSchedule(peak_lr=1e-3, warmup_steps=4, total_steps=20, min_lr=1e-4)
    assert [s(i) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)


def test_cosine_values_at_known_steps():
    s = LRSchedule(peak_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-4)
    assert s(10) == pytest.approx(1e-3, rel=1e-12)                # decay starts at the peak
    assert s(60) == pytest.approx(5.5e-4, rel=1e-12)              # halfway: (peak + min) / 2
    # A quarter of the way: min + (peak - min) * (1 + cos(pi/4)) / 2.
    assert s(35) == pytest.approx(1e-4 + 9e-4 * (1 + 2 ** -0.5) / 2, rel=1e-12)
    assert s(109) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi * 0.99)) / 2, rel=1e-12)
    assert s(110) == 1e-4 and s(10_000) == 1e-4                   # the floor after total_steps


def test_cosine_is_monotone_and_stays_between_min_and_peak():
    s = LRSchedule(3e-4, 50, 500, min_lr=3e-5)
    after_warmup = [s(i) for i in range(50, 600)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    assert min(after_warmup) == 3e-5 and max(after_warmup) == 3e-4


def test_min_lr_defaults_to_a_tenth_of_peak():
    assert LRSchedule(2e-3, 0, 10)(10) == pytest.approx(2e-4)


def test_no_warmup_starts_at_peak():
    assert LRSchedule(1e-3, 0, 10, min_lr=0.0)(0) == 1e-3


def test_constant_kind_warms_up_then_holds_the_peak():
    s = LRSchedule(1e-3, 2, 10, kind="constant")
    assert [s(i) for i in (0, 1, 2, 9, 10, 1000)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_min_lr_above_peak_is_rejected():
    with pytest.raises(ValueError, match="min_lr .* is above peak_lr"):
        LRSchedule(peak_lr=1e-4, warmup_steps=10, total_steps=100, min_lr=3e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(peak_lr=-1e-3), "peak_lr must be"),
    (dict(peak_lr=0.0), "peak_lr must be > 0"),
    (dict(min_lr=-1e-5), "min_lr must be"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(warmup_steps=200), "warmup_steps .* is larger than total_steps"),
    (dict(kind="linear"), "unknown schedule kind"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    args = dict(peak_lr=1e-3, warmup_steps=10, total_steps=100) | kwargs
    with pytest.raises(ValueError, match=message):
        LRSchedule(**args)


def test_bad_steps_are_rejected():
    s = LRSchedule(1e-3, 10, 100)
    with pytest.raises(ValueError, match="step must be >= 0"):
        s(-1)
    with pytest.raises(TypeError, match="step must be an integer"):
        s(1.5)
