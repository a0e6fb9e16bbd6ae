"""The algorithm of each large float16 product, chosen by timing cuBLASLt's candidates once.

cuBLAS picks one algorithm per call from a heuristic. For several of the model's products
another of the candidates that cuBLASLt's heuristic lists is measurably faster on the same GPU
(the head's products by 10-20%, the MLP's gate/up forward by 8%: bench/gemm_algos.py). So the
first time a product of a new shape is made outside a CUDA-graph capture, `Tuner.plan` times
cuBLAS's own call and each candidate (one warm-up and three timed calls each, CUDA events) and
keeps the fastest for that shape; later calls, captured or not, reuse it.

Only products that overwrite their output (beta = 0) are timed, in place on the call's own arrays:
each trial writes the same product into the output, and the caller then makes it once more with
the choice. Products that add into their output (beta = 1, the float32 weight gradients) and small
ones (m n k below TUNE_MIN_MACS, where a call's host time is as long as its GPU time and timing
would measure the host) keep cuBLAS's choice. Every algorithm computes the same sums in float32;
which one runs changes only the order of the additions, so two machines (or two runs, where
candidates time within noise of each other) may differ in the last bits.
"""
import ctypes

TUNE_MIN_MACS = 1 << 30   # m n k (times the batch) from which a product is timed
CANDIDATES = 8            # of cuBLASLt's heuristic
TIMED_CALLS = 3

DESC_TRANSA, DESC_TRANSB = 3, 4                       # cublasLtMatmulDescAttributes_t
LAYOUT_BATCH_COUNT, LAYOUT_STRIDED_BATCH_OFFSET = 5, 6  # cublasLtMatrixLayoutAttribute_t
PREF_MAX_WORKSPACE_BYTES = 1                          # cublasLtMatmulPreferenceAttributes_t
OP_N = 0


def layouts(p):
    """(rows, cols, ld, batch, stride) of cuBLASLt's A, B and C for gemm.cublas_args' p: A and B as
    they are stored (column-major, before their op), C as the m x n result."""
    m, n, k = p["m"], p["n"], p["k"]
    a = (m, k) if p["transa"] == OP_N else (k, m)
    b = (k, n) if p["transb"] == OP_N else (n, k)
    return [a + (p["lda"], p["batch"], p["stride_a"]), b + (p["ldb"], p["batch"], p["stride_b"]),
            (m, n, p["ldc"], p["batch"], p["stride_c"])]


def worth_timing(p, beta):
    return beta == 0.0 and p["m"] * p["n"] * p["k"] * p["batch"] >= TUNE_MIN_MACS


class _Result(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class Plan:
    """One cuBLASLt product: its descriptor, the layouts of A, B and C, and an algorithm."""

    def __init__(self, desc, mats, algo):
        self.desc, self.mats, self.algo = desc, mats, algo


class Tuner:
    """cuBLASLt (the library beside `blas_path`'s libcublas) and the choice made for each shape."""

    def __init__(self, blas_path, workspace, compute_type, scale_type, a_type):
        self.lib = ctypes.CDLL(blas_path.replace("libcublas.so", "libcublasLt.so"))
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = workspace
        self.types = compute_type, scale_type, a_type
        self.plans = {}   # shape key -> Plan, or None: cuBLAS's own call was the fastest

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _set(self, fn, obj, attr, value, ctype):
        v = ctype(value)
        self._check(fn(obj, attr, ctypes.byref(v), ctypes.c_size_t(ctypes.sizeof(v))), fn.__name__)

    def _layout(self, dtype, rows, cols, ld, batch, stride):
        out = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(out), dtype, ctypes.c_uint64(rows),
                                                        ctypes.c_uint64(cols), ctypes.c_int64(ld)), "layout")
        if batch > 1:
            self._set(self.lib.cublasLtMatrixLayoutSetAttribute, out, LAYOUT_BATCH_COUNT, batch, ctypes.c_int32)
            self._set(self.lib.cublasLtMatrixLayoutSetAttribute, out, LAYOUT_STRIDED_BATCH_OFFSET, stride,
                      ctypes.c_int64)
        return out

    def candidates(self, p, c_type):
        """Plans of cuBLASLt's heuristic for p (at most CANDIDATES), fastest-expected first."""
        compute, scale, a_type = self.types
        desc = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), compute, scale), "matmul desc")
        self._set(self.lib.cublasLtMatmulDescSetAttribute, desc, DESC_TRANSA, p["transa"], ctypes.c_int32)
        self._set(self.lib.cublasLtMatmulDescSetAttribute, desc, DESC_TRANSB, p["transb"], ctypes.c_int32)
        mats = [self._layout(t, *lay) for t, lay in zip((a_type, a_type, c_type), layouts(p))]
        pref = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        self._set(self.lib.cublasLtMatmulPreferenceSetAttribute, pref, PREF_MAX_WORKSPACE_BYTES,
                  self.workspace.nbytes, ctypes.c_uint64)
        found, results = ctypes.c_int(), (_Result * CANDIDATES)()
        status = self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, mats[0], mats[1], mats[2], mats[2],
                                                         pref, CANDIDATES, results, ctypes.byref(found))
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        if status != 0:
            return []
        return [Plan(desc, mats, r.algo) for r in results[:found.value] if r.state == 0]

    def matmul(self, plan, alpha, a_ptr, b_ptr, beta, c_ptr, stream_ptr):
        """C = alpha op(A) op(B) + beta C by the plan (alpha, beta: float32 NumPy arrays of one)."""
        a, b, c = plan.mats
        self._check(self.lib.cublasLtMatmul(
            self.handle, plan.desc, ctypes.c_void_p(alpha.ctypes.data), ctypes.c_void_p(a_ptr), a,
            ctypes.c_void_p(b_ptr), b, ctypes.c_void_p(beta.ctypes.data), ctypes.c_void_p(c_ptr), c,
            ctypes.c_void_p(c_ptr), c, ctypes.byref(plan.algo), ctypes.c_void_p(self.workspace.data.ptr),
            ctypes.c_size_t(self.workspace.nbytes), ctypes.c_void_p(stream_ptr)), "cublasLtMatmul")

    def plan(self, key, p, c_type, own_call, lt_call):
        """The Plan for this shape (None: cuBLAS's own call), timing the candidates the first time
        when no graph is being captured; `own_call()` and `lt_call(plan)` make the product."""
        if key in self.plans:
            return self.plans[key]
        import cupy
        stream = cupy.cuda.get_current_stream()
        if cupy.cuda.runtime.streamIsCapturing(stream.ptr):
            return None   # no timing inside a capture: cuBLAS's choice, and the shape is timed later
        options = [None] + self.candidates(p, c_type)
        times = []
        for plan in options:
            run = own_call if plan is None else (lambda plan=plan: lt_call(plan))
            try:
                times.append(_time(cupy, stream, run))
            except RuntimeError:   # a candidate that refuses these operands
                times.append(float("inf"))
        self.plans[key] = options[min(range(len(options)), key=times.__getitem__)]
        return self.plans[key]


def _time(cupy, stream, run):
    run()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(TIMED_CALLS):
        run()
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end)
