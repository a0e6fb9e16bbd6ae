"""The embedding-backward kernel (tinygrad3/kernels/embedding.py).

CPU: the NumPy reference against a plain loop and against the engine's Embedding gradient; the CUDA
source run on the CPU emulator (tests/cuda_emulator.py) through the module's own host code (path
choice, alignment checks), against the reference. GPU (`gpu` marker): the kernel against the
reference, and F.embedding's weight gradient with the family on against the reference path.

`out` starts random (the kernel adds into it) and sits between guard bytes of NaN bits, which must
come back unchanged: every row is compared, written or not, and nothing outside `out` is written.
"""
import functools

import numpy as np
import pytest

import cuda_emulator
import tinygrad3.functional as F
from tinygrad3 import Tensor, backend
from tinygrad3.kernels import embedding, fast

GUARD = 64  # bytes of NaN bits on each side of out

# The emulator replaces the source's helper section (the sm_90 vector atomic): the same four adds,
# with the 16-byte alignment the vector atomic needs checked.
HEADER = cuda_emulator.VECTOR_TYPES + r"""
__device__ __forceinline__ void atomic_add4(float* dst, const float v[4]) {
    if ((uintptr_t)dst % 16) emu_fail("misaligned 16-byte atomic");
    for (int k = 0; k < 4; ++k) atomicAdd(dst + k, v[k]);
}
"""


def placed(xp, values, misalign=0):
    """(a, check): a copy of values, C-contiguous, starting `misalign` bytes past a 16-byte boundary
    in a byte buffer with GUARD or more bytes of 0xff (NaN bits) on each side; check() asserts that
    those bytes are unchanged."""
    raw = xp.full(values.nbytes + 2 * GUARD + 32, 0xFF, np.uint8)
    address = raw.data.ptr if hasattr(raw.data, "ptr") else raw.ctypes.data
    start = GUARD + (-(address + GUARD) % 16) + misalign
    end = start + values.nbytes
    a = raw[start:end].view(values.dtype).reshape(values.shape)
    a[...] = xp.asarray(values)

    def check():
        outside = backend.to_numpy(xp.concatenate([raw[:start], raw[end:]]))
        assert (outside == 0xFF).all(), "a write outside the array"
    return a, check


def inputs(rng, v, n, d, gy_dtype, id_dtype):
    """ids with many repeats (n draws from v rows, some rows never drawn), gy, a random out."""
    ids = rng.integers(0, v, n).astype(id_dtype)
    gy = (3 * rng.standard_normal((n, d))).astype(gy_dtype)
    out = rng.standard_normal((v, d)).astype(np.float32)
    return ids, gy, out


def close(actual, expected, tol=1e-5):
    """float32 sums of the same terms in another order: equal to about float32 rounding."""
    actual, expected = backend.to_numpy(actual).astype(np.float64), expected.astype(np.float64)
    assert actual.shape == expected.shape and np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


# ----- CPU: the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("gy_dtype", [np.float16, np.float32])
def test_reference_equals_loop(rng, gy_dtype):
    ids, gy, out = inputs(rng, 9, 300, 12, gy_dtype, np.int64)
    expected = out.copy()
    for n in range(len(ids)):
        expected[ids[n]] += gy[n].astype(np.float32)
    result = embedding.reference_backward(ids, gy, out.copy())
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(result, out)


def test_reference_is_the_engine_gradient(rng):
    ids, gy, _ = inputs(rng, 9, 60, 8, np.float32, np.int32)
    w = Tensor(rng.standard_normal((9, 8)).astype(np.float32), requires_grad=True)
    F.embedding(ids.reshape(6, 10), w).backward(gy.reshape(6, 10, 8))
    expected = embedding.reference_backward(ids, gy, np.zeros((9, 8), np.float32))
    np.testing.assert_allclose(w.grad, expected, rtol=1e-6, atol=1e-6)


# ----- CPU: the CUDA source on the emulator ---------------------------------------------------

@functools.lru_cache(maxsize=None)
def _emulator():
    return cuda_emulator.Emulator(HEADER + embedding.SOURCE)


