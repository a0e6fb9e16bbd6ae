"""geglu's and rmsnorm's CUDA sources run on the CPU emulator (tests/cuda_emulator.py) through the
modules' own host code (path choice, alignment checks, grid sizes), against the NumPy references:
the 16-byte vector kernels and the scalar fallbacks (arrays off their vector boundary, GeGLU rows
not a multiple of 8, D not a multiple of 4).

The headers below replace each source's helper section (its vector loads and stores) with the same
accesses plus a check of the alignment the GPU needs: a vector access off its boundary aborts.
Outputs are filled with NaN bits before each launch, so an element nobody wrote shows.
"""
import functools
import itertools

import numpy as np
import pytest

import cuda_emulator
from tinygrad3.kernels import geglu, rmsnorm
from tinygrad3.kernels.cuda import HELPERS

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="the CUDA emulator needs g++ on x86-64")

TOL = 2e-3

CHECK = r"""
#undef __shared__
#define __shared__ static
""" + cuda_emulator.VECTOR_TYPES

GEGLU_HEADER = CHECK + r"""
__device__ __forceinline__ uint4 load16(const half_t* p) { emu_aligned(p, 16); uint4 v; memcpy(&v, p, 16); return v; }
__device__ __forceinline__ void store16(half_t* p, uint4 v) { emu_aligned(p, 16); memcpy(p, &v, 16); }
"""

# rmsnorm's source has no PTX section of its own (its vector accesses are kernels/cuda.py's VECTOR_IO,
# checked through VECTOR_TYPES): an empty one for the emulator to replace.
RMSNORM_HEADER = "// PTX_HELPERS_BEGIN\n// PTX_HELPERS_END\n" + CHECK


@functools.lru_cache(maxsize=None)
def _emulator(source):
    header = GEGLU_HEADER if source is geglu.SOURCE else RMSNORM_HEADER
    return cuda_emulator.Emulator(header + HELPERS + source)


def nan_fill(a):
    if isinstance(a, np.ndarray):
        a.view(np.uint8)[...] = 0xFF


def placed(values, offset):
    """values in a C-contiguous array starting `offset` bytes past a 16-byte boundary."""
    raw = np.empty(values.nbytes + 32, np.uint8)
    start = -raw.ctypes.data % 16 + offset
    a = raw[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
    a[...] = values
    return a


def close(actual, expected, tol, what):
    actual, expected = np.asarray(actual).astype(np.float64), np.asarray(expected).astype(np.float64)
    assert actual.shape == expected.shape and np.isfinite(actual).all(), f"{what}: inf/NaN (unwritten output?)"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(np.abs(expected).max(), 1e-30),
                               err_msg=what)


# ----- GeGLU ----------------------------------------------------------------------------------

