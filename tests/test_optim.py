"""AdamW: equal to torch.optim.AdamW, the decay rule, fp16 masters, checkpoints, errors, the
fused kernel's reference, GPU (CuPy against NumPy, the fused kernel against the reference path)."""
import numpy as np
import pytest

from nn.module import Module, Parameter
from nn.optim import AdamW
from tinygrad3.backend import to_numpy
from tinygrad3.kernels import adamw, fast

SHAPES = {
    "model.embed_tokens.weight": (11, 6),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.layers.0.self_attn.q_norm.weight": (4,),
    "model.layers.0.self_attn.q_proj.weight": (8, 6),
    "model.layers.0.mlp.up_proj.weight": (12, 6),
    "model.norm.weight": (6,),
    "lm_head.weight": (11, 6),
}
DECAYED = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"}
KEEP32 = {n for n in SHAPES if len(SHAPES[n]) == 1 or "embed" in n}  # float32 under mixed precision
STEPS = 20


def initial_values(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def gradient_sequence(steps=STEPS, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return [{name: scale * rng.standard_normal(shape) for name, shape in SHAPES.items()} for _ in range(steps)]


def lr_at(step):
    return 1e-2 * (step + 1) / STEPS  # varies, so the lr passed to step() matters


def make_params(values, dtype, xp=np):
    return [(name, Parameter(xp.asarray(values[name].astype(dtype)))) for name in SHAPES]


def mixed_params(values, xp=np):
    """Mixed precision: the KEEP32 parameters float32, the rest fp16."""
    return [(n, Parameter(xp.asarray(values[n].astype(np.float32 if n in KEEP32 else np.float16)))) for n in SHAPES]


# Where the fp16 parameters lie among the masters under mixed precision (AdamW keyword arguments):
# the decayed prefix (the default); after a decayed float32 embedding (the fp16 copy starts past 0);
# around a decayed float32 norm weight (a float32 slot inside the fp16 copy's span).
MIXED_LAYOUTS = {
    "fp16-prefix": {},
    "fp16-after-embedding": {"decay_embeddings": True},
    "float32-inside": {"no_decay": lambda n, p: (p.ndim < 2 and n != "model.norm.weight") or "embed" in n},
}


def fp16_span(opt):
    """[first, last) master elements of the fp16 parameters, from the optimizer's order."""
    names = opt.decayed_names() + opt.undecayed_names()
    starts = np.cumsum([0] + [int(np.prod(SHAPES[n])) for n in names])
    narrow = [i for i, n in enumerate(names) if n not in KEEP32]
    return int(starts[narrow[0]]), int(starts[narrow[-1] + 1])


def run_ours(values, grads, dtype, clip_norm=None, xp=np, **kwargs):
    params = make_params(values, dtype, xp)
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
    results = []
    for step, g in enumerate(grads):
        for name, p in params:
            p.grad = xp.asarray(g[name].astype(dtype))
        results.append(opt.step(lr_at(step), clip_norm=clip_norm))
    return dict(params), opt, results


def run_torch(torch, values, grads, dtype, clip_norm=None):
    params = {name: torch.tensor(values[name].astype(dtype), requires_grad=True) for name in SHAPES}
    groups = [{"params": [p for n, p in params.items() if n in DECAYED], "weight_decay": 0.1},
              {"params": [p for n, p in params.items() if n not in DECAYED], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr_at(0), betas=(0.9, 0.95), eps=1e-8)
    norms = []
    for step, g in enumerate(grads):
        for name, p in params.items():
            p.grad = torch.tensor(g[name].astype(dtype))
        if clip_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
    return {name: p.detach().numpy() for name, p in params.items()}, norms


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_matches_torch_adamw_for_20_steps(torch, dtype, tol, clip_norm):
    values, grads = initial_values(), gradient_sequence()
    ours, opt, results = run_ours(values, grads, dtype, clip_norm)
    theirs, torch_norms = run_torch(torch, values, grads, dtype, clip_norm)
    assert opt.step_count == STEPS and not any(r.found_inf for r in results)
    for name in SHAPES:
        assert ours[name].dtype == dtype
        np.testing.assert_allclose(ours[name].data, theirs[name], rtol=tol, atol=tol, err_msg=name)
    if clip_norm is not None:  # the gradients' norm is ~16, so clipping to 1 engages on every step
        np.testing.assert_allclose([r.grad_norm for r in results], torch_norms, rtol=tol)
        assert all(r.clip_coef < 0.1 for r in results)


def scaled(grads, factors):
    """Step i's gradients times factors[i] (their global norm is about 16 at factor 1)."""
    return [{n: f * g for n, g in step.items()} for step, f in zip(grads, factors)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_that_does_not_engage_changes_nothing(xp, dtype):
    """Norms near 0.16 under clip_norm=1: the clip factor is exactly 1 and master, m and v are
    bit-identical to an unclipped run (a clip without min(1, .) would scale the gradients up about
    6x). On a GPU, float32 takes the fused kernel."""
    values, grads = initial_values(), scaled(gradient_sequence(), [0.01] * STEPS)
    _, clipped, results = run_ours(values, grads, dtype, clip_norm=1.0, xp=xp)
    _, unclipped, _ = run_ours(values, grads, dtype, xp=xp)
    assert all(r.clip_coef == 1.0 and r.grad_norm < 0.5 for r in results)
    for buffer in ("master", "m", "v"):
        np.testing.assert_array_equal(to_numpy(getattr(clipped, buffer)), to_numpy(getattr(unclipped, buffer)),
                                      err_msg=buffer)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_clip_matches_torch_when_it_engages_and_when_it_does_not(torch, dtype, tol):
    """Norms alternate around 0.8 and 16 under clip_norm=4: torch's clip_grad_norm_ and AdamW,
    step by step; the clip factor is below 1 exactly on the large steps."""
    values = initial_values()
    grads = scaled(gradient_sequence(), [0.05 if step % 2 == 0 else 1.0 for step in range(STEPS)])
    ours, _, results = run_ours(values, grads, dtype, clip_norm=4.0)
    theirs, torch_norms = run_torch(torch, values, grads, dtype, clip_norm=4.0)
    assert [r.clip_coef < 1.0 for r in results] == [step % 2 == 1 for step in range(STEPS)]
    np.testing.assert_allclose([r.grad_norm for r in results], torch_norms, rtol=tol)
    for r in results:
        assert r.clip_coef == min(1.0, 4.0 / (r.grad_norm + 1e-6))
    for name in SHAPES:
        np.testing.assert_allclose(ours[name].data, theirs[name], rtol=tol, atol=tol, err_msg=name)


def test_grad_norm_and_clip_of_scaled_gradients():
    """Gradients 1024x too large with inv_scale=1/1024: the reported norm is the float64 norm of
    the unscaled gradients, the clip compares that norm, and the update is bit-identical to one
    from the unscaled gradients (1024 is a power of two: scaling there and back is exact)."""
    values, grads = initial_values(), gradient_sequence(3)
    grads = [{n: g.astype(np.float32).astype(np.float64) for n, g in step.items()} for step in grads]
    reference = [np.sqrt(sum(float((g ** 2).sum()) for g in step.values())) for step in grads]
    runs = []
    for scale in (1024.0, 1.0):
        params = make_params(values, np.float32)
        opt = AdamW(params)
        results = []
        for step, g in enumerate(grads):
            for name, p in params:
                p.grad = (g[name] * scale).astype(np.float32)
            results.append(opt.step(lr_at(step), inv_scale=1 / scale, clip_norm=reference[step] / 2))
        runs.append((opt, results))
    (opt, results), (plain, plain_results) = runs
    np.testing.assert_allclose([r.grad_norm for r in results], reference, rtol=1e-6)
    np.testing.assert_allclose([r.clip_coef for r in results], 0.5, rtol=1e-6)
    assert [r.grad_norm for r in results] == [r.grad_norm for r in plain_results]
    for buffer in ("master", "m", "v"):
        np.testing.assert_array_equal(getattr(opt, buffer), getattr(plain, buffer), err_msg=buffer)


def test_default_decay_rule_skips_norms_and_embeddings():
    opt = AdamW(make_params(initial_values(), np.float32))
    assert set(opt.decayed_names()) == DECAYED
    assert set(opt.undecayed_names()) == set(SHAPES) - DECAYED
    assert opt.num_decayed == sum(np.prod(SHAPES[n]) for n in DECAYED)
    assert opt.num_params == sum(np.prod(s) for s in SHAPES.values())


def test_decay_embeddings_and_custom_rule():
    with_embed = AdamW(make_params(initial_values(), np.float32), decay_embeddings=True)
    assert set(with_embed.decayed_names()) == DECAYED | {"model.embed_tokens.weight"}
    only_head = AdamW(make_params(initial_values(), np.float32), no_decay=lambda name, p: name != "lm_head.weight")
    assert only_head.decayed_names() == ["lm_head.weight"]


def test_decay_shrinks_only_decayed_weights():
    params = make_params(initial_values(), np.float64)
    before = {n: p.data.copy() for n, p in params}
    opt = AdamW(params, weight_decay=0.5)
    opt.step(lr=0.1)  # no gradients at all: only the decay moves anything
    for name, p in params:
        expected = before[name] * (1 - 0.1 * 0.5) if name in DECAYED else before[name]
        np.testing.assert_array_equal(p.data, expected)


def test_float32_params_are_views_of_the_master():
    params = make_params(initial_values(), np.float32)
    opt = AdamW(params)
    assert opt.master.dtype == np.float32
    assert all(np.shares_memory(p.data, opt.master) for _, p in params)


def test_float64_params_keep_float64_masters():
    assert AdamW(make_params(initial_values(), np.float64)).master.dtype == np.float64


def test_fp16_params_follow_their_float32_masters():
    values = {n: v.astype(np.float16).astype(np.float64) for n, v in initial_values().items()}
    grads = [{n: g.astype(np.float16).astype(np.float64) for n, g in step.items()} for step in gradient_sequence()]
    half, opt, _ = run_ours(values, grads, np.float16, clip_norm=1.0)
    full, reference, _ = run_ours(values, grads, np.float32, clip_norm=1.0)
    assert opt.master.dtype == np.float32 and not np.shares_memory(opt.master, half["lm_head.weight"].data)
    np.testing.assert_array_equal(opt.master, reference.master)  # the fp16 copy never feeds back
    for name, p in half.items():
        assert p.data.dtype == np.float16
        np.testing.assert_array_equal(p.data, opt.master_of(name).astype(np.float16))
        assert not np.array_equal(p.data, values[name].astype(np.float16))  # the copy was refreshed


@pytest.mark.parametrize("layout", MIXED_LAYOUTS)
def test_mixed_fp16_and_float32_params_share_one_float32_master(layout):
    """Mixed precision: 1-D weights and the embedding stay float32 (their .data IS the master),
    the rest are fp16 copies in a buffer spanning only the fp16 parameters' masters; the update is
    the same as an all-float32 run's either way."""
    values = {n: v.astype(np.float16).astype(np.float64) for n, v in initial_values().items()}
    grads = [{n: g.astype(np.float16).astype(np.float64) for n, g in step.items()} for step in gradient_sequence()]
    params = mixed_params(values)
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **MIXED_LAYOUTS[layout])
    lo, hi = fp16_span(opt)
    assert (lo > 0) == (layout == "fp16-after-embedding")
    assert opt._compute.dtype == np.float16 and opt._compute.size == hi - lo < opt.num_params
    for step, g in enumerate(grads):
        for name, p in params:
            p.grad = g[name].astype(p.dtype)
        opt.step(lr_at(step), clip_norm=1.0)
    _, reference, _ = run_ours(values, grads, np.float32, clip_norm=1.0, **MIXED_LAYOUTS[layout])
    np.testing.assert_array_equal(opt.master, reference.master)
    for name, p in params:
        if name in KEEP32:
            assert p.dtype == np.float32 and np.shares_memory(p.data, opt.master)
        else:
            assert p.dtype == np.float16
            np.testing.assert_array_equal(p.data, opt.master_of(name).astype(np.float16))


@pytest.mark.parametrize("layout", MIXED_LAYOUTS)
def test_fused_kernel_reference_equals_the_reference_path(layout):
    """tinygrad3/kernels/adamw.py's NumPy reference, given the gathered unscaled gradients and the
    clip factor, reproduces AdamW.step bit for bit: decay prefix, clipping on and off, fp16 copy."""
    params = mixed_params(initial_values())
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **MIXED_LAYOUTS[layout])
    lo, hi = fp16_span(opt)
    assert 0 < opt.num_decayed < opt.num_params
    names = opt.decayed_names() + opt.undecayed_names()
    ends = np.cumsum([np.prod(SHAPES[n]) for n in names])
    by_name = dict(params)
    master, m, v = opt.master.copy(), opt.m.copy(), opt.v.copy()
    inv_scale = 1 / 64
    for step, g in enumerate(gradient_sequence(6, scale=64)):
        for name, p in params:
            p.grad = g[name].astype(p.dtype)
        result = opt.step(lr_at(step), inv_scale=inv_scale, clip_norm=1.0 if step % 2 else None)
        assert (result.clip_coef < 1.0) == bool(step % 2)
        grad = np.concatenate([by_name[n].grad.astype(np.float32).reshape(-1) for n in names]) * np.float32(inv_scale)
        master, m, v, compute = adamw.reference_update(
            master, m, v, grad, np.float16, coef=result.clip_coef, lr=lr_at(step), weight_decay=0.1,
            num_decayed=opt.num_decayed, betas=(0.9, 0.95), eps=1e-8, step=step + 1, compute_span=slice(lo, hi))
        np.testing.assert_array_equal(opt.master, master)
        np.testing.assert_array_equal(opt.m, m)
        np.testing.assert_array_equal(opt.v, v)
        for name, end in zip(names, ends):
            if by_name[name].dtype == np.float16:
                np.testing.assert_array_equal(by_name[name].data.reshape(-1),
                                              compute[end - by_name[name].size - lo:end - lo])


def test_small_fp16_gradients_are_unscaled_in_float32():
    params = make_params(initial_values(), np.float16)
    opt = AdamW(params)
    scale = 2.0 ** 16
    for _, p in params:  # 1e-8 flushes to zero in fp16, 1e-8 * 2^16 does not
        p.grad = np.full(p.shape, 1e-8 * scale, dtype=np.float16)
    result = opt.step(1e-3, inv_scale=1 / scale)
    assert result.grad_norm == pytest.approx(1e-8 * np.sqrt(opt.num_params), rel=1e-3)


def test_missing_gradients_count_as_zero():
    params = make_params(initial_values(), np.float64)
    opt = AdamW(params)
    params[3][1].grad = np.ones(SHAPES[params[3][0]])
    result = opt.step(1e-3)
    assert result.grad_norm == pytest.approx(np.sqrt(np.prod(SHAPES[params[3][0]])))


def test_zero_grad_clears_every_gradient():
    params = make_params(initial_values(), np.float32)
    opt = AdamW(params)
    for _, p in params:
        p.grad = np.ones(p.shape, np.float32)
    opt.zero_grad()
    assert all(p.grad is None for _, p in params)


def test_frozen_and_repeated_parameters():
    params = make_params(initial_values(), np.float32)
    params[0][1].requires_grad = False
    opt = AdamW(params + [("tied.lm_head.weight", params[-1][1])])
    assert "model.embed_tokens.weight" not in opt.decayed_names() + opt.undecayed_names()
    assert "tied.lm_head.weight" not in opt.decayed_names()
    assert opt.num_params == sum(np.prod(s) for n, s in SHAPES.items() if n != "model.embed_tokens.weight")


def train(opt, params, grads, start):
    for step in range(start, len(grads)):
        for name, p in params:
            p.grad = grads[step][name].astype(p.dtype)
        opt.step(lr_at(step), clip_norm=1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_state_dict_round_trip_resumes_bit_identically(dtype):
    """Saved after 10 steps, loaded into a fresh AdamW built with other hyperparameters: the next
    10 steps are bit-identical (step count and so bias correction, moments, betas, eps, decay)."""
    values, grads = initial_values(), gradient_sequence()
    params = make_params(values, dtype)
    opt = AdamW(params, lr=3e-3, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.3)
    train(opt, params, grads[:10], 0)
    saved_opt, saved_weights = opt.state_dict(), {n: p.data.copy() for n, p in params}
    train(opt, params, grads, 10)

    resumed_params = [(n, Parameter(saved_weights[n])) for n in SHAPES]
    resumed = AdamW(resumed_params)
    resumed.load_state_dict(saved_opt)
    assert resumed.step_count == 10
    assert (resumed.lr, resumed.betas, resumed.eps, resumed.weight_decay) == (3e-3, (0.8, 0.9), 1e-3, 0.3)
    train(resumed, resumed_params, grads, 10)
    assert resumed.step_count == opt.step_count == STEPS
    for (name, p), (_, q) in zip(params, resumed_params):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    for buffer in ("master", "m", "v"):
        np.testing.assert_array_equal(getattr(opt, buffer), getattr(resumed, buffer), err_msg=buffer)


def test_load_state_dict_rejects_another_model():
    state = AdamW(make_params(initial_values(), np.float32)).state_dict()
    smaller = [(n, p) for n, p in make_params(initial_values(), np.float32) if n != "lm_head.weight"]
    with pytest.raises(ValueError, match="optimizer state is for a different model: "
                                         "saved lm_head.weight is not in this model"):
        AdamW(smaller).load_state_dict(state)
    reshaped = [(n, Parameter(np.zeros((3, 3), np.float32)) if n == "lm_head.weight" else p)
                for n, p in make_params(initial_values(), np.float32)]
    with pytest.raises(ValueError, match=r"different model: lm_head.weight: saved shape \(11, 6\)"):
        AdamW(reshaped).load_state_dict(state)
    with pytest.raises(ValueError, match="different weight-decay rule"):
        AdamW(make_params(initial_values(), np.float32), decay_embeddings=True).load_state_dict(state)
    with pytest.raises(ValueError, match="expected float64"):
        AdamW(make_params(initial_values(), np.float64)).load_state_dict(state)


def test_eps_keeps_a_parameter_without_gradient_finite():
    """eps > 0 is required: where a parameter's gradient is 0, m = v = 0 and the update is
    0 / (0 + eps) = 0 (eps = 0 would be 0 / 0, NaN, and is refused, also from a saved state)."""
    params = make_params(initial_values(), np.float32)
    opt = AdamW(params, eps=1e-8, weight_decay=0.0)
    before = {n: p.data.copy() for n, p in params}
    for step in range(3):
        params[3][1].grad = np.ones(params[3][1].shape, np.float32)  # only q_proj has a gradient
        opt.step(1e-2)
    for name, p in params:
        assert np.isfinite(p.data).all(), name
        assert np.array_equal(p.data, before[name]) == (name != params[3][0]), name
    state = opt.state_dict()
    state["eps"] = 0.0
    master = opt.master.copy()
    with pytest.raises(ValueError, match="^eps must be > 0"):
        opt.load_state_dict(state)
    np.testing.assert_array_equal(opt.master, master)  # refused before anything was restored
    assert opt.eps == 1e-8


class Tiny(Module):
    def __init__(self):
        super().__init__()
        self.weight = Parameter(np.ones((2, 3), np.float16))
        self.bias = Parameter(np.zeros(3, np.float16))


def test_sync_params_adopts_weights_loaded_after_the_optimizer():
    model = Tiny()
    opt = AdamW(model.named_parameters())
    model.load_state_dict({"weight": np.full((2, 3), 3.0), "bias": np.full(3, 2.0)})  # replaces .data
    opt.sync_params()
    np.testing.assert_array_equal(opt.master_of("weight"), np.full((2, 3), 3.0))
    model.weight.grad = np.ones((2, 3), np.float16)
    opt.step(0.5)
    assert np.all(model.weight.data < 3.0)  # the update reaches the model again
    np.testing.assert_array_equal(model.bias.data, np.full(3, 2.0, np.float16))
    model.to(dtype=np.float32)
    with pytest.raises(ValueError, match="build a new optimizer"):
        opt.sync_params()


def test_bad_arguments_are_rejected():
    params = make_params(initial_values(), np.float32)
    mixed = params[:-1] + [("lm_head.weight", Parameter(np.zeros((2, 2), np.float64)))]
    with pytest.raises(ValueError, match="share one device and be all float64"):
        AdamW(mixed)
    with pytest.raises(ValueError, match="no trainable parameters"):
        AdamW([])
    with pytest.raises(ValueError, match="betas must be"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay must be"):
        AdamW(params, weight_decay=-0.1)
    for eps in (0, 0.0, -1e-8, float("nan")):
        with pytest.raises(ValueError, match="^eps must be"):
            AdamW(params, eps=eps)
    opt = AdamW(params)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        opt.step(1e-3, clip_norm=0)
    with pytest.raises(ValueError, match="inv_scale must be > 0"):
        opt.step(1e-3, inv_scale=0)
    params[0][1].grad = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="gradient shape"):
        opt.step(1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cupy_step_matches_numpy(gpu_xp, dtype):
    values, grads = initial_values(), gradient_sequence()
    cpu, cpu_opt, cpu_results = run_ours(values, grads, dtype, clip_norm=1.0)
    gpu, gpu_opt, gpu_results = run_ours(values, grads, dtype, clip_norm=1.0, xp=gpu_xp)
    assert isinstance(gpu_opt.master, gpu_xp.ndarray)
    np.testing.assert_allclose(gpu_xp.asnumpy(gpu_opt.master), cpu_opt.master, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r.grad_norm for r in gpu_results], [r.grad_norm for r in cpu_results], rtol=1e-5)
    for name in SHAPES:
        assert isinstance(gpu[name].data, gpu_xp.ndarray) and gpu[name].dtype == dtype
        np.testing.assert_allclose(gpu_xp.asnumpy(gpu[name].data).astype(np.float32),
                                   cpu[name].data.astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float32", *MIXED_LAYOUTS])
def test_fused_step_matches_reference_path(gpu_xp, monkeypatch, precision):
    """The fast path's AdamW (one kernel) against the reference path for 10 steps: loss scale,
    clipping on every step, and step 4's inf gradient skipped (nothing written)."""
    values, grads = initial_values(), gradient_sequence(10, scale=1024)
    grads[4]["lm_head.weight"][0, 0] = np.inf
    launches = []
    update = adamw.update
    monkeypatch.setattr(adamw, "update", lambda *args, **kwargs: (launches.append(1), update(*args, **kwargs)))

    def run(enabled):
        mixed = precision in MIXED_LAYOUTS
        params = mixed_params(values, gpu_xp) if mixed else make_params(values, np.float32, gpu_xp)
        opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **MIXED_LAYOUTS.get(precision, {}))
        results = []
        with fast(enabled, families=("adamw",)):
            for step, g in enumerate(grads):
                for name, p in params:
                    p.grad = gpu_xp.asarray(g[name].astype(p.dtype))
                results.append(opt.step(lr_at(step), inv_scale=1 / 1024, clip_norm=1.0))
        return dict(params), opt, results

    ref, ref_opt, ref_results = run(False)
    assert not launches
    fused, fused_opt, fused_results = run(True)
    assert len(launches) == 9 and fused_opt.step_count == ref_opt.step_count == 9
    assert [r.found_inf for r in fused_results] == [r.found_inf for r in ref_results] == [s == 4 for s in range(10)]
    assert all(r.clip_coef < 1.0 for r in fused_results if not r.found_inf)
    np.testing.assert_allclose([r.grad_norm for r in fused_results], [r.grad_norm for r in ref_results], rtol=1e-6)
    for buffer in ("master", "m", "v"):
        np.testing.assert_allclose(gpu_xp.asnumpy(getattr(fused_opt, buffer)), gpu_xp.asnumpy(getattr(ref_opt, buffer)),
                                   rtol=1e-5, atol=1e-7, err_msg=buffer)
    for name in SHAPES:
        p = fused[name]
        assert p.dtype == ref[name].dtype
        np.testing.assert_array_equal(gpu_xp.asnumpy(p.data),  # the kernel wrote the fp16 copy
                                      gpu_xp.asnumpy(fused_opt.master_of(name).astype(p.dtype)), err_msg=name)
        np.testing.assert_allclose(gpu_xp.asnumpy(p.data).astype(np.float32),
                                   gpu_xp.asnumpy(ref[name].data).astype(np.float32),
                                   rtol=2e-3, atol=1e-6, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 4096, 1_000_003])
@pytest.mark.parametrize("inv_scale", [1.0, 1 / 1024])
def test_unscale_sum_squares_kernel(gpu_xp, n, inv_scale):
    """One pass: the buffer unscaled exactly as `grad *= inv_scale` (bit for bit), the sum of the
    squares as the float64 reference within float32 summation error; inf and NaN come through."""
    rng = np.random.default_rng(n)
    grad = (rng.standard_normal(n) * 300).astype(np.float32)
    ref = grad.copy()
    expected = adamw.reference_unscale_sum_squares(ref, inv_scale)
    g = gpu_xp.asarray(grad)
    total = adamw.unscale_sum_squares(g, inv_scale)
    np.testing.assert_array_equal(gpu_xp.asnumpy(g), ref)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    for bad in (np.inf, np.nan):
        g[n // 2] = bad
        assert not np.isfinite(adamw.unscale_sum_squares(g, inv_scale))
