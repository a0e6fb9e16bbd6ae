"""The flash_attention kernel family (tinygrad3/kernels/flash_attention.py).

On the CPU: the NumPy flash reference (the kernels' tile loops, online softmax, logsumexp
recompute and Drow identity) against the engine's reference attention, forward and backward,
in float64 (to rounding), float32 and float16; the tile ranges it visits against a brute-force
mask; `supports`; and the CUDA source itself, run by the CPU emulator in tests/cuda_emulator.py
(tensor-core fragments, shared-memory tiles, cp.async pipelining) against the reference.
Both layouts of O and dO: (B, Hq, Tq, D) and out_layout="bthd", (B, Tq, Hq, D), whose results
must be the first's transposed, to the bit.
On a GPU (`gpu` marker): the kernels against the reference on random float16 inputs, the
Gemma 3 270M shapes included (the mma.sync kernels, on Hopper too), and the Attention Function
with the family on (on Hopper, the wgmma build) against the reference path.
"""
import functools
import re
import shutil
import subprocess

import numpy as np
import pytest

import tinygrad3.functional as F
from tinygrad3 import Tensor, backend
from tinygrad3.kernels import attention, fast
from tinygrad3.kernels import flash_attention as flash
from tinygrad3.kernels.cuda import PRELUDE
from tinygrad3.nn_ops.attention import Attention, causal_mask

import cuda_emulator
from test_kernels import poison


def close(actual, expected, tol, what=""):
    """Equal within tol relative to the largest expected value (and finite: no unwritten output)."""
    actual = backend.to_numpy(actual).astype(np.float64)
    expected = backend.to_numpy(expected).astype(np.float64)
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: inf/NaN (unwritten output?)"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(np.abs(expected).max(), 1e-30),
                               err_msg=what)


def inputs(rng, b, hq, hkv, tq, tk, d, dtype=np.float16, gy_scale=1.0):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((b, hq, tq, d), (b, hkv, tk, d), (b, hkv, tk, d)))
    return q, k, v, (gy_scale * rng.standard_normal((b, hq, tq, d))).astype(dtype)


def engine(q, k, v, gy, scale, window, q_offset):
    """Output and (dq, dk, dv) of F.attention on the reference path."""
    tensors = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    with fast(False):
        out = F.attention(*tensors, scale, window=window, q_offset=q_offset)
        out.backward(gy)
    return out.data, [t.grad for t in tensors]


# (B, Hq, Hkv, Tq, Tk, D, window): grouped K/V, windows smaller and larger than a tile, queries at
# the end of longer keys (q_offset = Tk - Tq > 0), one query (generation), T not a multiple of
# any tile, several tiles each way (the online softmax rescales; some rows' first tile is masked)
CASES = [
    (2, 4, 1, 37, 37, 16, 8),
    (1, 4, 2, 130, 130, 32, None),
    (2, 4, 1, 5, 40, 32, 16),
    (1, 2, 1, 300, 300, 64, 128),
    (1, 2, 2, 70, 200, 16, 3),
    (1, 2, 2, 1, 200, 16, None),
    (1, 4, 1, 150, 150, 256, 40),
    (1, 2, 1, 96, 160, 128, 500),
    (1, 2, 1, 40, 40, 16, 2**31 - 1),   # a window wider than the keys hides nothing
]
TOLERANCES = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 4e-3}


# ----- CPU: the reference against the engine --------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", CASES)
def test_reference_matches_engine(rng, b, hq, hkv, tq, tk, d, window, dtype):
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, dtype)
    scale, offset = d ** -0.5, tk - tq
    out, grads = engine(q, k, v, gy, scale, window, offset)
    ro, lse = flash.reference_forward(q, k, v, scale, window, offset)
    tol = TOLERANCES[dtype]
    assert ro.dtype == dtype and lse.dtype == (np.float32 if dtype == np.float16 else dtype)
    close(ro, out, tol, "out")
    for name, ours, theirs in zip("qkv", flash.reference_backward(gy, q, k, v, ro, lse, scale, window, offset), grads):
        assert ours.dtype == dtype, name
        close(ours, theirs, tol, f"d{name}")