@pytest.fixture
def geglu_emulated(monkeypatch):
    """Launches go to the emulator on a grid of at most 2 blocks (so the vector loop takes two
    vectors, then one); returns the kernel names launched."""
    launched = []

    def launch(name, blocks, args):
        launched.append(name)
        nan_fill(args[1 if name.startswith("geglu_fwd") else 2])  # y, or x's gradient
        _emulator(geglu.SOURCE).launch(name, (blocks,), geglu.THREADS, list(args))

    monkeypatch.setattr(geglu, "_launch", launch)
    monkeypatch.setattr(geglu, "_blocks", lambda n, per_sm: max(1, min(-(-n // geglu.THREADS), 2)))
    return launched


GEGLU_CASES = [  # (rows, columns of y, byte offset of the inputs, kernel suffix)
    (6, 2048, 0, "_vec"),             # 3 vectors a thread: the two-vector loop, then one
    (11, 1352, 0, "_vec"),            # some threads one vector fewer
    (7, 8, 0, "_vec"),                # one vector a row, fewer vectors than threads
    (1, 8, 0, "_vec"),                # one vector
    (5, 1021, 0, ""),                 # rows of 1021: not whole vectors, the scalar kernels
    (8, 700, 2, ""),                  # 2 bytes off: the scalar kernels
    (3, 800, 8, ""),                  # 8 bytes off
]


def packed_inputs(rng, rows, cols, offset):
    """x = [gate | up] (gate scaled 3, up 1) and gy (scaled 50), starting `offset` bytes off a boundary."""
    x = np.concatenate([3 * rng.standard_normal((rows, cols)), rng.standard_normal((rows, cols))], axis=1)
    return placed(x.astype(np.float16), offset), placed((50 * rng.standard_normal((rows, cols))).astype(np.float16),
                                                        offset)


@pytest.mark.parametrize("rows,cols,offset,kind", GEGLU_CASES)
def test_emulated_geglu(geglu_emulated, rng, rows, cols, offset, kind):
    x, gy = packed_inputs(rng, rows, cols, offset)
    y, ref_y = geglu.forward(x), geglu.reference_forward(x)
    gx, ref_gx = geglu.backward(gy, x), geglu.reference_backward(gy, x)
    assert geglu_emulated == ["geglu_fwd" + kind, "geglu_bwd" + kind]
    close(y, ref_y, TOL, "y")
    close(gx[:, :cols], ref_gx[:, :cols], TOL, "dgate")
    close(gx[:, cols:], ref_gx[:, cols:], TOL, "dup")
    # Every value goes through tanhf (the C library's here, CUDA's on the GPU, NumPy's in the reference),
    # which may differ in the last bit: nearly all values are equal bit for bit all the same.
    if y.size > 1000:
        for ours, ref in ((y, ref_y), (gx, ref_gx)):
            assert (ours == ref).mean() > 0.95


def test_emulated_geglu_paths_agree_bit_for_bit(geglu_emulated, rng):
    """The vector kernels and the scalar fallback compute each element with the same functions."""
    x, gy = packed_inputs(rng, 9, 600, 0)
    x2, gy2 = placed(x, 2), placed(gy, 2)
    vec = geglu.forward(x), geglu.backward(gy, x)
    fb = geglu.forward(x2), geglu.backward(gy2, x2)
    assert geglu_emulated == ["geglu_fwd_vec", "geglu_bwd_vec", "geglu_fwd", "geglu_bwd"]
    for a, b in zip(vec, fb):
        np.testing.assert_array_equal(a, b)


def test_emulated_geglu_one_misaligned_input_takes_the_fallback(geglu_emulated, rng):
    x, gy = packed_inputs(rng, 4, 64, 0)
    gy = placed(gy, 2)
    close(geglu.backward(gy, x), geglu.reference_backward(gy, x), TOL, "gx")
    assert geglu_emulated == ["geglu_bwd"]


# ----- RMSNorm --------------------------------------------------------------------------------

RMSNORM_DTYPES = [(np.float16, np.float16, np.float16), (np.float32, np.float32, np.float16),
                  (np.float32, np.float16, np.float16), (np.float16, np.float32, np.float16),
                  (np.float32, np.float32, np.float32)]


def tol_of(dtype):
    return TOL if dtype == np.float16 else 1e-5


@pytest.fixture
def rms_emulated(monkeypatch):
    """Launches go to the emulator, the backward on a grid of at most 3 blocks (so each warp takes
    several rows); returns the kernel names launched (rms_norm_dw left out)."""
    launched = []

    def launch(source, name, grid, block, args):
        assert any(source is rmsnorm.family_source(*t) for t in itertools.product(rmsnorm.DTYPES, repeat=3))
        if name != "rms_norm_dw":
            launched.append(name)
            outputs = {"rms_norm_fwd": (2, 3), "rms_norm_bwd": (5,)}[name.split("_v")[0]]
            for i in outputs:
                nan_fill(args[i])
            if name.startswith("rms_norm_bwd") and not args[-1]:  # gx: not added into
                nan_fill(args[4])
        _emulator(source).launch(name, grid, block[0] if len(block) == 1 else block, list(args))

    monkeypatch.setattr(rmsnorm, "_launch", launch)
    monkeypatch.setattr(rmsnorm, "_blocks", lambda rows, per_block, per_sm: max(1, min(-(-rows // per_block), 3)))
    return launched


RMSNORM_CASES = [  # (rows, D, byte offset of x, kernel suffix)
    (61, 640, 0, "_v5"),    # the model's hidden size: 5 groups a lane; 3 blocks of 8 warps, ~3 rows a warp
    (37, 256, 0, "_v2"),
    (30, 1000, 0, "_v8"),   # 250 groups: the last lanes hold 7
    (29, 100, 0, "_v1"),    # 25 groups: 7 lanes idle
    (9, 16, 0, "_v1"),
    (13, 30, 0, ""),        # D % 4 != 0: the per-row block kernels
    (11, 64, 8, ""),        # x 8 bytes off (float16: 4 values, aligned; float32: 2 values, not)
    (7, 640, 2, ""),        # x 2 bytes off (only for float16)
]


@pytest.mark.parametrize("x_dtype,w_dtype,y_dtype", RMSNORM_DTYPES)
@pytest.mark.parametrize("rows,d,offset,kind", RMSNORM_CASES)
def test_emulated_rmsnorm(rms_emulated, rng, rows, d, offset, kind, x_dtype, w_dtype, y_dtype):
    if offset % np.dtype(x_dtype).itemsize:
        pytest.skip("an offset of part of an element")
    if offset == 8 and x_dtype == np.float16:
        kind = "_v1"  # 8 bytes are four float16 values: still the vector path
    x = placed((3 * rng.standard_normal((rows, d))).astype(x_dtype), offset)
    w = (0.2 * rng.standard_normal(d)).astype(w_dtype)
    gy = (100 * rng.standard_normal((rows, d))).astype(y_dtype)
    y, rstd = rmsnorm.forward(x, w, 1e-6, y_dtype)
    ry, rrstd = rmsnorm.reference_forward(x, w, 1e-6, y_dtype)
    close(y, ry, tol_of(y_dtype), "y")
    close(rstd, rrstd, 1e-5, "rstd")
    gx, gw = rmsnorm.backward(gy, x, w, rstd)
    rgx, rgw = rmsnorm.reference_backward(gy, x, w, rrstd)
    assert gx.dtype == x_dtype and gw.dtype == w_dtype
    close(gx, rgx, tol_of(x_dtype), "dx")
    close(gw, rgw, tol_of(w_dtype) if w_dtype == np.float16 else 1e-4, "dw")
    assert rms_emulated == ["rms_norm_fwd" + kind, "rms_norm_bwd" + kind]


@pytest.mark.parametrize("x_dtype,w_dtype,y_dtype", RMSNORM_DTYPES)
@pytest.mark.parametrize("round_gy", [False, True])
@pytest.mark.parametrize("d", [640, 30])
def test_emulated_rmsnorm_backward_adds_into_targets(rms_emulated, rng, d, round_gy, x_dtype, w_dtype, y_dtype):
    """gx_into / dw_into: bit for bit the separate result rounded to the target's dtype, then added."""
    rows = 40
    x, w = (3 * rng.standard_normal((rows, d))).astype(x_dtype), (0.2 * rng.standard_normal(d)).astype(w_dtype)
    gy = (100 * rng.standard_normal((rows, d))).astype(y_dtype)
    _, rstd = rmsnorm.forward(x, w, 1e-6, y_dtype)
    gx, gw = rmsnorm.backward(gy, x, w, rstd, round_gy=round_gy)
    before_x = (5 * rng.standard_normal((rows, d))).astype(x_dtype)
    before_w = (5 * rng.standard_normal(d)).astype(w_dtype)
    into_x, into_w = before_x.copy(), before_w.copy()
    out_x, out_w = rmsnorm.backward(gy, x, w, rstd, round_gy=round_gy, gx_into=into_x, dw_into=into_w)
    assert out_x is into_x and out_w is into_w
    np.testing.assert_array_equal(into_x, before_x + gx)
    np.testing.assert_array_equal(into_w, before_w + gw)
    if round_gy:
        rgx, rgw = rmsnorm.reference_backward(gy.astype(x_dtype), x, w, rstd)
        close(gx, rgx, tol_of(x_dtype), "dx")
        close(gw, rgw, tol_of(w_dtype) if w_dtype == np.float16 else 1e-4, "dw")
    kind = "_v5" if d == 640 else ""
    assert rms_emulated == ["rms_norm_fwd" + kind] + ["rms_norm_bwd" + kind] * 2


@pytest.mark.parametrize("x_dtype,w_dtype", [(np.float16, np.float32), (np.float16, np.float16),
                                             (np.float32, np.float32)])
@pytest.mark.parametrize("d,h_offset,kind,branch_kind", [(640, 0, "_v5", "_v5"), (640, 8, "", "_v5"),
                                                       (36, 0, "_v1", "_v1"), (30, 0, "", "")])
def test_emulated_rmsnorm_residual_form(rms_emulated, rng, d, h_offset, kind, branch_kind, x_dtype, w_dtype):
    """y = h + the row rounded to x's dtype, float32; h off its 16-byte boundary takes the block kernel."""
    rows = 21
    x, w = (3 * rng.standard_normal((rows, d))).astype(x_dtype), (0.2 * rng.standard_normal(d)).astype(w_dtype)
    h = placed((10 * rng.standard_normal((rows, d))).astype(np.float32), h_offset)
    y, rstd = rmsnorm.forward(x, w, 1e-6, np.float32, residual=h)
    branch, _ = rmsnorm.forward(x, w, 1e-6, x_dtype)  # the same kernel's norm alone (when both take it)
    assert y.dtype == np.float32
    ry = h + rmsnorm.reference_forward(x, w, 1e-6, x_dtype)[0].astype(np.float32)
    close(y, ry, tol_of(x_dtype), "y")
    if kind == branch_kind:
        np.testing.assert_array_equal(y, h + branch.astype(np.float32))
    assert rms_emulated == ["rms_norm_fwd" + kind, "rms_norm_fwd" + branch_kind]
