"""The fast path's kernels (tinygrad3/kernels/).

On the CPU (CI): each kernel family's NumPy reference against the engine's reference op, and
the cuBLAS argument arithmetic against a NumPy model of column-major GEMM.
On a GPU (`gpu` marker): each kernel against its NumPy reference on fresh random inputs (the
AdamW step's reference is checked against nn.optim.AdamW in tests/test_optim.py), the
dispatch through F with the fast path on, and 20 fp16 training updates of the tiny preset
whose losses must match the reference path's.
"""
import numpy as np
import pytest

import tinygrad3.functional as F
from tinygrad3 import Tensor, backend, gradcheck
from tinygrad3.kernels import adamw, attention, cross_entropy, fast, geglu, gemm, qk_norm_rope, rmsnorm, rope
from tinygrad3.kernels.cuda import grid_stride_blocks
from tinygrad3.nn_ops.rmsnorm import RMSNorm
from tinygrad3.nn_ops.rope import rope_tables

TOL = 2e-3  # float16 results: about two ulps, relative to the largest value


def close16(actual, expected, tol=TOL, what=""):
    actual = backend.to_numpy(actual).astype(np.float64)
    expected = backend.to_numpy(expected).astype(np.float64)
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: inf/NaN (unwritten output?)"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(np.abs(expected).max(), 1e-30),
                               err_msg=what)


def half(rng, shape, scale=1.0, dtype=np.float16):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def tol_of(dtype):
    """float16 results: TOL; float32 ones differ from their reference only in summation order."""
    return TOL if dtype == np.float16 else 1e-5


# (x, w, y) dtypes of RMSNorm: all float16; the model's float32 stream to float16 with float32 or
# float16 weights; float16 activations with float32 weights (q/k and post norms); all float32
RMSNORM_DTYPES = [(np.float16, np.float16, np.float16), (np.float32, np.float32, np.float16),
                  (np.float32, np.float16, np.float16), (np.float16, np.float32, np.float16),
                  (np.float32, np.float32, np.float32)]


def run_op(fn, arrays, upstream):
    """Forward and backward of an F op on Tensors: (output, gradients of every input)."""
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(upstream)
    return out.data, [t.grad for t in tensors]


# ----- CPU: the NumPy references against the engine's reference ops --------------------------

@pytest.mark.parametrize("x_dtype,w_dtype,y_dtype", RMSNORM_DTYPES)
def test_rmsnorm_reference_matches_engine(rng, x_dtype, w_dtype, y_dtype):
    x, w = half(rng, (5, 7, 64), 3, x_dtype), half(rng, 64, 0.2, w_dtype)
    gy = half(rng, (5, 7, 64), dtype=y_dtype)
    y, (gx, gw) = run_op(lambda x, w: F.rms_norm(x, w, 1e-6, out_dtype=y_dtype), [x, w], gy)
    ry, rstd = rmsnorm.reference_forward(x, w, 1e-6, y_dtype)
    rgx, rgw = rmsnorm.reference_backward(gy, x, w, rstd)
    for ours, engine, name in ((ry, y, "y"), (rgx, gx, "dx"), (rgw, gw, "dw")):
        assert ours.dtype == engine.dtype, name
        close16(ours, engine, tol=tol_of(ours.dtype), what=name)


def test_geglu_reference_path_equals_unfused_pair(rng):
    x, gy = half(rng, (6, 80), 2), half(rng, (6, 40))
    fused = run_op(F.geglu, [x], gy)
    unfused = run_op(lambda x: F.gelu_tanh(x[:, :40]) * x[:, 40:], [x], gy)
    for a, b in zip([fused[0]] + fused[1], [unfused[0]] + unfused[1]):
        np.testing.assert_array_equal(a, b)  # rounding for rounding
    close16(geglu.reference_forward(x), fused[0], what="y")
    close16(geglu.reference_backward(gy, x), fused[1][0], what="grad")


def test_geglu_gradcheck(rng):
    gradcheck(F.geglu, [rng.standard_normal((3, 10))])


def test_geglu_rejects_an_odd_last_axis(rng):
    with pytest.raises(ValueError, match="two equal halves"):
        F.geglu(Tensor(half(rng, (3, 9))))


def test_cross_entropy_reference_matches_engine(rng):
    z = half(rng, (3, 5, 300), 4)
    t = rng.integers(0, 300, (3, 5))
    t[1, 2] = t[2, 0] = -1
    gy = np.float32(1024.0)  # a loss scale rides in gy
    loss, (gz,) = run_op(lambda z: F.cross_entropy(z, t) * gy, [z], None)
    rloss, lse, denom = cross_entropy.reference_forward(z, t, -1)
    close16(rloss * gy, loss, tol=1e-5, what="loss")
    close16(cross_entropy.reference_backward(gy, z, t, lse, denom, -1), gz, what="dz")


