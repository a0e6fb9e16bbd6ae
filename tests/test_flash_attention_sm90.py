"""The Hopper build of the flash kernels (tinygrad3/kernels/flash_attention_sm90.py), which
flash_attention.forward and backward launch on compute capability 9.0 for D a multiple of 64.

On the CPU: the CUDA source on the emulator (tests/cuda_emulator.py, whose wgmma model
tests/test_wgmma.py ties to the hardware) against the NumPy reference, through
flash_attention.forward and backward with the Hopper build chosen, copies landing late or at
once, warps in either order; both layouts of O, bit for bit.
On a GPU of compute capability 9.0 (`gpu` marker): the same against the reference on random
inputs, the Gemma 3 270M shapes included; that the Hopper build is the one that runs; that its
kernels keep their accumulators in registers (no local memory); that repeated runs agree bit for bit.
"""
import functools

import numpy as np
import pytest

from tinygrad3.kernels import flash_attention as flash
from tinygrad3.kernels import flash_attention_sm90 as sm90

import cuda_emulator
from test_flash_attention import bthd, close, emulated, inputs  # noqa: F401  (emulated: a fixture)
from test_kernels import poison


@functools.lru_cache(maxsize=None)
def _emulator(d):
    return cuda_emulator.Emulator(cuda_emulator.VECTOR_TYPES + sm90.source(d))


@pytest.fixture
def hopper(emulated, monkeypatch):  # noqa: F811  (the imported fixture)
    """flash_attention picks the Hopper build, whose launches run on the emulator (the Drow
    kernel on flash_attention's, through `emulated`); returns the mode and the names launched."""
    launched = []

    def launch(d, name, grid, args):
        launched.append(name)
        emulator = _emulator(d)
        emulator.options(**emulated)
        emulator.launch(name, grid, sm90.THREADS, args, sm90.smem_bytes(d)[name])

    monkeypatch.setattr(flash, "_use_hopper", lambda q, d: d % 64 == 0)
    monkeypatch.setattr(sm90, "_launch", launch)
    return emulated, launched


def check(q, k, v, gy, scale, window, offset, layout="bhtd", xp=np):
    """forward and backward against the reference, in `layout`; returns the results."""
    arrays = [xp.asarray(a) for a in (q, k, v)]
    out, lse = flash.forward(*arrays, scale, window, offset, layout)
    ro, rlse = flash.reference_forward(q, k, v, scale, window, offset, layout)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    close(out, ro, 2e-3, "out")
    close(lse, rlse, 1e-5, "lse")
    grads = flash.backward(xp.asarray(gy), *arrays, out, lse, scale, window, offset, out_layout=layout)
    for name, ours, ref in zip("qkv", grads, flash.reference_backward(gy, q, k, v, ro, rlse, scale, window, offset,
                                                                       layout)):
        assert ours.dtype == np.float16, name
        close(ours, ref, 4e-3, f"d{name}")
    return out, lse, grads


# (B, Hq, Hkv, Tq, Tk, D, window): as test_flash_attention's cases, for D in 64, 128, 192, 256: one
# 128-query tile and several, key tiles of 32 and 64 partly masked, windows narrower and wider
# than a tile, grouped K/V, queries after earlier keys, one query
EMULATED_CASES = [
    (2, 4, 1, 37, 37, 64, 8),
    (1, 4, 2, 130, 130, 64, None),
    (2, 4, 1, 5, 40, 64, 16),
    (1, 2, 2, 70, 200, 64, 3),
    (1, 2, 1, 1, 200, 64, None),
    (1, 2, 1, 96, 160, 128, 500),
    (1, 4, 1, 150, 150, 256, 40),
    (1, 2, 1, 1, 100, 256, None),
    (1, 2, 1, 70, 70, 192, 20),      # 24 chunks a row: load_sw's general loop
    (1, 2, 1, 40, 40, 64, 2**31 - 1),
]


@pytest.mark.parametrize("deferred,reverse", [(True, False), (False, True)])
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", EMULATED_CASES)
def test_emulated_kernels_match_reference(hopper, rng, b, hq, hkv, tq, tk, d, window, deferred, reverse):
    """Copies landing late with warp 0 ahead, and at once with the last warp ahead: a missing
    cp.async wait, barrier or wgmma wait gives stale or overwritten tiles."""
    mode, launched = hopper
    mode.update(deferred=deferred, reverse=reverse)
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, gy_scale=100)
    check(q, k, v, gy, d ** -0.5, window, tk - tq)
    assert launched == ["flash_fwd_sm90", "flash_bwd_dq_sm90", "flash_bwd_dkdv_sm90"]


@pytest.mark.parametrize("window", [None, 8])
def test_emulated_queries_before_the_last_keys(hopper, rng, window):
    """q_offset < Tk - Tq (keys after the last query): they get zero gradients."""
    q, k, v, gy = inputs(rng, 1, 4, 2, 20, 200, 64, gy_scale=100)
    _, _, grads = check(q, k, v, gy, 0.3, window, 30)
    assert not grads[1][:, :, 50:].any() and not grads[2][:, :, 50:].any()


