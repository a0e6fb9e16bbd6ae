"""Mean cross-entropy straight from float16 logits: no float32 copy of the (N, V) logits.

Per row z (V logits) with target t, lse = m + log(sum_k exp(z_k - m)) for m = max z, and

    loss_row = lse - z_t          (0 for an ignored row)
    L = sum of loss_row / N,      N = number of rows not ignored (at least 1)
    dL/dz_k = (exp(z_k - lse) - [k == t]) * gy / N       (0 for ignored rows)

Forward: one block per row reads the row once, keeping per thread a running max and sum of
exp(z - max) (rescaled whenever the max grows), merges them across the block, and writes
lse and loss_row (float32). Backward: one block per row reads z again and writes the
float16 gradient; the product with gy / N is done in float32 and rounded once at the end,
so a loss scale carried in gy lifts small gradients above float16's underflow first.
Rows of V % 8 == 0 halves are read and written 16 bytes at a time.

With `valid` < V, only the first `valid` logits of a row count (the rest are a padded
vocabulary's unused ids): they are left out of the sum, as if they were -inf, and get a zero
gradient. That replaces adding a large negative mask to the logits, a whole extra pass.

A target outside [0, valid) reads no logit: its row's loss is NaN. F.cross_entropy reports such
targets (on the GPU after the fact, see nn_ops/common.check_range); until then the kernels
stay inside their arrays.
"""
import numpy as np

from ..nn_ops.cross_entropy import CrossEntropy
from .cuda import kernel

THREADS = 256

SOURCE = r"""
#define THREADS 256

__device__ __forceinline__ void unpack8(const uint4 q, float* z) {
    const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        z[2 * k] = h2f((half_t)(w[k] & 0xffffu));
        z[2 * k + 1] = h2f((half_t)(w[k] >> 16));
    }
}

extern "C" __global__ void ce_fwd(const half_t* __restrict__ logits, const long long* __restrict__ targets,
                                  float* __restrict__ lse_out, float* __restrict__ loss_out,
                                  int V, int Vv, long long ignore, int vec) {
    __shared__ float shm[32], shs[32];
    const half_t* z = logits + (size_t)blockIdx.x * V;
    float m = neg_inf(), s = 0.f;
    if (vec) {
        const uint4* z8 = reinterpret_cast<const uint4*>(z);
        for (int i = threadIdx.x; i < (Vv + 7) / 8; i += THREADS) {  // every 8 hold a valid logit
            float v[8];
            unpack8(z8[i], v);
#pragma unroll
            for (int k = 0; k < 8; ++k) if (8 * i + k >= Vv) v[k] = neg_inf();
            float mx = v[0];
#pragma unroll
            for (int k = 1; k < 8; ++k) mx = fmaxf(mx, v[k]);
            if (mx > m) { s *= __expf(m - mx); m = mx; }
#pragma unroll
            for (int k = 0; k < 8; ++k) s += __expf(v[k] - m);
        }
    } else {
        for (int i = threadIdx.x; i < Vv; i += THREADS) online_add(h2f(z[i]), m, s);
    }
    block_max_sum(m, s, shm, shs);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        const long long t = targets[blockIdx.x];
        lse_out[blockIdx.x] = lse;
        loss_out[blockIdx.x] = t == ignore ? 0.f : (t >= 0 && t < Vv) ? lse - h2f(z[t]) : __int_as_float(0x7fc00000);
    }
}

// gx may be logits itself (the gradient written over the logits): each thread reads its elements
// before it writes them and no thread touches another's, so logits and gx are not __restrict__.
extern "C" __global__ void ce_bwd(const half_t* logits, const long long* __restrict__ targets,
                                  const float* __restrict__ lse, const float* __restrict__ coef,
                                  half_t* gx, int V, int Vv, long long ignore, int vec) {
    const size_t base = (size_t)blockIdx.x * V;
    const long long t = targets[blockIdx.x];
    const float c = t == ignore ? 0.f : coef[0];
    const float l = lse[blockIdx.x];
    if (vec) {
        const uint4* z8 = reinterpret_cast<const uint4*>(logits + base);
        uint4* g8 = reinterpret_cast<uint4*>(gx + base);
        for (int i = threadIdx.x; i < V / 8; i += THREADS) {
            float v[8];
            unpack8(z8[i], v);
            unsigned int w[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const long long j = 8LL * i + 2 * k;
                const float lo = j < Vv ? (__expf(v[2 * k] - l) - (j == t ? 1.f : 0.f)) * c : 0.f;
                const float hi = j + 1 < Vv ? (__expf(v[2 * k + 1] - l) - (j + 1 == t ? 1.f : 0.f)) * c : 0.f;
                w[k] = (unsigned int)f2h(lo) | ((unsigned int)f2h(hi) << 16);
            }
            g8[i] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += THREADS)
            gx[base + i] = i < Vv ? f2h((__expf(h2f(logits[base + i]) - l) - (i == t ? 1.f : 0.f)) * c) : (half_t)0;
    }
}
"""