@pytest.mark.parametrize("hkv,window,tq", [(1, 5, 11), (2, None, 11), (1, 4, 3)])
def test_attention_reference_matches_engine(rng, hkv, window, tq):
    tk = 11
    q, k, v = half(rng, (2, 4, tq, 16)), half(rng, (2, hkv, tk, 16)), half(rng, (2, hkv, tk, 8))
    go = half(rng, (2, 4, tq, 8))
    o, grads = run_op(lambda q, k, v: F.attention(q, k, v, 0.25, window=window), [q, k, v], go)
    ro, p = attention.reference_forward(q, k, v, 0.25, window, tk - tq)
    close16(ro, o, tol=3e-3, what="out")  # P is rounded to float16 before P V
    for name, ours, engine in zip("qkv", attention.reference_backward(go, q, k, v, p, 0.25, window, tk - tq),
                                  grads):
        close16(ours, engine, tol=5e-3, what=f"d{name}")


def test_rope_reference_matches_engine(rng):
    x, gy = half(rng, (2, 3, 7, 16), 2), half(rng, (2, 3, 7, 16))
    y, (gx,) = run_op(lambda x: F.rope(x, 10_000.0, offset=5), [x], gy)
    cos, sin = (t[5:12] for t in rope_tables(16, 10_000.0, 12, np))
    close16(rope.reference_forward(x, cos, sin), y, what="y")
    close16(rope.reference_backward(gy, cos, sin), gx, what="dx")


@pytest.mark.parametrize("w_dtype", [np.float16, np.float32])
def test_qk_norm_rope_reference_matches_engine(rng, w_dtype):
    """The fused kernel's reference against the reference path (which rounds the normalised x to
    float16 before RoPE; the kernel does not)."""
    x, w, gy = half(rng, (2, 7, 3, 16), 3), half(rng, 16, 0.2, w_dtype), half(rng, (2, 3, 7, 16), 100)
    y, (gx, gw) = run_op(lambda x, w: F.qk_norm_rope(x, w, 1e-6, 10_000.0, offset=5), [x, w], gy)
    cos, sin = (t[5:12] for t in rope_tables(16, 10_000.0, 12, np))
    ry, rstd = qk_norm_rope.reference_forward(x, w, 1e-6, cos, sin)
    rgx, rgw = qk_norm_rope.reference_backward(gy, x, w, cos, sin, rstd)
    close16(ry, y, what="y")
    close16(rgx, gx, tol=4e-3, what="dx")
    close16(rgw, gw, tol=4e-3, what="dw")


def colmajor_gemm(transa, transb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, ldc, stride_c, batch):
    """What cuBLAS's strided-batched GEMM computes on flat buffers, in column-major terms."""
    def matrix(buf, start, rows, cols, ld):  # column-major rows x cols with leading dimension ld
        return buf[start:start + ld * cols].reshape(cols, ld)[:, :rows].T

    c = np.zeros(batch * stride_c, np.float64)
    for i in range(batch):
        op_a = matrix(a, i * stride_a, k, m, lda).T if transa else matrix(a, i * stride_a, m, k, lda)
        op_b = matrix(b, i * stride_b, n, k, ldb).T if transb else matrix(b, i * stride_b, k, n, ldb)
        c[i * stride_c:i * stride_c + ldc * n].reshape(n, ldc)[:, :m] = (alpha * op_a @ op_b).T
    return c


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_cublas_args_give_the_row_major_product(rng, trans_a, trans_b):
    m, k, n = 5, 3, 4
    a = rng.standard_normal((2, k, m) if trans_a else (2, m, k))
    b = rng.standard_normal((2, n, k) if trans_b else (2, k, n))
    (rows, cols), p = gemm.cublas_args(a.shape, b.shape, trans_a, trans_b)
    c = colmajor_gemm(p["transa"], p["transb"], p["m"], p["n"], p["k"], 0.5, b.ravel(), p["lda"], p["stride_a"],
                      a.ravel(), p["ldb"], p["stride_b"], p["ldc"], p["stride_c"], p["batch"])
    expected = 0.5 * (np.swapaxes(a, 1, 2) if trans_a else a) @ (np.swapaxes(b, 1, 2) if trans_b else b)
    assert (rows, cols) == (m, n)
    np.testing.assert_allclose(c.reshape(2, m, n), expected, rtol=1e-12)


def test_cublas_args_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="inner sizes"):
        gemm.cublas_args((1, 2, 3), (1, 4, 5))
    with pytest.raises(ValueError, match="batch"):
        gemm.cublas_args((1, 2, 3), (2, 3, 5))


def test_fast_path_needs_cupy_float16():
    with fast():
        x = np.ones((2, 8), np.float16)
        y = F.rms_norm(Tensor(x), Tensor(np.zeros(8, np.float16)))  # NumPy: the reference path
        assert y.dtype == np.float16


# ----- GPU: kernels against their references --------------------------------------------------

def poison(cp, *arrays_like):
    """Fill pool blocks of the outputs' sizes with NaN bits, so an unwritten output shows."""
    for shape, dtype in arrays_like:
        block = cp.full(int(np.prod(shape)) * np.dtype(dtype).itemsize, 255, np.uint8)
        del block


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,w_dtype,y_dtype", RMSNORM_DTYPES)
@pytest.mark.parametrize("rows,d", [(37, 640), (300, 256), (5, 64), (9, 16), (3, 1000),  # vector kernels
                                    (33, 642), (7, 30)])                                # D % 4 != 0: fallback
