"""The algorithm choice for large products (tinygrad3/kernels/gemm_lt.py).

CPU (CI): cuBLASLt's layouts, read as cuBLAS reads column-major buffers, give our row-major
product for every transposition; which products are timed (never those that add into their output).
GPU (`gpu` marker): every candidate cuBLASLt offers gives the product, the timed choice too, an
accumulating product adds, and a chosen algorithm is what a CUDA graph captures.
"""
import numpy as np
import pytest

from tinygrad3.cuda_graph import CudaGraph
from tinygrad3.kernels import gemm, gemm_lt

from test_kernels import close16, half, tol_of

TRANS = [(False, False), (False, True), (True, False), (True, True)]


def colmajor(buf, start, rows, cols, ld):
    """The column-major rows x cols matrix with leading dimension ld at buf[start:]."""
    return buf[start:start + ld * cols].reshape(cols, ld)[:, :rows].T


def lt_product(p, a_buf, b_buf):
    """What cublasLtMatmul computes from gemm_lt.layouts(p), per batch: C = op(A) op(B)."""
    (ar, ac, lda, batch, sa), (br, bc, ldb, _, sb), (m, n, ldc, _, sc) = gemm_lt.layouts(p)
    c = np.zeros(batch * sc)
    for i in range(batch):
        a = colmajor(a_buf, i * sa, ar, ac, lda)
        b = colmajor(b_buf, i * sb, br, bc, ldb)
        op_a, op_b = (a.T if p["transa"] else a), (b.T if p["transb"] else b)
        assert op_a.shape == (m, p["k"]) and op_b.shape == (p["k"], n)
        c[i * sc:i * sc + ldc * n].reshape(n, ldc)[:, :m] = (op_a @ op_b).T
    return c


@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_layouts_give_the_row_major_product(rng, trans_a, trans_b):
    m, k, n = 5, 3, 4
    a = rng.standard_normal((2, k, m) if trans_a else (2, m, k))
    b = rng.standard_normal((2, n, k) if trans_b else (2, k, n))
    _, p = gemm.cublas_args(a.shape, b.shape, trans_a, trans_b)
    c = lt_product(p, b.ravel(), a.ravel())   # cuBLAS's A is our b
    expected = (np.swapaxes(a, 1, 2) if trans_a else a) @ (np.swapaxes(b, 1, 2) if trans_b else b)
    np.testing.assert_allclose(c.reshape(2, m, n), expected, rtol=1e-12)


def test_only_large_products_that_overwrite_their_output_are_timed():
    big = gemm.cublas_args((1, 1024, 1024), (1, 1024, 1024))[1]
    just_small = gemm.cublas_args((1, 1024, 1023), (1, 1023, 1024))[1]
    batched = gemm.cublas_args((2, 512, 1024), (2, 1024, 1024))[1]
    assert gemm_lt.worth_timing(big, 0.0) and gemm_lt.worth_timing(batched, 0.0)
    assert not gemm_lt.worth_timing(just_small, 0.0)
    assert not gemm_lt.worth_timing(big, 1.0)   # timing in place would add the product several times


# ----- GPU ---------------------------------------------------------------------------------------

def large_operands(rng, trans_a, trans_b, batch=1):
    m, k, n = (1024, 512, 2048) if batch == 1 else (512, 512, 2048)
    a = half(rng, (batch, k, m) if trans_a else (batch, m, k), 0.1)
    b = half(rng, (batch, n, k) if trans_b else (batch, k, n), 0.1)
    return a, b


@pytest.mark.gpu
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_every_candidate_and_the_choice_give_the_product(gpu_xp, rng, trans_a, trans_b, out_dtype):
    cp = gpu_xp
    a, b = large_operands(rng, trans_a, trans_b, batch=1 if trans_a == trans_b else 2)
    expected = gemm.reference_bmm(a, b, trans_a, trans_b, out_dtype=out_dtype)
    ga, gb = cp.asarray(a), cp.asarray(b)
    _, p = gemm.cublas_args(a.shape, b.shape, trans_a, trans_b)
    assert gemm_lt.worth_timing(p, 0.0)
    blas = gemm._blas(cp.cuda.Device().id)
    c_type = gemm.CUDA_R_16F if out_dtype == np.float16 else gemm.CUDA_R_32F
    plans = blas.tuner.candidates(p, c_type)
    assert plans, "cuBLASLt offered no algorithm"
    for i, plan in enumerate(plans):
        c = cp.full(expected.shape, np.nan, out_dtype)
        blas.tuner.matmul(plan, blas.one, gb.data.ptr, ga.data.ptr, blas.zero, c.data.ptr,
                          cp.cuda.get_current_stream().ptr)
        close16(c, expected, tol=tol_of(out_dtype), what=f"candidate {i}")
    c = gemm.bmm(ga, gb, trans_a, trans_b, out_dtype=out_dtype)   # times them, then makes it
    close16(c, expected, tol=tol_of(out_dtype), what="chosen")
    assert (tuple(p.values()), c_type) in blas.tuner.plans
    close16(gemm.bmm(ga, gb, trans_a, trans_b, out_dtype=out_dtype), expected, tol=tol_of(out_dtype),
            what="chosen, second call")


@pytest.mark.gpu
def test_a_large_product_into_out_adds_once(gpu_xp, rng):
    cp = gpu_xp
    a, b = large_operands(rng, False, True)
    start = half(rng, (1, 1024, 2048), dtype=np.float32)
    out = cp.asarray(start)
    gemm.bmm(cp.asarray(a), cp.asarray(b), False, True, out=out)
    expected = start + gemm.reference_bmm(a, b, False, True, out_dtype=np.float32)
    np.testing.assert_allclose(cp.asnumpy(out), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.gpu
def test_graphs_capture_the_chosen_algorithm_and_time_no_shape_inside(gpu_xp, rng):
    cp = gpu_xp
    tuner = gemm._blas(cp.cuda.Device().id).tuner
    a, b = large_operands(rng, True, False)
    ga, gb = cp.asarray(a), cp.asarray(b)
    gemm.bmm(ga, gb, True, False)                      # timed here, outside the capture
    graph = CudaGraph(lambda: gemm.bmm(ga, gb, True, False))
    untimed = half(rng, (1, 1536, 512), 0.1), half(rng, (1, 512, 1536), 0.1)
    ua, ub = cp.asarray(untimed[0]), cp.asarray(untimed[1])
    key = (tuple(gemm.cublas_args(ua.shape, ub.shape)[1].values()), gemm.CUDA_R_16F)
    assert key not in tuner.plans
    untimed_graph = CudaGraph(lambda: gemm.bmm(ua, ub))   # cuBLAS's own call inside the capture
    assert key not in tuner.plans
    for _ in range(2):
        a, b = large_operands(rng, True, False)
        ga[...], gb[...] = cp.asarray(a), cp.asarray(b)
        graph.replay()
        close16(graph.outputs, gemm.reference_bmm(a, b, True, False), what="replayed")
    untimed_graph.replay()
    close16(untimed_graph.outputs, gemm.reference_bmm(*untimed), what="untimed, replayed")