@pytest.mark.parametrize("window", [None, 8])
def test_reference_with_queries_before_the_last_keys(rng, window):
    """q_offset < Tk - Tq: the keys after the last query (two whole key tiles here) are seen by
    nobody, and their dK, dV are zero."""
    q, k, v, gy = inputs(rng, 1, 4, 2, 20, 200, 32, np.float64)
    out, grads = engine(q, k, v, gy, 0.3, window, 30)
    ro, lse = flash.reference_forward(q, k, v, 0.3, window, 30)
    close(ro, out, 1e-10, "out")
    for name, ours, theirs in zip("qkv", flash.reference_backward(gy, q, k, v, ro, lse, 0.3, window, 30), grads):
        close(ours, theirs, 1e-10, f"d{name}")
    assert not grads[1][:, :, 50:].any()


@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", CASES)
def test_reference_logsumexp(rng, b, hq, hkv, tq, tk, d, window):
    """L is log sum_j exp(S_ij) over the visible keys, computed directly in float64."""
    q, k, v, _ = inputs(rng, b, hq, hkv, tq, tk, d, np.float64)
    scale, offset = d ** -0.5, tk - tq
    s = scale * q @ np.swapaxes(k[:, np.arange(hq) // (hq // hkv)], -1, -2)
    s = np.where(causal_mask(np, tq, tk, offset, window), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    expected = (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]
    close(flash.reference_forward(q, k, v, scale, window, offset)[1], expected, 1e-12, "lse")


@pytest.mark.parametrize("tq,tk,window", [(300, 300, None), (300, 300, 128), (300, 300, 3), (70, 200, 3),
                                          (5, 40, 16), (1, 200, None), (96, 160, 500), (130, 130, 64)])
def test_visited_tiles_are_the_tiles_with_a_visible_entry(tq, tk, window):
    """Tile skipping is exact: every tile pair with a visible entry is visited (by the query tile's
    key loop and by the key tile's query loop), none without one."""
    offset = tk - tq
    seen = causal_mask(np, tq, tk, offset, window)
    for bq, bk in ((flash.FWD_BQ, flash.FWD_BK), (flash.DQ_BQ, flash.DQ_BK)):
        for i0 in range(0, tq, bq):
            wanted = {j0 // bk for j0 in range(0, tk, bk) if seen[i0:i0 + bq, j0:j0 + bk].any()}
            visited = set(flash.key_tiles(i0, tq, offset, window, bq, bk))
            assert visited == wanted, (i0, bq, bk)
    bk, bq = flash.KV_BK, flash.KV_BQ
    for j0 in range(0, tk, bk):
        wanted = {i0 // bq for i0 in range(0, tq, bq) if seen[i0:i0 + bq, j0:j0 + bk].any()}
        assert set(flash.query_tiles(j0, tq, tk, offset, window, bk, bq)) == wanted, j0


@pytest.mark.parametrize("tq,tk,window", [(300, 300, None), (300, 300, 128), (300, 300, 3), (70, 200, 3),
                                          (96, 160, 500), (256, 256, 64), (256, 256, 65), (256, 256, 95)])
def test_tiles_inside_the_mask(tq, tk, window):
    """The tiles whose per-entry mask test the kernels skip are exactly those where every entry is
    visible (and inside the arrays)."""
    offset = tk - tq
    for rows, keys in ((flash.FWD_BQ, flash.FWD_BK), (flash.DQ_BQ, flash.DQ_BK), (flash.KV_BQ, flash.KV_BK)):
        for i0 in range(0, tq, rows):
            for j0 in range(0, tk, keys):
                inside = i0 + rows <= tq and j0 + keys <= tk
                expected = inside and causal_mask(np, rows, keys, offset, window, i0, j0).all()
                assert flash.all_visible(i0, rows, j0, keys, tq, tk, offset, window) == expected, (i0, j0, rows)


def test_window_skips_most_tiles():
    """With a window of 512 over 1024 keys, a query tile visits at most 9 of the 16 key tiles."""
    visits = [len(flash.key_tiles(i0, 1024, 0, 512, 64, 64)) for i0 in range(0, 1024, 64)]
    assert max(visits) == 9 and sum(visits) == 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 * 8


def bthd(x):
    """An output or output gradient (B, Hq, Tq, D) as a contiguous (B, Tq, Hq, D) array."""
    return np.ascontiguousarray(backend.to_numpy(x).transpose(0, 2, 1, 3))


@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", CASES)
def test_reference_bthd_is_bhtd_transposed(rng, b, hq, hkv, tq, tk, d, window):
    """out_layout="bthd" only moves O and dO: the same numbers, O transposed, the same gradients."""
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d)
    scale, offset = d ** -0.5, tk - tq
    out, lse = flash.reference_forward(q, k, v, scale, window, offset)
    out_t, lse_t = flash.reference_forward(q, k, v, scale, window, offset, "bthd")
    assert out_t.shape == (b, tq, hq, d) and out_t.flags.c_contiguous
    np.testing.assert_array_equal(out_t, bthd(out))
    np.testing.assert_array_equal(lse_t, lse)
    grads = flash.reference_backward(gy, q, k, v, out, lse, scale, window, offset)
    grads_t = flash.reference_backward(bthd(gy), q, k, v, out_t, lse_t, scale, window, offset, "bthd")
    for name, ours, theirs in zip("qkv", grads_t, grads):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"d{name}")


def test_layout_errors(rng):
    q, k, v, gy = inputs(rng, 1, 2, 1, 3, 3, 16)
    with pytest.raises(ValueError, match="out_layout"):
        flash.reference_forward(q, k, v, 0.25, None, 0, "tbhd")
    with pytest.raises(ValueError, match="out_layout"):
        flash.forward(q, k, v, 0.25, None, 0, "BTHD")
    out, lse = flash.reference_forward(q, k, v, 0.25, None, 0)
    with pytest.raises(ValueError, match="bthd"):  # a bhtd gradient given as bthd
        flash.backward(gy, q, k, v, out, lse, 0.25, None, 0, out_layout="bthd")


def test_model_v_reaches_the_kernels_without_a_copy(xp, rng):
    """With one kv head the model's v, (B, T, 1, D) -> (B, 1, T, D), is a transposed view that is
    still C-contiguous (an axis of length 1 has no stride to speak of), so the kernels' inputs'
    ascontiguousarray leaves it as is."""
    x = xp.asarray(rng.standard_normal((2, 9, 256)).astype(np.float16))
    v = Tensor(x).reshape(2, 9, 1, 256).transpose(0, 2, 1, 3).data
    assert v.flags.c_contiguous and xp.shares_memory(xp.ascontiguousarray(v), x)


def test_supports():
    h = lambda *shape, dtype=np.float16: np.zeros(shape, dtype)  # noqa: E731
    assert flash.supports(h(2, 4, 8, 256), h(2, 1, 8, 256), h(2, 1, 8, 256), 512, 0)
    assert flash.supports(h(1, 2, 3, 16), h(1, 2, 9, 16), h(1, 2, 9, 16))               # q_offset 6
    assert not flash.supports(h(1, 2, 3, 16), h(1, 2, 9, 16), h(1, 2, 9, 16), None, 7)  # past the keys
    assert not flash.supports(h(1, 2, 3, 8), h(1, 2, 3, 8), h(1, 2, 3, 8))              # D < 16
    assert not flash.supports(h(1, 2, 3, 24), h(1, 2, 3, 24), h(1, 2, 3, 24))           # not a multiple of 16
    assert not flash.supports(h(1, 2, 3, 272), h(1, 2, 3, 272), h(1, 2, 3, 272))        # D > 256
    assert not flash.supports(h(1, 2, 3, 16), h(1, 2, 3, 16), h(1, 2, 3, 32))           # v's D differs
    assert not flash.supports(h(1, 2, 3, 16, dtype=np.float32), h(1, 2, 3, 16), h(1, 2, 3, 16))
    assert not flash.supports(h(1, 2, 0, 16), h(1, 2, 0, 16), h(1, 2, 0, 16))           # no queries


def test_shared_memory_fits_an_sm():
    for d in (16, 32, 64, 128, 256):
        assert max(flash.smem_bytes(d).values()) <= 227 * 1024, d


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
@pytest.mark.parametrize("d", [64, 256])
def test_kernels_compile_for_hopper_without_register_spills(tmp_path, d):
    """nvcc (ptxas) compiles all four kernels for sm_90 and spills no register to local memory
    (the D = 256 accumulators take some 128 of a thread's 255 registers)."""
    src = tmp_path / "flash.cu"
    src.write_text(PRELUDE + f"#define HEAD_DIM {d}\n" + flash.SOURCE)
    result = subprocess.run(["nvcc", "-arch=sm_90", "--std=c++17", "-Xptxas", "-v", "-c", str(src),
                             "-o", str(tmp_path / "flash.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    assert len(re.findall(r"Compiling entry function", report)) == 4, report
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == 4 and all(s == ("0", "0") for s in spills), report


# ----- CPU: the CUDA source on the emulator ----------------------------------------------------

@functools.lru_cache(maxsize=None)
def _emulator(d):
    return cuda_emulator.Emulator(f"#define HEAD_DIM {d}\n" + flash.SOURCE)


@pytest.fixture
def emulated(monkeypatch):
    """flash_attention's launches run on the CPU emulator (NumPy arrays in and out)."""
    if not cuda_emulator.available():
        pytest.skip("the CUDA emulator needs g++ on x86-64")
    mode = {"deferred": True, "reverse": False}

    def launch(d, name, grid, threads, args):
        emulator = _emulator(d)
        emulator.options(**mode)
        emulator.launch(name, grid, threads, args, flash.smem_bytes(d)[name])

    monkeypatch.setattr(flash, "_launch", launch)
    return mode


EMULATED_CASES = [  # kept small: the emulator runs some 10^5 warp instructions a second
    (2, 4, 1, 37, 37, 16, 8),
    (1, 4, 2, 130, 130, 32, None),
    (2, 4, 1, 5, 40, 32, 16),
    (1, 2, 2, 70, 200, 64, 3),
    (1, 2, 1, 70, 150, 128, None),
    (1, 4, 1, 150, 150, 256, 40),
    (1, 2, 1, 1, 100, 256, None),
    (1, 2, 1, 40, 40, 16, 2**31 - 1),
]


@pytest.mark.parametrize("deferred,reverse", [(True, False), (False, True)])
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", EMULATED_CASES)
def test_emulated_kernels_match_reference(emulated, rng, b, hq, hkv, tq, tk, d, window, deferred, reverse):
    """Copies landing late (when waited for) with warp 0 running ahead, and landing at once with
    the last warp running ahead: a missing wait or barrier gives stale or overwritten tiles."""
    emulated.update(deferred=deferred, reverse=reverse)
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, gy_scale=100)
    scale, offset = d ** -0.5, tk - tq
    out, lse = flash.forward(q, k, v, scale, window, offset)
    ro, rlse = flash.reference_forward(q, k, v, scale, window, offset)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    close(out, ro, 2e-3, "out")
    close(lse, rlse, 1e-5, "lse")
    grads = flash.backward(gy, q, k, v, out, lse, scale, window, offset)
    for name, ours, ref in zip("qkv", grads, flash.reference_backward(gy, q, k, v, ro, rlse, scale, window, offset)):
        assert ours.dtype == np.float16, name
        close(ours, ref, 4e-3, f"d{name}")


@pytest.mark.parametrize("window", [None, 8])
def test_emulated_queries_before_the_last_keys(emulated, rng, window):
    q, k, v, gy = inputs(rng, 1, 4, 2, 20, 200, 32, gy_scale=100)
    out, lse = flash.forward(q, k, v, 0.3, window, 30)
    ro, rlse = flash.reference_forward(q, k, v, 0.3, window, 30)
    close(out, ro, 2e-3, "out")
    grads = flash.backward(gy, q, k, v, out, lse, 0.3, window, 30)
    for name, ours, ref in zip("qkv", grads, flash.reference_backward(gy, q, k, v, ro, rlse, 0.3, window, 30)):
        close(ours, ref, 4e-3, f"d{name}")
    assert not grads[1][:, :, 50:].any() and not grads[2][:, :, 50:].any()


def test_emulated_backward_computes_only_what_is_needed(emulated, rng):
    q, k, v, gy = inputs(rng, 1, 2, 1, 20, 20, 32)
    out, lse = flash.forward(q, k, v, 0.2, None, 0)
    gq, gk, gv = flash.backward(gy, q, k, v, out, lse, 0.2, None, 0, needs_grad=(False, True, False))
    assert gq is None and gv is None and gk.shape == k.shape


# The layout (B, Tq, Hq, D) of O and dO: batches, several heads, grouped K/V, windows, queries
# after earlier keys, the 8-warp dK/dV split (D = 256)
BTHD_CASES = [
    (2, 4, 1, 37, 37, 16, 8),
    (2, 4, 2, 5, 40, 32, 16),
    (1, 4, 2, 130, 130, 32, None),
    (2, 2, 1, 70, 70, 64, 3),
    (2, 4, 1, 40, 72, 256, 24),
    (2, 2, 1, 1, 100, 256, None),
]


@pytest.mark.parametrize("deferred,reverse", [(True, False), (False, True)])
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", BTHD_CASES)
def test_emulated_bthd_matches_bhtd(emulated, rng, b, hq, hkv, tq, tk, d, window, deferred, reverse):
    """The kernels with O and dO in (B, Tq, Hq, D): the bhtd results to the bit (only addresses
    change), and the reference attention of the engine to float16 rounding."""
    emulated.update(deferred=deferred, reverse=reverse)
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, gy_scale=100)
    scale, offset = d ** -0.5, tk - tq
    out, lse = flash.forward(q, k, v, scale, window, offset)
    out_t, lse_t = flash.forward(q, k, v, scale, window, offset, "bthd")
    assert out_t.shape == (b, tq, hq, d)
    np.testing.assert_array_equal(out_t, bthd(out))
    np.testing.assert_array_equal(lse_t, lse)
    grads = flash.backward(gy, q, k, v, out, lse, scale, window, offset)
    grads_t = flash.backward(bthd(gy), q, k, v, out_t, lse_t, scale, window, offset, out_layout="bthd")
    for name, ours, theirs in zip("qkv", grads_t, grads):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"d{name}")
    ref_out, ref_grads = engine(q, k, v, gy, scale, window, offset)
    close(out_t, bthd(ref_out), 4e-3, "out")
    for name, ours, theirs in zip("qkv", grads_t, ref_grads):
        close(ours, theirs, 4e-3, f"d{name}")


@pytest.mark.parametrize("window", [None, 8])
def test_emulated_bthd_queries_before_the_last_keys(emulated, rng, window):
    """q_offset < Tk - Tq in the bthd layout, against the reference (in that layout)."""
    q, k, v, gy = inputs(rng, 2, 4, 2, 20, 200, 32, gy_scale=100)
    gy = bthd(gy)
    out, lse = flash.forward(q, k, v, 0.3, window, 30, "bthd")
    ro, rlse = flash.reference_forward(q, k, v, 0.3, window, 30, "bthd")
    close(out, ro, 2e-3, "out")
    grads = flash.backward(gy, q, k, v, out, lse, 0.3, window, 30, out_layout="bthd")
    ref = flash.reference_backward(gy, q, k, v, ro, rlse, 0.3, window, 30, "bthd")
    for name, ours, theirs in zip("qkv", grads, ref):
        close(ours, theirs, 4e-3, f"d{name}")
    assert not grads[1][:, :, 50:].any() and not grads[2][:, :, 50:].any()


# ----- GPU: the kernels against the reference; the fast path against the reference path -------

@pytest.fixture
def mma_sync(monkeypatch):
    """The mma.sync kernels of flash_attention.py even on Hopper, where forward and backward
    would launch the wgmma build (tested in test_flash_attention_sm90.py)."""
    monkeypatch.setattr(flash, "_use_hopper", lambda q, d: False)


GPU_CASES = CASES + [
    (2, 4, 1, 1024, 1024, 256, 512),   # Gemma 3 270M: sliding-window layers
    (2, 4, 1, 1024, 1024, 256, None),  # and full-attention layers
    (4, 4, 1, 128, 128, 256, 512),     # the 32 x 128 rows' length
    (1, 4, 1, 7, 1030, 256, 512),      # generation with a KV cache: 7 queries after 1023 keys
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", GPU_CASES)
def test_flash_kernels(gpu_xp, mma_sync, rng, b, hq, hkv, tq, tk, d, window):
    cp = gpu_xp
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, gy_scale=100)
    scale, offset = d ** -0.5, tk - tq
    poison(cp, (q.shape, np.float16), (q.shape[:3], np.float32))
    out, lse = flash.forward(*(cp.asarray(a) for a in (q, k, v)), scale, window, offset)
    ro, rlse = flash.reference_forward(q, k, v, scale, window, offset)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    close(out, ro, 2e-3, "out")
    close(lse, rlse, 1e-5, "lse")
    poison(cp, (q.shape, np.float16), (k.shape, np.float16), (v.shape, np.float16))
    grads = flash.backward(*(cp.asarray(a) for a in (gy, q, k, v)), out, lse, scale, window, offset)
    for name, ours, ref in zip("qkv", grads, flash.reference_backward(gy, q, k, v, ro, rlse, scale, window, offset)):
        assert ours.dtype == np.float16, name
        close(ours, ref, 4e-3, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", GPU_CASES + [(3, 4, 1, 1024, 1024, 256, 512)])
def test_flash_kernels_bthd(gpu_xp, mma_sync, rng, b, hq, hkv, tq, tk, d, window):
    """O and dO in (B, Tq, Hq, D): against the reference in that layout, and to the bit against
    the kernels in (B, Hq, Tq, D)."""
    cp = gpu_xp
    q, k, v, gy = inputs(rng, b, hq, hkv, tq, tk, d, gy_scale=100)
    gy_t = bthd(gy)
    scale, offset = d ** -0.5, tk - tq
    qkv = [cp.asarray(a) for a in (q, k, v)]
    poison(cp, (q.shape, np.float16), (q.shape[:3], np.float32))
    out, lse = flash.forward(*qkv, scale, window, offset, "bthd")
    ro, rlse = flash.reference_forward(q, k, v, scale, window, offset, "bthd")
    assert out.shape == (b, tq, hq, d) and out.flags.c_contiguous
    close(out, ro, 2e-3, "out")
    close(lse, rlse, 1e-5, "lse")
    poison(cp, (q.shape, np.float16), (k.shape, np.float16), (v.shape, np.float16))
    grads = flash.backward(cp.asarray(gy_t), *qkv, out, lse, scale, window, offset, out_layout="bthd")
    ref = flash.reference_backward(gy_t, q, k, v, ro, rlse, scale, window, offset, "bthd")
    for name, ours, theirs in zip("qkv", grads, ref):
        close(ours, theirs, 4e-3, f"d{name}")
    out_h, lse_h = flash.forward(*qkv, scale, window, offset)
    np.testing.assert_array_equal(backend.to_numpy(out), bthd(out_h))
    grads_h = flash.backward(cp.asarray(gy), *qkv, out_h, lse_h, scale, window, offset)
    for name, ours, theirs in zip("qkv", grads, grads_h):
        np.testing.assert_array_equal(backend.to_numpy(ours), backend.to_numpy(theirs), err_msg=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 8])
def test_flash_kernels_queries_before_the_last_keys(gpu_xp, mma_sync, rng, window):
    cp = gpu_xp
    q, k, v, gy = inputs(rng, 1, 4, 2, 20, 200, 32, gy_scale=100)
    poison(cp, (q.shape, np.float16), (k.shape, np.float16), (v.shape, np.float16))
    out, lse = flash.forward(*(cp.asarray(a) for a in (q, k, v)), 0.3, window, 30)
    ro, rlse = flash.reference_forward(q, k, v, 0.3, window, 30)
    close(out, ro, 2e-3, "out")
    grads = flash.backward(*(cp.asarray(a) for a in (gy, q, k, v)), out, lse, 0.3, window, 30)
    for name, ours, ref in zip("qkv", grads, flash.reference_backward(gy, q, k, v, ro, rlse, 0.3, window, 30)):
        close(ours, ref, 4e-3, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", CASES[:6] + [(2, 4, 1, 1024, 1024, 256, 512),
                                                                  (2, 4, 1, 256, 256, 256, None)])
def test_flash_fast_path_equals_reference_path(gpu_xp, rng, b, hq, hkv, tq, tk, d, window):
    """F.attention with the family on (the flash kernels, checked) against the reference path
    (float32 scores with xp.matmul), forward and gradients, v through a transposed view as the
    model gives it."""
    cp = gpu_xp
    q, k, _, gy = (cp.asarray(a) for a in inputs(rng, b, hq, hkv, tq, tk, d))
    v = cp.asarray(rng.standard_normal((b, tk, hkv, d)).astype(np.float16)).transpose(0, 2, 1, 3)
    fn = lambda q, k, v: F.attention(q, k, v, d ** -0.5, window=window)  # noqa: E731

    def run():
        tensors = [Tensor(a, requires_grad=True) for a in (q, k, v)]
        out = fn(*tensors)
        kernel = type(out._creator)
        out.backward(gy)
        return kernel, out.data, [t.grad for t in tensors]

    with fast(False):
        _, ref_out, ref_grads = run()
    with fast(True, families=("flash_attention",)):
        kernel, out, grads = run()
    assert kernel is flash.FlashAttention
    close(out, ref_out, 4e-3, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == np.float16 and g.shape == rg.shape, name
        close(g, rg, 5e-3, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("families", [("flash_attention",), ("attention",)])
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", [(2, 4, 1, 37, 37, 16, 8), (1, 4, 2, 5, 40, 32, None),
                                                      (2, 4, 1, 1024, 1024, 256, 512),
                                                      (2, 4, 1, 1024, 1024, 256, None)])
def test_fast_path_bthd_equals_reference_path(gpu_xp, rng, families, b, hq, hkv, tq, tk, d, window):
    """F.attention(..., out_layout="bthd") on a fast family against the reference path in the
    same layout, forward and gradients; v a transposed view as the model gives it."""
    cp = gpu_xp
    q, k, _, gy = (cp.asarray(a) for a in inputs(rng, b, hq, hkv, tq, tk, d))
    gy = cp.ascontiguousarray(gy.transpose(0, 2, 1, 3))
    v = cp.asarray(rng.standard_normal((b, tk, hkv, d)).astype(np.float16)).transpose(0, 2, 1, 3)

    def run():
        tensors = [Tensor(a, requires_grad=True) for a in (q, k, v)]
        out = F.attention(*tensors, d ** -0.5, window=window, q_offset=tk - tq, out_layout="bthd")
        kernel = type(out._creator)
        out.backward(gy)
        return kernel, out.data, [t.grad for t in tensors]

    with fast(False):
        _, ref_out, ref_grads = run()
    with fast(True, families=families):
        kernel, out, grads = run()
    assert kernel is (flash.FlashAttention if families == ("flash_attention",) else attention.FusedAttention)
    assert out.shape == (b, tq, hq, d) and out.flags.c_contiguous
    close(out, ref_out, 4e-3, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == np.float16 and g.shape == rg.shape, name
        close(g, rg, 5e-3, f"d{name}")


@pytest.mark.gpu
def test_flash_declines_to_the_attention_family(gpu_xp, rng):
    """A head size the kernels do not take (D = 8) goes to the `attention` family when it is on,
    to the reference path when it is not; either way the result is attention's."""
    cp = gpu_xp
    arrays = [cp.asarray(a) for a in inputs(rng, 1, 2, 1, 9, 9, 8)[:3]]
    with fast(True, families=("flash_attention", "attention")):
        out = F.attention(*(Tensor(a, requires_grad=True) for a in arrays), 0.3, window=4)
        assert type(out._creator) is attention.FusedAttention
    with fast(True, families=("flash_attention",)):
        assert type(F.attention(*(Tensor(a, requires_grad=True) for a in arrays), 0.3, window=4)._creator) is Attention