def test_rmsnorm_kernel(gpu_xp, rng, rows, d, x_dtype, w_dtype, y_dtype):
    cp = gpu_xp
    x, w = half(rng, (rows, d), 3, x_dtype), half(rng, d, 0.2, w_dtype)
    gy = half(rng, (rows, d), 100, y_dtype)
    poison(cp, (x.shape, y_dtype), ((rows,), np.float32))
    y, rstd = rmsnorm.forward(cp.asarray(x), cp.asarray(w), 1e-6, y_dtype)
    ry, rrstd = rmsnorm.reference_forward(x, w, 1e-6, y_dtype)
    assert y.dtype == y_dtype
    close16(y, ry, tol=tol_of(y_dtype), what="y")
    close16(rstd, rrstd, tol=1e-5, what="rstd")
    poison(cp, (x.shape, x_dtype), ((d,), w_dtype))
    gx, gw = rmsnorm.backward(cp.asarray(gy), cp.asarray(x), cp.asarray(w), rstd)
    rgx, rgw = rmsnorm.reference_backward(gy, x, w, rrstd)
    assert gx.dtype == x_dtype and gw.dtype == w_dtype
    close16(gx, rgx, tol=tol_of(x_dtype), what="dx")
    close16(gw, rgw, tol=tol_of(w_dtype) if w_dtype == np.float16 else 1e-4, what="dw")


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("d", [640, 256, 100, 102])  # 102: the fallback kernels
def test_rmsnorm_dw_over_more_rows_than_blocks(gpu_xp, rng, d, w_dtype):
    """dw from the second kernel, in w's dtype, when each block takes several rows and not all
    blocks take as many (rows not a multiple of the block count), at the model's widths (hidden
    640, head_dim 256) and an odd one."""
    cp = gpu_xp
    blocks = grid_stride_blocks(1 << 30, 1, per_sm=8)  # the fallback's grid; the vector grid takes more rows per step
    rows = 3 * blocks + 37
    x, w, gy = half(rng, (rows, d), 3, np.float32), half(rng, d, 0.2, w_dtype), half(rng, (rows, d))
    _, rstd = rmsnorm.reference_forward(x, w, 1e-6, np.float16)
    poison(cp, ((blocks, d), np.float32), ((d,), w_dtype))
    gx, gw = rmsnorm.backward(cp.asarray(gy), cp.asarray(x), cp.asarray(w), cp.asarray(rstd))
    rgx, rgw = rmsnorm.reference_backward(gy, x, w, rstd)
    assert gw.dtype == w_dtype
    close16(gw, rgw, tol=tol_of(w_dtype) if w_dtype == np.float16 else 1e-4, what="dw")
    close16(gx, rgx, tol=tol_of(np.float32), what="dx")


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,w_dtype,y_dtype", RMSNORM_DTYPES)
@pytest.mark.parametrize("round_gy", [False, True])
@pytest.mark.parametrize("d", [640, 642])  # the vector kernels, the fallback
def test_rmsnorm_backward_adds_into_targets(gpu_xp, rng, x_dtype, w_dtype, y_dtype, round_gy, d):
    """gx_into / dw_into: the kernels add dx and dw into the given arrays, bit for bit what the
    engine's separate sum gives (the new value rounded to the array's dtype, then added)."""
    cp = gpu_xp
    rows = 300
    x, w, gy = half(rng, (rows, d), 3, x_dtype), half(rng, d, 0.2, w_dtype), half(rng, (rows, d), 100, y_dtype)
    x, w, gy = cp.asarray(x), cp.asarray(w), cp.asarray(gy)
    _, rstd = rmsnorm.forward(x, w, 1e-6, y_dtype)
    gx, gw = rmsnorm.backward(gy, x, w, rstd, round_gy=round_gy)
    before_x = cp.asarray(half(rng, (rows, d), 5, x_dtype))
    before_w = cp.asarray(half(rng, d, 5, w_dtype))
    into_x, into_w = before_x.copy(), before_w.copy()
    out_x, out_w = rmsnorm.backward(gy, x, w, rstd, round_gy=round_gy, gx_into=into_x, dw_into=into_w)
    assert out_x is into_x and out_w is into_w
    np.testing.assert_array_equal(cp.asnumpy(into_x), cp.asnumpy(before_x + gx))
    np.testing.assert_array_equal(cp.asnumpy(into_w), cp.asnumpy(before_w + gw))


def offset_copy(cp, values, offset):
    """values on the GPU in a C-contiguous array starting `offset` bytes past a 256-byte boundary."""
    raw = cp.empty(values.nbytes + 256, np.uint8)
    a = raw[offset:offset + values.nbytes].view(values.dtype).reshape(values.shape)
    a[...] = cp.asarray(values)
    return a


