"""F.linear_cross_entropy: the head GEMM and the loss in blocks, without keeping the logits.

It must equal cross_entropy(linear(x, W) + mask) exactly in meaning: value and gradients of x
and W, with rows spread over several blocks, ignored targets (a whole block of them too), a
padded vocabulary (valid_vocab), on the CPU in float64 (gradcheck, torch) and on the GPU's fast
path in float16.
"""
import numpy as np
import pytest

import tinygrad3.functional as F
from engine_checks import check_grad, compare_with_torch
from tinygrad3 import Tensor, backend
from tinygrad3.kernels import fast
from tinygrad3.nn_ops.linear_cross_entropy import block_rows

from test_kernels import close16, half

TARGETS = np.array([[3, -1, 0, 6], [-1, -1, -1, -1], [2, 5, 6, -1]])  # the middle block: all ignored


def unfused(valid=None):
    """The reference: logits, a mask that makes padding ids' logits -inf in effect, the loss."""
    def fn(x, w):
        z = F.linear(x, w)
        if valid is not None:
            xp = backend.get_array_module(z.data)
            z = z + xp.asarray(np.where(np.arange(z.shape[-1]) < valid, 0.0, -1e4))  # exp(-1e4) == 0.0
        return F.cross_entropy(z, TARGETS)
    return fn


def fused(valid=None, rows=4):
    return lambda x, w: F.linear_cross_entropy(x, w, TARGETS, valid_vocab=valid, block_rows=rows)


@pytest.mark.parametrize("rows", [1, 4, 5, 100])
def test_fused_equals_unfused(xp, rng, rows):
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((8, 5))
    for valid in (None, 7):  # 7: id 7 is padding
        ours = [Tensor(xp.asarray(a), requires_grad=True) for a in (x, w)]
        ref = [Tensor(xp.asarray(a), requires_grad=True) for a in (x, w)]
        loss, expected = fused(valid, rows)(*ours), unfused(valid)(*ref)
        loss.backward()
        expected.backward()
        np.testing.assert_allclose(backend.to_numpy(loss.data), backend.to_numpy(expected.data), rtol=1e-12)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(backend.to_numpy(a.grad), backend.to_numpy(b.grad), rtol=1e-10, atol=1e-12)
        if valid is not None:
            assert not backend.to_numpy(ours[1].grad)[valid:].any()  # padding rows of W: no gradient


def test_fused_gradcheck_and_torch(xp, torch, rng):
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((7, 5))
    check_grad(xp, fused(rows=3), [x, w])
    check_grad(xp, fused(valid=7, rows=5), [x, rng.standard_normal((9, 5))])

    def theirs(x, w):
        z = (x @ w.T).reshape(-1, 7)
        return torch.nn.functional.cross_entropy(z, torch.tensor(TARGETS.reshape(-1)), ignore_index=-1)
    compare_with_torch(torch, xp, fused(rows=3), theirs, [x, w])


def early(valid=None, rows=4, expected=2.5):
    return lambda x, w: F.linear_cross_entropy(x, w, TARGETS, valid_vocab=valid, block_rows=rows,
                                               expected_grad=expected)


@pytest.mark.parametrize("rows", [1, 4, 100])
def test_gradients_made_in_the_forward_equal_the_recomputed_ones(xp, rng, rows):
    """expected_grad = the gy the backward then gets (a number, or a 0-d array as in a CUDA graph):
    the same loss and gradients as recomputing the logits in the backward."""
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((8, 5))
    for valid, expected in ((None, 2.5), (7, xp.asarray(2.5))):
        results = []
        for fn in (fused(valid, rows), early(valid, rows, expected)):
            ts = [Tensor(xp.asarray(a), requires_grad=True) for a in (x, w)]
            loss = fn(*ts)
            (loss * 2.5).backward()
            results.append([backend.to_numpy(a) for a in (loss.data, ts[0].grad, ts[1].grad)])
        for got, want in zip(results[1], results[0]):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_gradients_made_in_the_forward_gradcheck_and_torch(xp, torch, rng):
    """Another gy than the expected one (gradcheck's and torch's random upstream gradients): the
    gradients are scaled by gy / expected_grad, so they are still right."""
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((7, 5))
    check_grad(xp, early(rows=3, expected=0.75), [x, w])
    check_grad(xp, early(valid=7, rows=5, expected=-3.0), [x, rng.standard_normal((9, 5))])

    def theirs(x, w):
        z = (x @ w.T).reshape(-1, 7)
        return torch.nn.functional.cross_entropy(z, torch.tensor(TARGETS.reshape(-1)), ignore_index=-1)
    compare_with_torch(torch, xp, early(rows=3, expected=4.0), theirs, [x, w])


