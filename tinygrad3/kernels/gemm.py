"""Matrix products of float16 arrays on cuBLAS tensor cores, accumulating in float32.

`cupy.matmul` on float16 arrays of more than two dimensions computes in float32 without the
tensor cores (measured 17x slower), so attention calls cuBLAS's strided-batched GEMM itself:
A and B float16, compute type 32F, C float16 or float32. The linears' 2-D products (`mm`) go
through the same call with a batch of one.

cuBLAS is called through ctypes on a handle of our own rather than through CuPy's wrappers,
because CuPy refuses every cuBLAS call while a stream is being captured into a CUDA graph
(cupy issue 6290; it re-binds its handle to the current stream on each call, and that check
raises). cuBLAS itself can be captured when the handle has a workspace of its own
(cublasSetWorkspace) and the scalars alpha/beta are host values, read at the call: `_Blas`
gives the handle a 32 MiB workspace and re-binds stream and workspace only when the current
stream changes (cublasSetStream drops the workspace, so both go together). Large products that
overwrite their output run the algorithm gemm_lt.py timed fastest for their shape, through
cuBLASLt on the same workspace; the others, cuBLAS's own choice.

cuBLAS is column-major; our arrays are row-major (C order). A row-major r x c matrix with
row stride c is the column-major c x r matrix of its transpose, so the row-major product
C = op(A) op(B) (M x N) is computed as the column-major C^T = op(B)^T op(A)^T (N x M): B is
passed first. `cublas_args` works out the arguments; tests check it on the CPU against a
NumPy model of cuBLAS's column-major convention.
"""
import ctypes
import functools

import numpy as np

from ..nn_ops.linear import Linear
from . import gemm_lt

OP_N, OP_T = 0, 1  # cublasOperation_t
CUDA_R_16F, CUDA_R_32F = 2, 0  # cudaDataType
CUBLAS_COMPUTE_32F = 68  # cublasComputeType_t
CUBLAS_GEMM_DEFAULT = -1  # cublasGemmAlgo_t
WORKSPACE_BYTES = 32 << 20  # what cuBLAS recommends on Hopper


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


def _loaded_cublas_path():
    """The libcublas CuPy has loaded (so both use the same library), from the process's maps."""
    from cupy.cuda import device
    device.get_cublas_handle()  # makes CuPy load libcublas
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/libcublas.so" in path:
                return path
    return "libcublas.so"


class _Blas:
    """One cuBLAS handle of our own, with its own workspace, bound to the current stream."""

    def __init__(self):
        import cupy
        path = _loaded_cublas_path()
        lib = ctypes.CDLL(path)
        p, i32, i64, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_size_t
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
        lib.cublasSetStream_v2.argtypes = [p, p]
        lib.cublasSetWorkspace_v2.argtypes = [p, p, u64]
        lib.cublasGemmStridedBatchedEx.argtypes = [
            p, i32, i32, i32, i32, i32, p, p, i32, i32, i64, p, i32, i32, i64, p, p, i32, i32, i64,
            i32, i32, i32]
        self.lib, self.handle = lib, p()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.empty(WORKSPACE_BYTES, np.uint8)
        self.stream = None
        self.one, self.zero = np.ones(1, np.float32), np.zeros(1, np.float32)
        self.tuner = gemm_lt.Tuner(path, self.workspace, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16F)

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def bind(self, stream_ptr):
        if stream_ptr != self.stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, stream_ptr), "cublasSetStream")
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, self.workspace.data.ptr, WORKSPACE_BYTES),
                        "cublasSetWorkspace")
            self.stream = stream_ptr

    def gemm(self, a, b, c, p, alpha, beta):
        import cupy
        stream = cupy.cuda.get_current_stream().ptr
        self.bind(stream)
        tune = gemm_lt.worth_timing(p, beta)
        alpha = self.one if alpha == 1.0 else np.array([alpha], np.float32)
        beta = self.zero if beta == 0.0 else np.array([beta], np.float32)
        c_type = CUDA_R_16F if c.dtype == np.float16 else CUDA_R_32F

        def own_call():
            self._check(self.lib.cublasGemmStridedBatchedEx(
                self.handle, p["transa"], p["transb"], p["m"], p["n"], p["k"],
                alpha.ctypes.data, b.data.ptr, CUDA_R_16F, p["lda"], p["stride_a"],
                a.data.ptr, CUDA_R_16F, p["ldb"], p["stride_b"],
                beta.ctypes.data, c.data.ptr, c_type, p["ldc"], p["stride_c"], p["batch"],
                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmStridedBatchedEx")

        def lt_call(plan):  # cuBLAS's A is our b (module docstring)
            self.tuner.matmul(plan, alpha, b.data.ptr, a.data.ptr, beta, c.data.ptr, stream)

        plan = self.tuner.plan((tuple(p.values()), c_type), p, c_type, own_call, lt_call) if tune else None
        if plan is None:
            own_call()
        else:
            lt_call(plan)


@functools.lru_cache(maxsize=None)
def _blas(device_id):
    return _Blas()


def bmm(a, b, trans_a=False, trans_b=False, alpha=1.0, out_dtype=np.float16, out=None):
    """alpha op(a[i]) @ op(b[i]) for float16 CuPy arrays (batch, rows, cols), C-contiguous.

    out: a C-contiguous float16/float32 array of the result's shape to ADD the product to
    (cuBLAS's beta = 1), e.g. a float32 weight gradient summed over blocks of rows.
    """
    import cupy
    if a.dtype != np.float16 or b.dtype != np.float16:
        raise TypeError(f"bmm takes float16 arrays, got {a.dtype} and {b.dtype}")
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    (rows, cols), p = cublas_args(a.shape, b.shape, trans_a, trans_b)
    shape = (p["batch"], rows, cols)
    if out is not None and (out.shape != shape or not out.flags.c_contiguous
                            or out.dtype not in (np.float16, np.float32)):
        raise ValueError(f"bmm: out must be a C-contiguous float16/float32 array of shape {shape}")
    c = cupy.empty(shape, np.dtype(out_dtype)) if out is None else out
    if c.size == 0 or (p["k"] == 0 and out is not None):
        return c
    if p["k"] == 0:
        c[...] = 0
        return c
    _blas(cupy.cuda.Device().id).gemm(a, b, c, p, alpha, 0.0 if out is None else 1.0)
    return c


def mm(a, b, trans_a=False, trans_b=False, out_dtype=np.float16, out=None):
    """op(a) @ op(b) for 2-D float16 CuPy arrays: `bmm` with a batch of one (out: add to it)."""
    return bmm(a[None], b[None], trans_a, trans_b, out_dtype=out_dtype,
               out=None if out is None else out[None])[0]


def reference_bmm(a, b, trans_a=False, trans_b=False, alpha=1.0, out_dtype=np.float16):
    """NumPy: the same product, float32 accumulation, rounded to out_dtype."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    if trans_a:
        a32 = np.swapaxes(a32, -1, -2)
    if trans_b:
        b32 = np.swapaxes(b32, -1, -2)
    return (np.float32(alpha) * np.matmul(a32, b32)).astype(out_dtype)


class GemmLinear(Linear):
    """Linear (nn_ops/linear.py) with its float16 products by `mm` (F.linear picks it)."""

    mm = staticmethod(mm)
