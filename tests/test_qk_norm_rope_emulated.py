"""qk_norm_rope's CUDA source run on the CPU emulator (tests/cuda_emulator.py) through the module's own host
code (forward, backward: layout choice, alignment checks, grid sizes), against the NumPy reference.

The emulator runs blocks one at a time, so static __shared__ arrays become `static` (one copy, shared by
the block's fibers, as on the GPU); block_sum (from the CUDA prelude, which the emulator replaces) and the
vector types come from the header below. rmsnorm's rms_norm_dw (a 2-D block, which the emulator does not
run) is replaced by a NumPy sum of the per-block partials: the kernels' part is what they write there.
"""
import functools

import numpy as np
import pytest

import cuda_emulator
from tinygrad3.kernels import qk_norm_rope as qk
from tinygrad3.kernels.cuda import HELPERS
from tinygrad3.nn_ops.rope import rope_tables

HEADER = r"""
// PTX_HELPERS_BEGIN
// PTX_HELPERS_END
#undef __shared__
#define __shared__ static
""" + cuda_emulator.VECTOR_TYPES


@functools.lru_cache(maxsize=None)
def _emulator(w_dtype):
    return cuda_emulator.Emulator(HEADER + HELPERS + qk.typed_source(np.dtype(w_dtype)))


@pytest.fixture
def emulated(monkeypatch):
    if not cuda_emulator.available():
        pytest.skip("the CUDA emulator needs g++ on x86-64")
    launched = []

    def launch(source, name, blocks, threads, args):
        w_dtype = args[1 if name.startswith("qk_norm_rope_fwd") else 2].dtype
        assert source is qk.typed_source(w_dtype)
        launched.append(name)
        # a strided view (gy) goes in as its first element: the kernel gets the same address, as on the GPU
        args = [np.lib.stride_tricks.as_strided(a, (1,), (1,)) if isinstance(a, np.ndarray) and
                not a.flags.c_contiguous else a for a in args]
        _emulator(w_dtype).launch(name, (blocks,), threads, args)

    monkeypatch.setattr(qk, "_launch", launch)
    monkeypatch.setattr(qk, "_blocks", lambda rows, per_block, per_sm: max(1, min(-(-rows // per_block), 3)))
    monkeypatch.setattr(qk, "_sum_partials", lambda source, part, w_dtype, into=None: part.sum(axis=0).astype(w_dtype))
    return launched


def close(actual, expected, tol, what):
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    assert actual.shape == expected.shape and np.isfinite(actual).all(), what
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=what)


def misaligned(a):
    """a's values in a C-contiguous array that starts 2 bytes past an 8-byte boundary."""
    buf = np.empty(a.size + 4, a.dtype)
    start = next(i for i in range(4) if (buf.ctypes.data + i * a.itemsize) % 8 == 2)
    out = buf[start:start + a.size].reshape(a.shape)
    out[...] = a
    return out


CASES = [  # (B, T, H, D, gy layout, expected kernel suffix); a 3-block grid, so the row loop runs several times
    (2, 9, 4, 256, "transposed", "_v1"),     # 270M: q heads, one row per warp
    (2, 9, 1, 256, "dense", "_v1"),          # 270M: the KV head
    (1, 7, 3, 32, "dense", "_v1"),           # 4 lanes a row, 8 rows a warp, the last warp partly past the rows
    (1, 5, 2, 24, "transposed", "_v1"),      # 3 groups on 4 lanes: one idle lane per row
    (1, 4, 2, 640, "dense", "_v4"),          # 80 groups: 3 per lane, some lanes 2
    (1, 3, 2, 1024, "dense", "_v4"),         # MAX_DIM
    (1, 5, 2, 512, "strided", "_v2"),        # gy with feature stride 2: the scalar gy path
    (2, 9, 4, 256, "misaligned", "_v1"),     # gy 2 bytes off: the scalar gy path
    (1, 6, 2, 20, "dense", ""),              # D % 8 != 0: the fallback kernels
]


@pytest.mark.parametrize("w_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b,t,h,d,gy_layout,kind", CASES)
def test_emulated_qk_norm_rope(emulated, rng, b, t, h, d, gy_layout, kind, w_dtype):
    x = (3 * rng.standard_normal((b, t, h, d))).astype(np.float16)
    w = (0.2 * rng.standard_normal(d)).astype(w_dtype)
    cos, sin = (a[5:5 + t] for a in rope_tables(d, 1e4, 5 + t, np))
    y, rstd = qk.forward(x, w, 1e-6, cos, sin)
    ry, rrstd = qk.reference_forward(x, w, 1e-6, cos, sin)
    close(y, ry, 2e-3, "y")
    close(rstd, rrstd, 1e-5, "rstd")

    gy = (100 * rng.standard_normal((b, h, t, d))).astype(np.float16)
    if gy_layout == "transposed":   # (B, T, H, D) memory read as (B, H, T, D)
        gy = np.ascontiguousarray(gy.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    elif gy_layout == "strided":
        wide = np.zeros((b, h, t, 2 * d), np.float16)
        wide[..., ::2] = gy
        gy = wide[..., ::2]
    elif gy_layout == "misaligned":
        gy = misaligned(gy)
    gx, gw = qk.backward(gy, x, w, cos, sin, rstd)
    rgx, rgw = qk.reference_backward(np.asarray(gy), x, w, cos, sin, rrstd)
    assert gx.dtype == np.float16 and gw.dtype == w_dtype
    close(gx, rgx, 2e-3, "dx")
    close(gw, rgw, 2e-3 if w_dtype == np.float16 else 1e-4, "dw")
    assert emulated == ["qk_norm_rope_fwd" + kind, "qk_norm_rope_bwd" + kind]


def test_emulated_misaligned_x_takes_the_fallback(emulated, rng):
    x = misaligned((3 * rng.standard_normal((1, 4, 2, 64))).astype(np.float16))
    w = (0.2 * rng.standard_normal(64)).astype(np.float32)
    cos, sin = (a[:4] for a in rope_tables(64, 1e4, 4, np))
    y, rstd = qk.forward(x, w, 1e-6, cos, sin)
    close(y, qk.reference_forward(x, w, 1e-6, cos, sin)[0], 2e-3, "y")
    assert emulated == ["qk_norm_rope_fwd"]


def test_vector_layout():
    assert qk.vector_layout(256) == (1, 32)
    assert qk.vector_layout(32) == (1, 4)
    assert qk.vector_layout(24) == (1, 4)
    assert qk.vector_layout(8) == (1, 1)
    assert qk.vector_layout(512) == (2, 32)
    assert qk.vector_layout(520) == (4, 32)
    assert qk.vector_layout(1024) == (4, 32)
    assert qk.vector_layout(20) is None and qk.vector_layout(1032) is None