def test_all_ignored_is_zero_with_zero_gradients(xp, rng):
    x = Tensor(xp.asarray(rng.standard_normal((2, 3)).astype(np.float32)), requires_grad=True)
    w = Tensor(xp.asarray(rng.standard_normal((4, 3)).astype(np.float32)), requires_grad=True)
    loss = F.linear_cross_entropy(x, w, np.array([-1, -1]), block_rows=1)
    assert loss.item() == 0.0 and loss.dtype == np.float32
    loss.backward()
    assert not backend.to_numpy(x.grad).any() and not backend.to_numpy(w.grad).any()


def test_errors(xp, rng):
    x, w = Tensor(xp.asarray(rng.standard_normal((2, 3)))), Tensor(xp.asarray(rng.standard_normal((4, 3))))
    with pytest.raises(ValueError, match=r"\[0, 4\).*found 4"):
        F.linear_cross_entropy(x, w, np.array([0, 4]))
    with pytest.raises(ValueError, match="do not match"):
        F.linear_cross_entropy(x, w, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="features"):
        F.linear_cross_entropy(x, Tensor(xp.asarray(rng.standard_normal((4, 2)))), np.array([0, 1]))
    with pytest.raises(ValueError, match="block_rows"):
        F.linear_cross_entropy(x, w, np.array([0, 1]), block_rows=0)
    with pytest.raises(ValueError, match=r"\[0, 3\).*found 3"):  # a padding id as a target
        F.linear_cross_entropy(x, w, np.array([0, 3]), valid_vocab=3)
    with pytest.raises(ValueError, match="valid_vocab"):
        F.linear_cross_entropy(x, w, np.array([0, 1]), valid_vocab=5)
    with pytest.raises(ValueError, match="expected_grad must be nonzero"):
        F.linear_cross_entropy(x, w, np.array([0, 1]), expected_grad=0.0)


@pytest.mark.parametrize("n, vocab, itemsize, block_bytes, expected", [
    (16384, 50304, 2, 256 * 2 ** 20, 2432),  # 7 blocks of at most 2668 rows, rounded up to 128s
    (4096, 50304, 2, 256 * 2 ** 20, 2048),
    (100, 50304, 2, 256 * 2 ** 20, 100),     # one small block
    (10, 7, 8, 8 * 7 * 3, 3),                # blocks below 128 rows are not rounded
])
def test_block_rows(n, vocab, itemsize, block_bytes, expected):
    rows = block_rows(n, vocab, itemsize, block_bytes)
    assert rows == expected
    assert rows * vocab * itemsize <= block_bytes or rows % 128 == 0