@pytest.fixture
def emulated(monkeypatch):
    """Launches go to the emulator, on a grid of at most 3 blocks (so the row loop wraps); returns
    the list of (kernel name, vector flag) launched."""
    if not cuda_emulator.available():
        pytest.skip("the CUDA emulator needs g++ on x86-64")
    launched = []

    def launch(name, blocks, args):
        launched.append((name, int(args[-1])))
        _emulator().launch(name, (blocks,), embedding.THREADS, args)

    monkeypatch.setattr(embedding, "_launch", launch)
    monkeypatch.setattr(embedding, "_blocks", lambda rows: max(1, min(-(-rows // 8), 3)))
    return launched


CASES = [  # (V, N, D, gy misaligned by bytes, out misaligned by bytes, vector path)
    (7, 200, 64, 0, 0, 1),      # many repeats; 16 chunks of 4: half the lanes idle
    (5, 90, 132, 0, 0, 1),      # 33 chunks: lane 0 takes two, the others one
    (11, 40, 20, 0, 0, 1),      # fewer features than a warp's 128
    (7, 100, 30, 0, 0, 0),      # D not a multiple of 4: scalar
    (6, 70, 33, 0, 0, 0),       # scalar, lane 0 takes two features
    (7, 64, 64, 2, 0, 0),       # gy off its 4-value boundary (float16: 2 bytes, float32: a value too few)
    (7, 64, 64, 0, 8, 0),       # out 8 bytes off a 16-byte boundary
]


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("gy_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("v,n,d,gy_off,out_off,vec", CASES)
def test_emulated_embedding_backward(emulated, rng, v, n, d, gy_off, out_off, vec, gy_dtype, id_dtype):
    ids, gy, out0 = inputs(rng, v, n, d, gy_dtype, id_dtype)
    gy_off = gy_off if gy_dtype == np.float16 or not gy_off else 4
    gy_in, _ = placed(np, gy, gy_off)
    out, check = placed(np, out0, out_off)
    assert embedding.embedding_backward(ids, gy_in, out) is out
    close(out, embedding.reference_backward(ids, gy, out0.copy()))
    check()
    suffix = {np.float16: "f16", np.float32: "f32"}[gy_dtype] + {np.int32: "_i32", np.int64: "_i64"}[id_dtype]
    assert emulated == [("embedding_bwd_" + suffix, vec)]


def test_emulated_ids_out_of_range_add_nothing(emulated, rng):
    ids, gy, out0 = inputs(rng, 7, 50, 64, np.float16, np.int64)
    ids[::7] = -1
    ids[3::7] = 7
    out, check = placed(np, out0, 0)
    embedding.embedding_backward(ids, gy, out)
    keep = (ids >= 0) & (ids < 7)
    close(out, embedding.reference_backward(ids[keep], gy[keep], out0.copy()))
    check()


def test_emulated_no_rows(emulated):
    out = np.ones((3, 8), np.float32)
    embedding.embedding_backward(np.zeros(0, np.int32), np.zeros((0, 8), np.float16), out)
    assert emulated == [] and (out == 1).all()


# ----- GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("gy_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("v,n,d,gy_off", [(1000, 2048, 640, 0), (7, 4096, 256, 0), (300, 500, 30, 0),
                                          (50, 800, 640, 2)])
def test_embedding_kernel(gpu_xp, rng, v, n, d, gy_off, gy_dtype, id_dtype):
    cp = gpu_xp
    ids, gy, out0 = inputs(rng, v, n, d, gy_dtype, id_dtype)
    gy_dev, _ = placed(cp, gy, gy_off if gy_dtype == np.float16 or not gy_off else 4)
    out, check = placed(cp, out0)
    assert embedding.supports(cp.asarray(ids), gy_dev, out)
    assert embedding.vector_ok(gy_dev, out) == (d % 4 == 0 and not gy_off)
    embedding.embedding_backward(cp.asarray(ids), gy_dev, out)
    close(out, embedding.reference_backward(ids, gy, out0.copy()), tol=1e-4)
    check()


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_embedding_fast_equals_reference_path(gpu_xp, rng, monkeypatch, w_dtype, id_dtype):
    cp = gpu_xp
    launched = []
    launch = embedding._launch
    monkeypatch.setattr(embedding, "_launch", lambda *a: (launched.append(a[0]), launch(*a)))
    ids = cp.asarray(rng.integers(0, 300, (4, 256)).astype(id_dtype))
    w = cp.asarray(rng.standard_normal((300, 640)).astype(w_dtype))
    gy = cp.asarray((3 * rng.standard_normal((4, 256, 640))).astype(w_dtype))

    def grad():
        t = Tensor(w, requires_grad=True)
        F.embedding(ids, t).backward(gy)
        return t.grad

    with fast(False):
        expected = grad()
    with fast(True, families=("embedding",)):
        got = grad()
    assert launched and got.dtype == expected.dtype == w_dtype
    close(got, backend.to_numpy(expected).astype(np.float64), tol=2e-3 if w_dtype == np.float16 else 1e-5)