def _vec(logits):
    return int(logits.shape[-1] % 8 == 0 and logits.data.ptr % 16 == 0)


def forward(logits, targets, ignore_index, valid=None):
    """(loss, lse, denom): the mean loss (float32 0-d), per-row lse, and the count N (float32 0-d)
    for float16 CuPy logits (..., V) and integer targets of the leading shape; only the first
    `valid` logits of a row count (all when None)."""
    import cupy
    v = logits.shape[-1]
    z = cupy.ascontiguousarray(logits).reshape(-1, v)
    t = cupy.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
    rows = z.shape[0]
    lse, per_row = cupy.empty(rows, np.float32), cupy.empty(rows, np.float32)
    if rows:
        kernel(SOURCE, "ce_fwd")((rows,), (THREADS,),
                                 (z, t, lse, per_row, np.int32(v), np.int32(valid or v), np.int64(ignore_index),
                                  np.int32(_vec(z))))
    denom = cupy.maximum((t != ignore_index).sum(), 1).astype(np.float32)
    return per_row.sum() / denom, lse, denom


def backward(gy, logits, targets, lse, denom, ignore_index, valid=None, in_place=False):
    """dL/dlogits, float16, logits' shape (zero in the columns past `valid`); in_place: written over
    the (contiguous) logits, which are then gone."""
    import cupy
    v = logits.shape[-1]
    z = cupy.ascontiguousarray(logits).reshape(-1, v)
    t = cupy.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
    coef = (gy.astype(np.float32) / denom).reshape(1)
    gx = z if in_place else cupy.empty_like(z)
    if z.shape[0]:
        kernel(SOURCE, "ce_bwd")((z.shape[0],), (THREADS,),
                                 (z, t, lse, coef, gx, np.int32(v), np.int32(valid or v), np.int64(ignore_index),
                                  np.int32(_vec(z))))
    return gx.reshape(logits.shape)


class FusedCrossEntropy(CrossEntropy):
    """CrossEntropy (nn_ops/cross_entropy.py) by the kernels above, no float32 copy of the logits
    (F.cross_entropy and the blocks of F.linear_cross_entropy pick it)."""

    def forward(self, logits, targets):
        loss, self.lse, self.denom = forward(logits, targets, self.ignore_index, self.valid_vocab)
        self.logits, self.targets = logits, targets
        return loss

    def backward(self, gy):
        return backward(gy, self.logits, self.targets, self.lse, self.denom, self.ignore_index, self.valid_vocab,
                        in_place=self.overwrite), None


# ----- NumPy reference ------------------------------------------------------------------------

def reference_forward(logits, targets, ignore_index, valid=None):
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float32)
    t = targets.reshape(-1)
    zv = z[:, :valid]
    m = zv.max(axis=-1)
    lse = m + np.log(np.exp(zv - m[:, None]).sum(axis=-1))
    valid = t != ignore_index
    per_row = np.where(valid, lse - z[np.arange(len(t)), np.where(valid, t, 0)], 0).astype(np.float32)
    denom = np.float32(max(int(valid.sum()), 1))
    return per_row.sum() / denom, lse, denom


def reference_backward(gy, logits, targets, lse, denom, ignore_index, valid_vocab=None):
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float32)
    t = targets.reshape(-1)
    valid = t != ignore_index
    g = np.exp(z - lse[:, None])
    g[:, z.shape[1] if valid_vocab is None else valid_vocab:] = 0
    g[np.arange(len(t))[valid], t[valid]] -= 1
    g *= (np.float32(gy) / denom) * valid[:, None]
    return g.astype(np.float16).reshape(logits.shape)
