"""The embedding's weight gradient: out[ids[n], :] += gy[n, :] into a float32 accumulator out
(V, D), for gy (N, D) float16 or float32 and ids (N,) int32 or int64, repeated ids accumulating
(why dW is this scatter-add: reference_backward).

One warp per row n of gy (a grid-stride loop over rows by warps, 8 warps a block, a grid of 8
blocks per SM at most). Vector path (D a multiple of 4, gy aligned to 4 of its values, out to
16 bytes): lane l takes the features 4l..4l+3, 4l+128.., loads them with one 8-byte (float16)
or 16-byte (float32) load and adds them with one 16-byte float32 atomic (sm_90; four scalar
atomics before), so a warp's loads and atomics each cover 128 consecutive features. Otherwise
lane l takes the features l, l + 32, ... with scalar loads and atomics (still coalesced).

The atomics make repeated ids safe, but the order in which they land varies from run to run,
so the last bits of a row with repeated ids may too (as with cupy.add.at). An id outside
[0, V) adds nothing, where NumPy would raise: F.embedding reports such ids after the backward
(nn_ops/common.check_range), and until then nothing may write outside its arrays.
"""
import numpy as np

from .. import backend
from ..nn_ops.embedding import Embedding
from .cuda import VECTOR_IO, grid_stride_blocks, kernel

THREADS = 256
PER_SM = 8  # blocks per SM: the grid's cap, which __launch_bounds__ makes sure fit at once
ID_TYPES = {np.dtype(np.int32): ("i32", "int"), np.dtype(np.int64): ("i64", "long long")}
GY_TYPES = {np.dtype(np.float16): ("f16", "half_t"), np.dtype(np.float32): ("f32", "float")}

SOURCE = r"""
// PTX_HELPERS_BEGIN
// dst[0..3] += v[0..3] for a 16-byte aligned dst: one vector atomic on sm_90 and later.
__device__ __forceinline__ void atomic_add4(float* dst, const float v[4]) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
#else
    for (int k = 0; k < 4; ++k) atomicAdd(dst + k, v[k]);
#endif
}
// PTX_HELPERS_END

__device__ __forceinline__ float to_float(half_t h) { return h2f(h); }
__device__ __forceinline__ float to_float(float x) { return x; }
""" + VECTOR_IO + r"""
// out[ids[r], :] += gy[r, :] for the rows r of this warp.
template <bool VEC, typename G, typename I>
__device__ __forceinline__ void add_rows(const I* __restrict__ ids, const G* __restrict__ gy,
                                         float* __restrict__ out, long long n, long long v, int d) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (long long r = (long long)blockIdx.x * warps + (threadIdx.x >> 5); r < n; r += (long long)gridDim.x * warps) {
        const long long id = ids[r];
        if (id < 0 || id >= v) continue;
        const G* src = gy + r * d;
        float* dst = out + id * d;
        if (VEC) {
            for (int j = 4 * lane; j < d; j += 128) {
                float x[4];
                load4(src + j, x);
                atomic_add4(dst + j, x);
            }
        } else {
            for (int j = lane; j < d; j += 32) atomicAdd(dst + j, to_float(src[j]));
        }
    }
}
"""

ENTRY = r"""
extern "C" __global__ void __launch_bounds__({threads}, {per_sm}) embedding_bwd_{g}_{i}(const {I}* __restrict__ ids,
        const {G}* __restrict__ gy, float* __restrict__ out, long long n, long long v, int d, int vec) {{
    if (vec) add_rows<true>(ids, gy, out, n, v, d);
    else add_rows<false>(ids, gy, out, n, v, d);
}}
"""

SOURCE += "".join(ENTRY.format(threads=THREADS, per_sm=PER_SM, g=g, G=G, i=i, I=I)
                  for g, G in GY_TYPES.values() for i, I in ID_TYPES.values())


def supports(ids, gy, out):
    """True for CuPy arrays: out float32, 2-D, C-contiguous; gy (N, D) float16 or float32 with D
    = out.shape[1]; ids int32 or int64 of shape (N,)."""
    cupy = backend.cupy
    return (cupy is not None and all(isinstance(a, cupy.ndarray) for a in (ids, gy, out))
            and out.dtype == np.float32 and out.ndim == 2 and out.flags.c_contiguous
            and gy.dtype in GY_TYPES and gy.ndim == 2 and gy.shape[1] == out.shape[1]
            and ids.dtype in ID_TYPES and ids.shape == gy.shape[:1])


def vector_ok(gy, out):
    """The vector path's conditions: D a multiple of 4, gy's rows start on 4-value boundaries,
    out's on 16-byte ones."""
    return gy.shape[1] % 4 == 0 and backend.address(gy) % (4 * gy.itemsize) == 0 and backend.address(out) % 16 == 0


# ----- launching: through these names, which tests/test_embedding.py replaces to run the
# same host code with NumPy arrays on the CPU emulator

def _launch(name, blocks, args):
    kernel(SOURCE, name)((blocks,), (THREADS,), args)


def _blocks(rows):
    return grid_stride_blocks(rows, THREADS // 32, per_sm=PER_SM)



def embedding_backward(ids, gy, out):
    """out[ids[n], :] += gy[n, :] for every n, in place (inputs that `supports` accepts); returns out."""
    xp = backend.get_array_module(gy)
    ids, gy = xp.ascontiguousarray(ids), xp.ascontiguousarray(gy)
    n, d = gy.shape
    if n and d:
        name = f"embedding_bwd_{GY_TYPES[gy.dtype][0]}_{ID_TYPES[ids.dtype][0]}"
        _launch(name, _blocks(n), (ids, gy, out, np.int64(n), np.int64(out.shape[0]), np.int32(d),
                                   np.int32(vector_ok(gy, out))))
    return out


class FusedEmbedding(Embedding):
    """Embedding (nn_ops/embedding.py) whose backward adds its rows by the kernel above where the arrays
    are ones it `supports` (a float32 CuPy accumulator), else as the reference does (F.embedding
    picks it)."""

    def add_rows(self, acc, ids, gy):
        if supports(ids, gy, acc):
            return embedding_backward(ids, gy, acc)
        return super().add_rows(acc, ids, gy)


# ----- NumPy reference ------------------------------------------------------------------------

def reference_backward(ids, gy, out):
    """NumPy: out[ids[n], :] += float32(gy[n, :]) for every n, ids in [0, V).

    The forward copies table rows, y[n, :] = W[ids[n], :], so y[n, k] depends on W[r, k] only
    when ids[n] == r, with derivative 1: dL/dW[r, k] = sum_n gy[n, k] [ids[n] == r]. Row r of dW
    is the sum of the gradient rows of every position whose id is r (zero if none), a scatter-add
    in which repeated ids accumulate: np.add.at (a fancy-index `out[ids] += ...` would keep only
    one of them).
    """
    np.add.at(out, ids, gy.astype(np.float32))
    return out
