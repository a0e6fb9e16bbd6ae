"""Batched matrix products of float16 arrays on cuBLAS tensor cores, accumulating in float32.

`cupy.matmul` on float16 arrays of more than two dimensions computes in float32 without the
tensor cores (measured 17x slower), so attention calls cuBLAS's strided-batched GEMM itself:
A and B float16, compute type 32F, C float16 or float32.

cuBLAS is column-major; our arrays are row-major (C order). A row-major r x c matrix with
row stride c is the column-major c x r matrix of its transpose, so the row-major product
C = op(A) op(B) (M x N) is computed as the column-major C^T = op(B)^T op(A)^T (N x M): B is
passed first. `cublas_args` works out the arguments; tests check it on the CPU against a
NumPy model of cuBLAS's column-major convention.
"""
import numpy as np

OP_N, OP_T = 0, 1  # cublasOperation_t


def cublas_args(a_shape, b_shape, trans_a=False, trans_b=False):
    """cuBLAS arguments for C[i] = op(A[i]) @ op(B[i]) on C-contiguous (batch, rows, cols) arrays.

    Returns (M, N) and a dict: transa, transb, m, n, k, lda, stride_a, ldb, stride_b, ldc,
    stride_c, batch, where cuBLAS's A is our b and its B is our a.
    """
    batch, ar, ac = a_shape
    batch_b, br, bc = b_shape
    if batch != batch_b:
        raise ValueError(f"batched product of {a_shape} and {b_shape}: batch sizes differ")
    m_rows, k = (ac, ar) if trans_a else (ar, ac)
    kb, n_cols = (bc, br) if trans_b else (br, bc)
    if k != kb:
        raise ValueError(f"batched product of {a_shape} and {b_shape} (trans_a={trans_a}, "
                         f"trans_b={trans_b}): inner sizes {k} and {kb} differ")
    # Column-major, b's buffer is b^T with leading dimension bc. Untransposed, b (k x N) gives
    # b^T = op(B)^T as is; transposed (b is N x k), op(B)^T = b, so cuBLAS must transpose.
    # Likewise for a with leading dimension ac.
    return (m_rows, n_cols), dict(
        transa=OP_T if trans_b else OP_N, transb=OP_T if trans_a else OP_N,
        m=n_cols, n=m_rows, k=k, lda=bc, stride_a=br * bc, ldb=ac, stride_b=ar * ac,
        ldc=n_cols, stride_c=m_rows * n_cols, batch=batch)


def bmm(a, b, trans_a=False, trans_b=False, alpha=1.0, out_dtype=np.float16):
    """alpha op(a[i]) @ op(b[i]) for float16 CuPy arrays (batch, rows, cols), C-contiguous."""
    import cupy
    from cupy.cuda import cublas, runtime
    if a.dtype != np.float16 or b.dtype != np.float16:
        raise TypeError(f"bmm takes float16 arrays, got {a.dtype} and {b.dtype}")
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    (rows, cols), p = cublas_args(a.shape, b.shape, trans_a, trans_b)
    out_dtype = np.dtype(out_dtype)
    c = cupy.empty((p["batch"], rows, cols), out_dtype)
    if c.size == 0:
        return c
    if p["k"] == 0:
        c[...] = 0
        return c
    c_type = runtime.CUDA_R_16F if out_dtype == np.float16 else runtime.CUDA_R_32F
    alpha_h, beta_h = np.array(alpha, np.float32), np.array(0.0, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmStridedBatchedEx(
            handle, p["transa"], p["transb"], p["m"], p["n"], p["k"],
            alpha_h.ctypes.data, b.data.ptr, runtime.CUDA_R_16F, p["lda"], p["stride_a"],
            a.data.ptr, runtime.CUDA_R_16F, p["ldb"], p["stride_b"],
            beta_h.ctypes.data, c.data.ptr, c_type, p["ldc"], p["stride_c"], p["batch"],
            cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)
    return c


def reference_bmm(a, b, trans_a=False, trans_b=False, alpha=1.0, out_dtype=np.float16):
    """NumPy: the same product, float32 accumulation, rounded to out_dtype."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    if trans_a:
        a32 = np.swapaxes(a32, -1, -2)
    if trans_b:
        b32 = np.swapaxes(b32, -1, -2)
    return (np.float32(alpha) * np.matmul(a32, b32)).astype(out_dtype)