@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", [(2, 4, 2, 70, 70, 64, 3), (2, 4, 1, 40, 72, 256, 24)])
def test_emulated_bthd_matches_bhtd(hopper, rng, b, hq, hkv, tq, tk, d, window):
    """O and dO in (B, Tq, Hq, D): the (B, Hq, Tq, D) results to the bit (only addresses change)."""
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, gy_scale=100)
    scale, offset = d ** -0.5, tk - tq
    out, lse, grads = check(q, k, v, gy, scale, window, offset)
    out_t, lse_t, grads_t = check(q, k, v, bthd(gy), scale, window, offset, "bthd")
    np.testing.assert_array_equal(out_t, bthd(out))
    np.testing.assert_array_equal(lse_t, lse)
    for name, ours, theirs in zip("qkv", grads_t, grads):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"d{name}")


def test_emulated_backward_launches_only_what_is_needed(hopper, rng):
    _, launched = hopper
    q, k, v, gy = inputs(rng, 1, 2, 1, 20, 20, 64)
    out, lse = flash.forward(q, k, v, 0.2, None, 0)
    gq, gk, gv = flash.backward(gy, q, k, v, out, lse, 0.2, None, 0, needs_grad=(True, False, False))
    assert gk is None and gv is None and gq.shape == q.shape
    assert launched == ["flash_fwd_sm90", "flash_bwd_dq_sm90"]


def test_shared_memory_fits_an_sm():
    for d in (64, 128, 256):
        assert max(sm90.smem_bytes(d).values()) <= 227 * 1024, d


# ----- GPU (compute capability 9.0) --------------------------------------------------------------

@pytest.fixture
def hopper_gpu(gpu_xp, monkeypatch):
    """cupy on a compute capability 9.0 GPU, with the names of the Hopper kernels launched."""
    if int(gpu_xp.cuda.Device().compute_capability) != 90:
        pytest.skip("the Hopper build needs compute capability 9.0")
    launched = []
    launch = sm90._launch

    def recording(d, name, grid, args):
        launched.append(name)
        launch(d, name, grid, args)

    monkeypatch.setattr(sm90, "_launch", recording)
    return gpu_xp, launched


GPU_CASES = EMULATED_CASES + [
    (1, 2, 1, 300, 300, 64, 128),
    (2, 4, 1, 1024, 1024, 256, 512),   # Gemma 3 270M: sliding-window layers
    (2, 4, 1, 1024, 1024, 256, None),  # and full-attention layers
    (4, 4, 1, 128, 128, 256, 512),     # the 32 x 128 rows' length
    (1, 4, 1, 2048, 2048, 256, 512),
    (1, 4, 1, 7, 1030, 256, 512),      # generation with a KV cache: 7 queries after 1023 keys
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", GPU_CASES)
def test_hopper_kernels(hopper_gpu, rng, b, hq, hkv, tq, tk, d, window, layout):
    cp, launched = hopper_gpu
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, gy_scale=100)
    gy = gy if layout == "bhtd" else bthd(gy)
    poison(cp, (q.shape, np.float16), (k.shape, np.float16), (q.shape[:3], np.float32))
    check(q, k, v, gy, d ** -0.5, window, tk - tq, layout, cp)
    assert launched == ["flash_fwd_sm90", "flash_bwd_dq_sm90", "flash_bwd_dkdv_sm90"]


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 8])
def test_hopper_queries_before_the_last_keys(hopper_gpu, rng, window):
    cp, _ = hopper_gpu
    q, k, v, gy = inputs(rng, 1, 4, 2, 20, 200, 64, gy_scale=100)
    _, _, grads = check(q, k, v, gy, 0.3, window, 30, xp=cp)
    assert not grads[1][:, :, 50:].any() and not grads[2][:, :, 50:].any()


@pytest.mark.gpu
def test_hopper_build_only_for_multiples_of_64(hopper_gpu, rng):
    cp, launched = hopper_gpu
    q, k, v, _ = inputs(rng, 1, 2, 1, 9, 9, 32)
    flash.forward(*(cp.asarray(a) for a in (q, k, v)), 0.3, None, 0)
    assert launched == []


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])
def test_hopper_kernels_use_no_local_memory(hopper_gpu, d):
    """No accumulator spilled: every kernel's local memory (spills, indexed register arrays)
    is 0 bytes a thread."""
    from cupy_backends.cuda.api import driver
    from tinygrad3.kernels.cuda import kernel_sm90a
    for name, shared in sm90.smem_bytes(d).items():
        fn = kernel_sm90a(sm90.source(d), name, shared)
        assert driver.funcGetAttribute(3, fn.ptr) == 0, name   # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 512])
def test_hopper_kernels_repeat_bit_for_bit(hopper_gpu, rng, window):
    """No atomics and a fixed order of float32 sums: 20 runs on the same inputs give the same bits.
    A missing barrier or wgmma wait (a tile read while it is overwritten) shows as runs that differ."""
    cp, _ = hopper_gpu
    q, k, v, gy = (cp.asarray(a) for a in inputs(rng, 4, 4, 1, 1024, 1024, 256, gy_scale=100))
    first = None
    for _ in range(20):
        out, lse = flash.forward(q, k, v, 1 / 16, window, 0)
        got = [out, lse, *flash.backward(gy, q, k, v, out, lse, 1 / 16, window, 0)]
        if first is None:
            first = [a.copy() for a in got]
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, first):
            assert cp.array_equal(a.view(cp.uint16 if a.dtype == cp.float16 else cp.uint32),
                                  b.view(cp.uint16 if b.dtype == cp.float16 else cp.uint32)), name