def recording(monkeypatch, module):
    """The names of the kernels that module._launch launches, in order (a list that grows)."""
    launched, launch = [], module._launch
    monkeypatch.setattr(module, "_launch", lambda *a: (launched.append(a[1] if module is rmsnorm else a[0]),
                                                       launch(*a)))
    return launched


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,w_dtype,y_dtype", RMSNORM_DTYPES)
@pytest.mark.parametrize("offset", [0, 8, 4, 2])
def test_rmsnorm_kernel_misaligned(gpu_xp, rng, monkeypatch, x_dtype, w_dtype, y_dtype, offset):
    """x off its 4-element boundary (float16: 8 bytes, float32: 16) takes the fallback kernels, with the
    same results; on it (offset 0, or 8 bytes for float16) the vector kernels."""
    cp = gpu_xp
    size = np.dtype(x_dtype).itemsize
    if offset % size:
        pytest.skip("an offset of part of an element")
    kind = "_v5" if offset % (4 * size) == 0 else ""
    rows, d = 45, 640
    x, w = half(rng, (rows, d), 3, x_dtype), half(rng, d, 0.2, w_dtype)
    gy = half(rng, (rows, d), 100, y_dtype)
    launched = recording(monkeypatch, rmsnorm)
    y, rstd = rmsnorm.forward(offset_copy(cp, x, offset), cp.asarray(w), 1e-6, y_dtype)
    ry, rrstd = rmsnorm.reference_forward(x, w, 1e-6, y_dtype)
    close16(y, ry, tol=tol_of(y_dtype), what="y")
    close16(rstd, rrstd, tol=1e-5, what="rstd")
    gx, gw = rmsnorm.backward(cp.asarray(gy), offset_copy(cp, x, offset), cp.asarray(w), rstd)
    rgx, rgw = rmsnorm.reference_backward(gy, x, w, rrstd)
    close16(gx, rgx, tol=tol_of(x_dtype), what="dx")
    close16(gw, rgw, tol=tol_of(w_dtype) if w_dtype == np.float16 else 1e-4, what="dw")
    assert launched == ["rms_norm_fwd" + kind, "rms_norm_bwd" + kind, "rms_norm_dw"]


@pytest.mark.gpu
@pytest.mark.parametrize("h_offset,kind", [(0, "_v5"), (8, "")])
def test_rmsnorm_residual_kernel_paths(gpu_xp, rng, monkeypatch, h_offset, kind):
    """The residual form, h aligned (vector kernel) or 8 bytes off (fallback): h + the row rounded to x's dtype."""
    cp = gpu_xp
    rows, d = 45, 640
    x, w, h = half(rng, (rows, d), 3), half(rng, d, 0.2, np.float32), half(rng, (rows, d), 10, np.float32)
    launched = recording(monkeypatch, rmsnorm)
    y, _ = rmsnorm.forward(cp.asarray(x), cp.asarray(w), 1e-6, np.float32, residual=offset_copy(cp, h, h_offset))
    close16(y, h + rmsnorm.reference_forward(x, w, 1e-6, np.float16)[0].astype(np.float32), what="y")
    assert launched == ["rms_norm_fwd" + kind]


@pytest.mark.gpu
def test_rmsnorm_kernel_no_rows(gpu_xp):
    cp = gpu_xp
    x, w = cp.zeros((0, 64), np.float32), cp.ones(64, np.float16)
    y, rstd = rmsnorm.forward(x, w, 1e-6, np.float16)
    gx, gw = rmsnorm.backward(y, x, w, rstd)
    assert y.shape == gx.shape == (0, 64) and gw.dtype == np.float16
    np.testing.assert_array_equal(cp.asnumpy(gw), np.zeros(64))


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,w_dtype,y_dtype", RMSNORM_DTYPES)
def test_rmsnorm_fast_path_takes_the_models_dtypes(gpu_xp, rng, x_dtype, w_dtype, y_dtype):
    cp = gpu_xp
    x, w = cp.asarray(half(rng, (3, 640), 1, x_dtype)), cp.asarray(half(rng, 640, 0.1, w_dtype))
    with fast():
        assert type(F.rms_norm(Tensor(x), Tensor(w, requires_grad=True), out_dtype=y_dtype)._creator) \
            is rmsnorm.FusedRMSNorm
        assert type(F.rms_norm(Tensor(x.astype(np.float64)), Tensor(w, requires_grad=True))._creator) is RMSNorm