def test_model_fused_head_equals_logits_path(rng):
    """Gemma3 with return_logits=False: the same loss and parameter gradients (float64, tiny
    preset with a padded vocabulary)."""
    from models import Gemma3, Gemma3Config
    config = Gemma3Config.tiny()
    ids = rng.integers(0, config.unpadded_vocab_size or config.vocab_size, (2, 9))
    results = []
    for return_logits in (True, False):
        model = Gemma3(config, seed=0)
        model.to(dtype=np.float64)
        logits, loss = model(ids[:, :-1], ids[:, 1:], return_logits=return_logits)
        assert (logits is None) == (not return_logits)
        loss.backward()
        results.append((loss.item(), {n: p.grad.copy() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-12, err_msg=name)


MICRO_BATCHES = [np.random.default_rng(s).integers(0, 96, (2, 11)) for s in (1, 2)]
LOSS_WEIGHT = 0.375  # what backward multiplies each micro-batch's loss by (loss scale / micro-batches)


def plain_gradients(model, weight=LOSS_WEIGHT):
    """The same two micro-batches on the logits path, summed in .grad."""
    for ids in MICRO_BATCHES:
        (model(ids[:, :-1], ids[:, 1:])[1] * weight).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def buffer_gradients(model, loss_grad, weight=LOSS_WEIGHT):
    """Two micro-batches as training runs them (nn/graphed_step.py): inside grads_in_buffer, with
    the head's gradients made in the forward unless loss_grad is None; the flat buffer per name."""
    from nn.optim import AdamW
    opt = AdamW(model.named_parameters())
    with opt.grads_in_buffer():
        for ids in MICRO_BATCHES:
            _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False, loss_grad=loss_grad)
            (loss * weight).backward()
        assert all(p.grad is None for p in model.parameters())
        grads = {n: backend.to_numpy(p.grad_buffer).copy() for n, p in model.named_parameters()}
    return grads, opt


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_head_gradients_made_in_the_forward_reach_the_flat_buffer(torch, tmp_path, tie):
    """Every parameter's gradient in AdamW's flat buffer (the head's weight, or the embedding table
    it shares, included), summed over two micro-batches, equals a plain backward's .grad and Hugging
    Face's float64 gradients; the step takes its norm from there."""
    from models import load_hf_checkpoint
    from test_gemma3_hf import _hf_model
    hf = _hf_model(torch, tie)
    hf.save_pretrained(tmp_path)
    hf.double().zero_grad()
    for ids in MICRO_BATCHES:
        (hf(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss * LOSS_WEIGHT).backward()
    reference = {n: p.grad.numpy() for n, p in hf.named_parameters()}

    def model():
        ours = load_hf_checkpoint(str(tmp_path), dtype=np.float64)
        assert ours.config.tie_word_embeddings == tie and ours.config.unpadded_vocab_size is None
        return ours

    plain_grads = plain_gradients(model())
    assert set(plain_grads) == set(reference)
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    assert head in plain_grads
    for loss_grad in (None, LOSS_WEIGHT, np.asarray(LOSS_WEIGHT)):
        grads, opt = buffer_gradients(model(), loss_grad)
        for name, g in grads.items():
            np.testing.assert_allclose(g, plain_grads[name], rtol=1e-9, atol=1e-12, err_msg=name)
            error = np.linalg.norm(g - reference[name]) / np.linalg.norm(reference[name])
            assert error < 1e-5, (name, error)  # float32 RoPE angles on both sides (up to 8e-7 seen)
        norm = np.sqrt(sum(float((g * g).sum()) for g in plain_grads.values()))
        assert opt.step(1e-3).grad_norm == pytest.approx(norm, rel=1e-12)


def test_head_gradients_in_the_buffer_with_a_padded_vocabulary(rng):
    """The tiny preset (a padded vocabulary: valid_vocab), tied and untied: the flat buffer's
    gradients equal a plain backward's on the logits path (which masks the padding ids)."""
    from dataclasses import replace
    from models import Gemma3, Gemma3Config
    for tie in (False, True):
        config = replace(Gemma3Config.tiny(), tie_word_embeddings=tie)
        assert config.unpadded_vocab_size < config.vocab_size

        def model():
            ours = Gemma3(config, seed=0)
            return ours.to(dtype=np.float64)

        plain = plain_gradients(model())
        grads, _ = buffer_gradients(model(), LOSS_WEIGHT)
        assert set(grads) == set(plain)
        for name, g in plain.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-9, atol=1e-12, err_msg=f"{name} (tied: {tie})")


@pytest.mark.gpu
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fast_path_head_gradients_reach_the_flat_buffer(gpu_xp, tie):
    """Mixed precision on the fast path (float16 GEMMs, the float32 buffer as the head's dW target):
    the flat buffer's gradients against float64 plain gradients of the same (fp16-rounded) weights,
    within float16 error; a dropped head gradient is off by 100%."""
    from dataclasses import replace
    from models import Gemma3, Gemma3Config
    config, weight = replace(Gemma3Config.tiny(), tie_word_embeddings=tie), 512.0  # loss-scale sized
    reference = Gemma3(config, seed=0).to(dtype=np.float16).to(dtype=np.float64)
    expected = plain_gradients(reference, weight)
    for loss_grad in (weight, gpu_xp.asarray(weight, np.float32)):
        model = Gemma3(config, seed=0).to(device="cuda", dtype=np.float16)
        with fast(True):
            grads, _ = buffer_gradients(model, loss_grad, weight)
        assert set(grads) == set(expected)
        for name, g in expected.items():
            error = np.linalg.norm(grads[name] - g) / np.linalg.norm(g)
            assert error < 2e-2, (name, error)


@pytest.mark.gpu
def test_fast_path_fused_equals_unfused(gpu_xp, rng):
    """float16 on the fast path (cuBLAS GEMMs, the cross-entropy kernels), several blocks, a
    padded vocabulary against the mask of float16's most negative value the logits path adds."""
    cp = gpu_xp
    n, d, v = 300, 64, 512
    x, w = half(rng, (n, d)), half(rng, (v, d), 0.2)
    targets = cp.asarray(rng.integers(0, v - 12, n))
    targets[::7] = -1
    mask = cp.zeros(v, np.float16)
    mask[v - 12:] = np.finfo(np.float16).min
    results = []
    with fast(True):
        for fn in (lambda a, b: F.cross_entropy(F.linear(a, b) + mask, targets),
                   lambda a, b: F.linear_cross_entropy(a, b, targets, valid_vocab=v - 12, block_rows=128),
                   lambda a, b: F.linear_cross_entropy(a, b, targets, valid_vocab=v - 12, block_rows=128,
                                                       expected_grad=cp.asarray(1024.0, np.float32))):
            ts = [Tensor(cp.asarray(a), requires_grad=True) for a in (x, w)]
            loss = fn(*ts) * 1024.0
            loss.backward()
            results.append((loss.data, ts[0].grad, ts[1].grad))
    for got, expected, what in zip(results[1], results[0], ("loss", "dx", "dw")):
        close16(got, expected, what=what)
    for early_made, recomputed in zip(results[2], results[1]):  # gradients made in the forward: the same bits
        np.testing.assert_array_equal(cp.asnumpy(early_made), cp.asnumpy(recomputed))


# ----- the kernels that finish the gradients made in the forward (kernels/linear_cross_entropy.py)

FACTORS = [1.0, 2.0, 1024.0 / 700.0]  # 1: the kernels write nothing (or only add); 2: exact; the last: rounds


def finish_inputs(rng):
    gx = (rng.standard_normal((37, 24)) * 3).astype(np.float16)
    gw, target = (rng.standard_normal((2, 19, 24)) * 5).astype(np.float32)
    return gx, gw, target


@pytest.fixture
def finish_emulated(monkeypatch):
    """The finishing kernels' source on the CPU emulator, on a grid of 2 blocks (a grid-stride loop)."""
    import cuda_emulator
    from tinygrad3.kernels import linear_cross_entropy as lce_k
    if not cuda_emulator.available():
        pytest.skip("the CUDA emulator needs g++ on x86-64")
    emulator = cuda_emulator.Emulator("// PTX_HELPERS_BEGIN\n// PTX_HELPERS_END\n" + lce_k.SOURCE)

    def launch(name, n, args):  # NumPy makes the op's factor a float32 scalar, CuPy a 0-d array
        args = [np.asarray(a) if isinstance(a, np.float32) else a for a in args]
        emulator.launch(name, (2,), lce_k.THREADS, args + [np.int64(n)])

    monkeypatch.setattr(lce_k, "_launch", launch)
    monkeypatch.setattr(lce_k, "supports", lambda factor, *arrays: True)
    return lce_k


def check_finishing_kernels(lce_k, rng, factor, asarray=np.array, asnumpy=np.asarray):
    """scale_f16 and scale_add_f32 (with and without a target) against reference_scale, bit for bit;
    asarray / asnumpy move the inputs to the kernels' arrays and their results back."""
    gx, gw, target = finish_inputs(rng)
    f = np.asarray(factor, np.float32)
    ref_gx, ref_gw, ref_target = lce_k.reference_scale(gx, gw, f, target)
    ours_gx, ours_gw, ours_target, alone, dev_f = (asarray(a) for a in (gx, gw, target, gw, f))
    assert lce_k.supports(dev_f, ours_gx, ours_gw, ours_target)
    lce_k.scale_f16(ours_gx, dev_f)
    lce_k.scale_add_f32(ours_gw, dev_f, ours_target)
    np.testing.assert_array_equal(asnumpy(ours_gx), ref_gx)
    np.testing.assert_array_equal(asnumpy(ours_target), ref_target)  # target += gw * factor
    np.testing.assert_array_equal(asnumpy(ours_gw), gw)  # with a target, gw is left alone
    lce_k.scale_add_f32(alone, dev_f)
    np.testing.assert_array_equal(asnumpy(alone), ref_gw)  # without one, gw *= factor in place
    if factor != 1.0:
        assert not np.array_equal(ref_gx, gx) and not np.array_equal(ref_gw, gw)  # the case scales something


@pytest.mark.parametrize("factor", FACTORS)
def test_emulated_finishing_kernels_equal_the_reference_bit_for_bit(finish_emulated, rng, factor):
    check_finishing_kernels(finish_emulated, rng, factor)


@pytest.mark.parametrize("gy", [512.0, 700.0])
def test_emulated_fused_op_backward_equals_the_reference_op(finish_emulated, rng, gy):
    """FusedLinearCrossEntropy against LinearCrossEntropy (both NumPy float16 GEMMs): the same loss and
    gradients, bit for bit, when gy is the expected 512 (factor 1) and when it is not."""
    from tinygrad3.nn_ops.linear_cross_entropy import LinearCrossEntropy
    x, w = half(rng, (12, 16)), half(rng, (40, 16), 0.2)
    targets = rng.integers(0, 40, 12)
    targets[3] = -1
    results = []
    for cls in (finish_emulated.FusedLinearCrossEntropy, LinearCrossEntropy):
        ts = [Tensor(a, requires_grad=True) for a in (x, w)]
        loss = cls(-1, None, 5, expected_grad=512.0)(*ts, targets)
        loss.backward(np.asarray(gy, np.float32))
        results.append([loss.data, ts[0].grad, ts[1].grad])
    for ours, ref in zip(*results):
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("factor", FACTORS)
def test_finishing_kernels_equal_the_reference_bit_for_bit(gpu_xp, rng, factor):
    from tinygrad3.kernels import linear_cross_entropy as lce_k
    check_finishing_kernels(lce_k, rng, factor, gpu_xp.asarray, gpu_xp.asnumpy)


@pytest.mark.gpu
def test_fast_path_gradients_made_in_the_forward_for_another_gy(gpu_xp, rng):
    """The fast path's op (its finishing kernels) against the reference op with the same GEMMs, when
    the backward's gy is not the expected one: the same bits."""
    from tinygrad3.kernels import gemm, linear_cross_entropy as lce_k
    from tinygrad3.nn_ops.linear_cross_entropy import LinearCrossEntropy
    cp = gpu_xp
    x, w = cp.asarray(half(rng, (300, 64))), cp.asarray(half(rng, (512, 64), 0.2))
    targets = cp.asarray(rng.integers(0, 512, 300))
    results = []
    for cls in (lce_k.FusedLinearCrossEntropy, LinearCrossEntropy):
        ts = [Tensor(a, requires_grad=True) for a in (x, w)]
        loss = cls(-1, None, 128, cp.asarray(700.0, np.float32), gemm.mm)(*ts, targets)
        loss.backward(cp.asarray(1024.0, np.float32))
        results.append([cp.asnumpy(a) for a in (loss.data, ts[0].grad, ts[1].grad)])
    for ours, ref in zip(*results):
        np.testing.assert_array_equal(ours, ref)
    with fast(True):
        picked = F.linear_cross_entropy(Tensor(x, requires_grad=True), w, targets, expected_grad=2.0)
    assert isinstance(picked._creator, lce_k.FusedLinearCrossEntropy)
