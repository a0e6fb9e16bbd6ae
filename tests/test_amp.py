"""LossScaler on its own, and with AdamW: overflow skips, growth, floor/ceiling, no NaN ever written."""
import numpy as np
import pytest

from nn.amp import LossScaler
from nn.module import Parameter
from nn.optim import AdamW
from tinygrad3 import Tensor


def test_overflow_halves_and_clean_steps_grow():
    scaler = LossScaler(init_scale=1024.0, growth_interval=3)
    scaler.update(found_inf=True)
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1 and scaler.clean_steps == 0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 512.0 and scaler.clean_steps == 2
    scaler.update(False)
    assert scaler.scale == 1024.0 and scaler.clean_steps == 0
    assert scaler.inv_scale == 1 / 1024


def test_an_overflow_resets_the_clean_step_count():
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    for found_inf in (False, True, False):
        scaler.update(found_inf)
    assert scaler.scale == 4.0 and scaler.clean_steps == 1


def test_floor_and_ceiling_hold():
    scaler = LossScaler(init_scale=4.0, min_scale=2.0, max_scale=8.0, growth_interval=1)
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 2.0 and scaler.skipped_steps == 5
    for _ in range(5):
        scaler.update(False)
    assert scaler.scale == 8.0


def test_disabled_scaler_is_one_and_still_counts_skips():
    scaler = LossScaler(enabled=False)
    scaler.update(True)
    assert scaler.scale == 1.0 and scaler.inv_scale == 1.0 and scaler.skipped_steps == 1


def test_state_dict_round_trip():
    scaler = LossScaler(init_scale=256.0, growth_interval=5, min_scale=4.0)
    for found_inf in (True, False, False):
        scaler.update(found_inf)
    restored = LossScaler().load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    assert (restored.scale, restored.clean_steps, restored.skipped_steps) == (128.0, 2, 1)
    with pytest.raises(KeyError, match="missing"):
        LossScaler().load_state_dict({"scale": 2.0})


@pytest.mark.parametrize("kwargs, message", [
    (dict(growth_factor=1.0), "growth_factor must be > 1"),
    (dict(backoff_factor=1.0), r"backoff_factor must be in \(0, 1\)"),
    (dict(backoff_factor=0.0), r"backoff_factor must be in \(0, 1\)"),
    (dict(growth_interval=0), "growth_interval must be >= 1"),
    (dict(init_scale=0.5), "min_scale <= init_scale <= max_scale"),
    (dict(init_scale=2.0 ** 30), "min_scale <= init_scale <= max_scale"),
    (dict(min_scale=0.0, init_scale=1.0), "need 0 < min_scale"),
    (dict(max_scale=float("inf")), "finite"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossScaler(**kwargs)


# ----- with the optimizer ------------------------------------------------------------------------
def make_fp16_model(seed=0):
    rng = np.random.default_rng(seed)
    return [("model.layers.0.mlp.up_proj.weight", Parameter(rng.standard_normal((8, 4)).astype(np.float16))),
            ("model.norm.weight", Parameter(rng.standard_normal(4).astype(np.float16)))]


def set_grads(params, rng, scale):
    for _, p in params:
        p.grad = (rng.standard_normal(p.shape) * scale).astype(np.float16)


def snapshot(opt, params):
    return [opt.master.copy(), opt.m.copy(), opt.v.copy()] + [p.data.copy() for _, p in params]


def assert_all_finite(opt, params):
    for array in snapshot(opt, params):
        assert np.isfinite(array).all()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_planted_overflow_skips_the_step_and_halves_the_scale(bad):
    params, rng = make_fp16_model(), np.random.default_rng(1)
    opt, scaler = AdamW(params), LossScaler(init_scale=2.0 ** 10, growth_interval=100)
    for _ in range(3):
        set_grads(params, rng, scaler.scale)
        scaler.update(opt.step(1e-2, inv_scale=scaler.inv_scale).found_inf)
    before, steps_before = snapshot(opt, params), opt.step_count

    set_grads(params, rng, scaler.scale)
    params[0][1].grad[2, 1] = bad
    result = opt.step(1e-2, inv_scale=scaler.inv_scale, clip_norm=1.0)
    scaler.update(result.found_inf)

    assert result.found_inf and not np.isfinite(result.grad_norm)
    assert scaler.scale == 2.0 ** 9 and scaler.skipped_steps == 1
    assert opt.step_count == steps_before
    for old, new in zip(before, snapshot(opt, params)):
        np.testing.assert_array_equal(old, new)  # bit-identical: nothing was written
    assert_all_finite(opt, params)


def test_no_nan_is_ever_written_over_a_run_with_overflows():
    params, rng = make_fp16_model(), np.random.default_rng(2)
    opt, scaler = AdamW(params), LossScaler(init_scale=2.0 ** 8, growth_interval=3)
    skipped = 0
    for step in range(40):
        set_grads(params, rng, scaler.scale)
        if step % 7 == 3:
            params[step % 2][1].grad.flat[0] = np.nan if step % 2 else np.inf
        result = opt.step(1e-2, inv_scale=scaler.inv_scale, clip_norm=1.0)
        scaler.update(result.found_inf)
        skipped += result.found_inf
        assert_all_finite(opt, params)
    assert skipped == scaler.skipped_steps == 6 and opt.step_count == 34
    for name, p in params:
        np.testing.assert_array_equal(p.data, opt.master_of(name).astype(np.float16))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the overflow is the point
def test_a_too_large_scale_overflows_in_backward_and_backs_off():
    """End to end: a real fp16 backward overflows at 2^24 and trains once the scale has come down."""
    weight = Parameter(np.full((4,), 0.5, np.float16))
    opt, scaler = AdamW([("w", weight)]), LossScaler(init_scale=2.0 ** 24, growth_interval=1000)
    x = Tensor(np.full((4,), 100.0, np.float16))
    results = []
    for _ in range(20):
        loss = (weight * x).sum()
        (loss * scaler.scale).backward()  # d loss / d w = 100: times 2^24 it is inf in fp16
        results.append(opt.step(1e-2, inv_scale=scaler.inv_scale))
        scaler.update(results[-1].found_inf)
        opt.zero_grad()
    # 100 * scale fits in fp16 (max 65504) from scale 2^9 on: 2^24 .. 2^10 overflow, 15 skips.
    assert [r.found_inf for r in results] == [True] * 15 + [False] * 5
    assert scaler.scale == 2.0 ** 9 and opt.step_count == 5
    assert results[-1].grad_norm == pytest.approx(200.0)  # unscaled: |(100, 100, 100, 100)|
    assert np.all(weight.data < 0.5) and np.isfinite(weight.data).all()


def test_float32_training_uses_the_same_code_without_scaling():
    rng = np.random.default_rng(3)
    params = [("w", Parameter(rng.standard_normal((3, 3)).astype(np.float32)))]
    opt, scaler = AdamW(params), LossScaler(enabled=False)
    params[0][1].grad = rng.standard_normal((3, 3)).astype(np.float32)
    result = opt.step(1e-3, inv_scale=scaler.inv_scale, clip_norm=1.0)
    scaler.update(result.found_inf)
    assert not result.found_inf and scaler.scale == 1.0 and opt.step_count == 1
    params[0][1].grad[0, 0] = np.inf  # a float32 overflow is skipped the same way
    assert opt.step(1e-3, inv_scale=scaler.inv_scale).found_inf and opt.step_count == 1