@pytest.mark.gpu
@pytest.mark.parametrize("shape,offset,kind", [  # x's shape: rows of [gate | up]
    ((3, 7, 4096), 0, "_vec"),
    ((2100, 4096), 0, "_vec"),     # more than two vectors per thread: the two-vector loop, then one
    ((5, 16), 0, "_vec"),          # one vector per row
    ((9, 2 * 1001), 0, ""),        # rows of 1001: not whole vectors, the scalar kernels
    ((3, 7, 4096), 2, ""),         # 2 bytes off a 16-byte boundary: the scalar kernels
    ((1001, 10), 8, ""),           # 8 bytes off
    ((33, 4096), 16, "_vec"),      # 16 bytes off: aligned
])
def test_geglu_kernel(gpu_xp, rng, monkeypatch, shape, offset, kind):
    cp = gpu_xp
    x = np.concatenate([half(rng, shape[:-1] + (shape[-1] // 2,), 3), half(rng, shape[:-1] + (shape[-1] // 2,))], -1)
    gy = half(rng, shape[:-1] + (shape[-1] // 2,), 50)
    launched = recording(monkeypatch, geglu)
    poison(cp, (gy.shape, np.float16))
    y = geglu.forward(offset_copy(cp, x, offset))
    close16(y, geglu.reference_forward(x), what="y")
    poison(cp, (shape, np.float16))
    gx = geglu.backward(offset_copy(cp, gy, offset), offset_copy(cp, x, offset))
    ref = geglu.reference_backward(gy, x)
    half_ = shape[-1] // 2
    close16(gx[..., :half_], ref[..., :half_], what="dgate")
    close16(gx[..., half_:], ref[..., half_:], what="dup")
    assert launched == ["geglu_fwd" + kind, "geglu_bwd" + kind]


@pytest.mark.gpu
def test_geglu_vector_and_scalar_kernels_agree_bit_for_bit(gpu_xp, rng):
    cp = gpu_xp
    x, gy = half(rng, (41, 2 * 104), 3), half(rng, (41, 104), 50)
    vec = [geglu.forward(offset_copy(cp, x, 0)), geglu.backward(offset_copy(cp, gy, 0), offset_copy(cp, x, 0))]
    scalar = [geglu.forward(offset_copy(cp, x, 2)), geglu.backward(offset_copy(cp, gy, 2), offset_copy(cp, x, 2))]
    for a, b in zip(vec, scalar):
        np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,v", [(33, 50304), (17, 1001)])  # 16-byte path, scalar path
def test_cross_entropy_kernel(gpu_xp, rng, rows, v):
    cp = gpu_xp
    z = half(rng, (rows, v), 3)
    z[0, :5] = 60000  # extreme but finite float16 logits
    z[1, -3:] = np.finfo(np.float16).min  # the vocabulary padding mask
    t = rng.integers(0, v, rows)
    t[2] = -1
    poison(cp, ((rows,), np.float32), ((rows,), np.float32))
    loss, lse, denom = cross_entropy.forward(cp.asarray(z), cp.asarray(t), -1)
    rloss, rlse, rdenom = cross_entropy.reference_forward(z, t, -1)
    close16(loss, rloss, tol=1e-5, what="loss")
    close16(lse, rlse, tol=1e-6, what="lse")
    gy = cp.asarray(np.float32(65536 / 8))
    poison(cp, (z.shape, np.float16))
    gz = cross_entropy.backward(gy, cp.asarray(z), cp.asarray(t), lse, denom, -1)
    close16(gz, cross_entropy.reference_backward(np.float32(65536 / 8), z, t, rlse, rdenom, -1), what="dz")
    logits = cp.asarray(z)  # in_place: the same gradient, written over the logits
    over = cross_entropy.backward(gy, logits, cp.asarray(t), lse, denom, -1, in_place=True)
    assert over.data.ptr == logits.data.ptr
    np.testing.assert_array_equal(cp.asnumpy(over), cp.asnumpy(gz))


@pytest.mark.gpu
@pytest.mark.parametrize("v, valid", [(512, 509), (512, 500), (515, 509), (512, 1)])
def test_cross_entropy_kernel_valid_vocab(gpu_xp, rng, v, valid):
    """Only the first `valid` logits count (a padded vocabulary): loss and lse as over z[:, :valid],
    a zero gradient past it, even where the padding logits are the row's largest."""
    cp = gpu_xp
    z = half(rng, (6, v), 3)
    z[:, valid:] = 30.0
    t = rng.integers(0, valid, 6)
    loss, lse, denom = cross_entropy.forward(cp.asarray(z), cp.asarray(t), -1, valid)
    rloss, rlse, rdenom = cross_entropy.reference_forward(z[:, :valid], t, -1)
    close16(loss, rloss, tol=1e-5, what="loss")
    close16(lse, rlse, tol=1e-6, what="lse")
    gz = cross_entropy.backward(cp.asarray(np.float32(1024)), cp.asarray(z), cp.asarray(t), lse, denom, -1, valid)
    expected = np.zeros_like(z)
    expected[:, :valid] = cross_entropy.reference_backward(np.float32(1024), z[:, :valid], t, rlse, rdenom, -1)
    close16(gz, expected, what="dz")


def test_cross_entropy_reference_valid_vocab_is_the_sliced_vocabulary(rng):
    z, t = half(rng, (5, 16), 3), rng.integers(0, 11, 5)
    loss, lse, denom = cross_entropy.reference_forward(z, t, -1, valid=11)
    sliced = cross_entropy.reference_forward(z[:, :11], t, -1)
    np.testing.assert_array_equal(lse, sliced[1])
    g = cross_entropy.reference_backward(np.float32(2), z, t, lse, denom, -1, valid_vocab=11)
    np.testing.assert_array_equal(g[:, :11],
                                  cross_entropy.reference_backward(np.float32(2), z[:, :11], t, *sliced[1:], -1))
    assert not g[:, 11:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_bmm_kernel(gpu_xp, rng, trans_a, trans_b, out_dtype):
    cp = gpu_xp
    m, k, n = 70, 256, 33
    a = half(rng, (3, k, m) if trans_a else (3, m, k))
    b = half(rng, (3, n, k) if trans_b else (3, k, n))
    c = gemm.bmm(cp.asarray(a), cp.asarray(b), trans_a, trans_b, alpha=0.25, out_dtype=out_dtype)
    assert c.dtype == out_dtype
    close16(c, gemm.reference_bmm(a, b, trans_a, trans_b, 0.25, out_dtype), what="C")


@pytest.mark.gpu
def test_rope_kernel_reads_and_writes_through_strides(gpu_xp, rng):
    cp = gpu_xp
    base, gy = half(rng, (2, 9, 4, 32), 2), half(rng, (2, 4, 9, 32))  # (B, T, H, D) as the model makes it
    x = cp.asarray(base).transpose(0, 2, 1, 3)
    cos, sin = (t[3:12] for t in rope_tables(32, 1e6, 12, cp))
    poison(cp, (x.shape, np.float16))
    y = rope.forward(x, cos, sin)
    assert y.flags.c_contiguous
    close16(y, rope.reference_forward(base.transpose(0, 2, 1, 3), cp.asnumpy(cos), cp.asnumpy(sin)), what="y")
    gx = rope.backward(cp.asarray(gy), cos, sin, rope.layout(x))
    assert gx.strides == x.strides  # the input's layout, so the transpose back is free
    close16(gx, rope.reference_backward(gy, cp.asnumpy(cos), cp.asnumpy(sin)), what="dx")


QK_NORM_ROPE_CASES = [  # (B, T, H, D, offset): the model's head_dim and a small one; 4 query heads, 1 KV head
    (2, 37, 4, 256, 0), (2, 37, 1, 256, 9), (3, 20, 4, 32, 300),
    (2, 37, 4, 20, 3),                            # D % 8 != 0: the fallback (block-per-row) kernels
    (1, 5, 1, 32, 0), (2, 3000, 1, 256, 0),
    (2, 1024, 4, 256, 0), (2, 1024, 1, 256, 5),   # Gemma 3 270M's q and k at T = 1024
    (1, 9, 3, 24, 0), (1, 30, 2, 640, 0), (1, 9, 2, 1024, 0)]  # idle lanes; 2-3 and 4 groups a lane


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b,t,h,d,offset", QK_NORM_ROPE_CASES)
def test_qk_norm_rope_kernel(gpu_xp, rng, b, t, h, d, offset, w_dtype):
    """Against the NumPy reference; gy through a transposed view (as attention's backward may give
    it); the last case has more rows than blocks, so the backward's grid-stride loop and dw sum run."""
    cp = gpu_xp
    x, w = half(rng, (b, t, h, d), 3), half(rng, d, 0.2, w_dtype)
    gy = half(rng, (b, t, h, d), 100)  # read as (B, H, T, D) through a transpose
    cos, sin = (a[offset:offset + t] for a in rope_tables(d, 1e4, offset + t, cp))
    poison(cp, ((b, h, t, d), np.float16), ((b * t * h,), np.float32))
    y, rstd = qk_norm_rope.forward(cp.asarray(x), cp.asarray(w), 1e-6, cos, sin)
    ry, rrstd = qk_norm_rope.reference_forward(x, w, 1e-6, cp.asnumpy(cos), cp.asnumpy(sin))
    assert y.dtype == np.float16 and y.flags.c_contiguous
    close16(y, ry, what="y")
    close16(rstd, rrstd, tol=1e-5, what="rstd")
    poison(cp, (x.shape, np.float16), ((d,), w_dtype))
    gy_view = cp.asarray(gy).transpose(0, 2, 1, 3)
    gx, gw = qk_norm_rope.backward(gy_view, cp.asarray(x), cp.asarray(w), cos, sin, rstd)
    rgx, rgw = qk_norm_rope.reference_backward(gy.transpose(0, 2, 1, 3), x, w, cp.asnumpy(cos), cp.asnumpy(sin),
                                               rrstd)
    assert gx.dtype == np.float16 and gx.shape == x.shape and gw.dtype == w_dtype
    close16(gx, rgx, what="dx")
    close16(gw, rgw, tol=tol_of(w_dtype) if w_dtype == np.float16 else 1e-4, what="dw")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["feature_stride", "unaligned"])
@pytest.mark.parametrize("b,t,h,d", [(2, 300, 4, 256), (2, 300, 1, 256), (2, 37, 4, 20)])
def test_qk_norm_rope_backward_gy_layouts(gpu_xp, rng, b, t, h, d, layout):
    """gy that the vector loads cannot take (feature stride 2; a start 2 bytes past an 8-byte
    boundary): the scalar gy path of the vector kernel (and, for D = 20, the fallback kernel)."""
    cp = gpu_xp
    x, w = half(rng, (b, t, h, d), 3), half(rng, d, 0.2, np.float32)
    gy = half(rng, (b, h, t, d), 100)
    cos, sin = (a[:t] for a in rope_tables(d, 1e4, t, cp))
    y, rstd = qk_norm_rope.forward(cp.asarray(x), cp.asarray(w), 1e-6, cos, sin)
    if layout == "feature_stride":
        wide = cp.zeros((b, h, t, 2 * d), np.float16)
        wide[..., ::2] = cp.asarray(gy)
        gy_dev = wide[..., ::2]
    else:
        flat = cp.zeros(gy.size + 1, np.float16)
        flat[1:] = cp.asarray(gy).ravel()
        gy_dev = flat[1:].reshape(gy.shape)
        assert gy_dev.data.ptr % 8 == 2
    gx, gw = qk_norm_rope.backward(gy_dev, cp.asarray(x), cp.asarray(w), cos, sin, rstd)
    _, rrstd = qk_norm_rope.reference_forward(x, w, 1e-6, cp.asnumpy(cos), cp.asnumpy(sin))
    rgx, rgw = qk_norm_rope.reference_backward(gy, x, w, cp.asnumpy(cos), cp.asnumpy(sin), rrstd)
    close16(gx, rgx, what="dx")
    close16(gw, rgw, tol=1e-4, what="dw")


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b,t,h,d,offset", QK_NORM_ROPE_CASES[:4] + [(2, 1024, 4, 256, 0)])
def test_qk_norm_rope_fast_equals_reference_path(gpu_xp, rng, b, t, h, d, offset, w_dtype):
    """F.qk_norm_rope with the family on (one fused Function) against the reference path (the three
    ops, fast path off), forward and backward: equal within float16 tolerance (the reference path
    rounds the normalised x to float16 once more)."""
    cp = gpu_xp
    arrays = [cp.asarray(half(rng, (b, t, h, d), 3)), cp.asarray(half(rng, d, 0.2, w_dtype))]
    gy = cp.asarray(half(rng, (b, h, t, d), 100))
    fn = lambda x, w: F.qk_norm_rope(x, w, 1e-6, 1e4, offset)  # noqa: E731
    with fast(False):
        ref_out, ref_grads = run_op(fn, arrays, gy)
    with fast(True, families=("qk_norm_rope",)):
        out = fn(Tensor(arrays[0]), Tensor(arrays[1], requires_grad=True))
        assert isinstance(out._creator, qk_norm_rope.QKNormRoPE)
        out, grads = run_op(fn, arrays, gy)
    close16(out, ref_out, what="out")
    for name, g, rg in zip(("dx", "dw"), grads, ref_grads):
        assert g.dtype == rg.dtype, name
        close16(g, rg, tol=4e-3, what=name)


ATTENTION_CASES = [  # (B, Hq, Hkv, Tq, Tk, D, window)
    (2, 4, 1, 37, 37, 16, 8), (1, 4, 2, 64, 64, 256, None), (2, 4, 1, 5, 40, 32, 16), (1, 2, 1, 300, 300, 64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", ATTENTION_CASES)
def test_attention_kernels(gpu_xp, rng, b, hq, hkv, tq, tk, d, window):
    cp = gpu_xp
    q, k, v = half(rng, (b, hq, tq, d)), half(rng, (b, hkv, tk, d)), half(rng, (b, hkv, tk, d))
    go = half(rng, (b, hq, tq, d), 100)
    scale, offset = d ** -0.5, tk - tq
    poison(cp, ((b * hkv, hq // hkv * tq, tk), np.float16), ((b, hq, tq, d), np.float16))
    o, p = attention.forward(*(cp.asarray(a) for a in (q, k, v)), scale, window, offset)
    ro, rp = attention.reference_forward(q, k, v, scale, window, offset)
    close16(p, rp, what="P")
    close16(o, ro, what="O")
    grads = attention.backward(*(cp.asarray(a) for a in (go, q, k, v)), p, scale, window, offset)
    for name, ours, ref in zip("qkv", grads, attention.reference_backward(go, q, k, v, rp, scale, window, offset)):
        close16(ours, ref, tol=4e-3, what=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4097, 3_000_001])  # the last needs several grid-stride passes
@pytest.mark.parametrize("decayed", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("copy", ["none", "whole", "middle"])
def test_adamw_kernel(gpu_xp, rng, n, decayed, copy):
    """The fused AdamW step against its NumPy reference: within two float32 ulps (it rounds each
    operation as the reference does, so equal in practice); the float16 copy is float16(master)
    of the whole buffer or of a span in its middle."""
    cp = gpu_xp
    master = rng.standard_normal(n).astype(np.float32)
    m = (0.01 * rng.standard_normal(n)).astype(np.float32)
    v = (1e-4 * rng.random(n)).astype(np.float32)
    grad = (0.05 * rng.standard_normal(n)).astype(np.float32)
    hyper = dict(coef=0.37, lr=3e-3, weight_decay=0.1, num_decayed=int(decayed * n), betas=(0.9, 0.95),
                 eps=1e-8, step=3)
    buffers = [cp.asarray(a) for a in (master, m, v, grad)]
    span = {"none": slice(0, 0), "whole": slice(0, n), "middle": slice(n // 3, n // 3 + max(1, n // 2))}[copy]
    compute = None if copy == "none" else cp.full(span.stop - span.start, np.nan, np.float16)
    adamw.update(*buffers, compute, **hyper, compute_start=span.start)
    expected = adamw.reference_update(master, m, v, grad, None if compute is None else np.float16, **hyper,
                                      compute_span=span)
    for actual, want in zip(buffers, expected[:3]):  # master, m, v
        np.testing.assert_array_max_ulp(cp.asnumpy(actual), want, maxulp=2)
    if compute is not None:
        np.testing.assert_array_equal(cp.asnumpy(compute), cp.asnumpy(buffers[0])[span].astype(np.float16))
        close16(compute, expected[3], what="compute")
    np.testing.assert_array_equal(cp.asnumpy(buffers[3]), grad)  # the gradient is only read


@pytest.mark.gpu
def test_fast_dispatch_through_functional(gpu_xp, rng):
    """F ops on float16 CuPy Tensors give the reference path's results with the fast path on."""
    cp = gpu_xp
    targets = cp.asarray(rng.integers(0, 512, (3, 8)))
    cases = [  # (op, inputs, upstream gradient or None for a scalar, tolerance)
        (lambda x, w: F.rms_norm(x, w), [half(rng, (4, 9, 640), 2), half(rng, 640, 0.1)],
         half(rng, (4, 9, 640)), TOL),
        (lambda x, w: F.rms_norm(x, w, out_dtype=np.float16),  # the float32 stream's input norms
         [half(rng, (4, 9, 640), 2, np.float32), half(rng, 640, 0.1, np.float32)], half(rng, (4, 9, 640)), TOL),
        (lambda x, w: F.rms_norm(x, w), [half(rng, (4, 9, 256), 2), half(rng, 256, 0.1, np.float32)],
         half(rng, (4, 9, 256)), TOL),  # q/k norms: float16 activations, float32 weights
        (F.geglu, [half(rng, (4, 4096), 2)], half(rng, (4, 2048)), TOL),
        (lambda q, k, v: F.attention(q, k, v, 0.0625, window=16),
         [half(rng, (2, 4, 40, 256)), half(rng, (2, 1, 40, 256)), half(rng, (2, 1, 40, 256))],
         half(rng, (2, 4, 40, 256)), 5e-3),
        (lambda z: F.cross_entropy(z, targets) * 1024.0, [half(rng, (3, 8, 512), 3)], None, TOL),
        (lambda x: F.rope(x.transpose(0, 2, 1, 3), 10_000.0), [half(rng, (2, 9, 4, 64))], half(rng, (2, 4, 9, 64)),
         TOL),
    ]
    for fn, arrays, upstream, tol in cases:
        arrays = [cp.asarray(a) for a in arrays]
        upstream = None if upstream is None else cp.asarray(upstream)
        with fast(False):
            ref_out, ref_grads = run_op(fn, arrays, upstream)
        with fast(True):
            out, grads = run_op(fn, arrays, upstream)
        close16(out, ref_out, tol=tol, what="out")
        for g, rg in zip(grads, ref_grads):
            close16(g, rg, tol=tol, what="grad")


@pytest.mark.gpu
def test_fast_training_matches_reference(gpu_xp):
    """20 fp16 updates (AdamW with fp32 masters, loss scaling, clipping) of the tiny preset:
    the fast path's losses equal the reference path's within float16 tolerance."""
    from models import Gemma3, Gemma3Config
    from nn import AdamW, LossScaler

    cp = gpu_xp
    rng = np.random.default_rng(0)
    # A learnable stream (each sequence counts up, mod 64, from a random start), so the loss moves.
    starts = rng.integers(0, 64, (20, 2, 4, 1))
    ids = (starts + np.arange(33)) % 64

    def train(enabled):
        model = Gemma3(Gemma3Config.tiny(), seed=0)
        masters = model.state_dict()
        model.to(device="cuda", dtype=np.float16)
        opt = AdamW(model.named_parameters(), lr=3e-3)
        opt.set_masters(masters)
        scaler, losses = LossScaler(), []
        with fast(enabled):
            for step in range(20):
                total = 0.0
                for micro in range(2):
                    batch = cp.asarray(ids[step, micro])
                    _, loss = model(batch[:, :-1], batch[:, 1:])
                    (loss * (scaler.scale / 2)).backward()
                    total += loss.item() / 2
                result = opt.step(inv_scale=scaler.inv_scale, clip_norm=1.0)
                scaler.update(result.found_inf)
                opt.zero_grad()
                losses.append(total)
        return np.array(losses)

    reference, fused = train(False), train(True)
    assert reference[-1] < reference[0] - 0.5, reference  # it learns
    np.testing.assert_allclose(fused, reference, rtol=5e-3, atol=5e-3,
                               err_msg=f"max |difference| {np.abs(fused - reference).max():.2e}")
