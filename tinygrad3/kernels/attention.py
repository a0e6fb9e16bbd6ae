"""Attention from float16 tensor-core GEMMs and a fused masked softmax.

Shapes as F.attention: q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv). The G = Hq/Hkv
query heads of one kv head are stacked as rows, Q -> (B Hkv, G Tq, D), so row r of a batch is
query position i = r mod Tq, at absolute position pos = q_offset + i, and sees keys j in
[lo, pos] with lo = max(0, pos - window + 1) (lo = 0 without a window).

Forward, with every product a cuBLAS strided-batched GEMM (float16 in, float32 accumulation):
    S = scale Q K^T                (float32 out: the softmax reads exact scores)
    P = masked row softmax of S    (fused kernel, float16 out; P = 0 outside [lo, pos])
    O = P V                        (float16)
Backward (derivation in nn_ops/attention.py):
    dV = P^T dO,   dP = dO V^T (float32),
    dS = scale P (dP - rowsum(P dP))   (fused kernel, float16; 0 where P = 0)
    dQ = dS K,     dK = dS^T Q
P^T dO and dS^T Q contract over the G Tq rows of a kv head, summing its query heads' shares.

The scores are still materialised (B Hkv x G Tq x Tk): this is the batched-GEMM stage, not
a flash attention; fully masked blocks (outside a sliding window) are computed and discarded.
"""
import numpy as np

from ..nn_ops.attention import Attention, causal_mask
from .cuda import kernel
from .gemm import bmm, reference_bmm

THREADS = 128

SOURCE = r"""
#define THREADS 128

__device__ __forceinline__ void visible_keys(long long row, int tq, int tk, int q_offset, int window,
                                             int& lo, int& hi) {
    const int pos = q_offset + (int)(row % tq);
    lo = window > 0 ? max(0, pos - window + 1) : 0;
    hi = min(pos, tk - 1);
}

extern "C" __global__ void masked_softmax_fwd(const float* __restrict__ s, half_t* __restrict__ p,
                                              int tq, int tk, int q_offset, int window) {
    __shared__ float shm[32], shs[32];
    const long long row = blockIdx.x;
    int lo, hi;
    visible_keys(row, tq, tk, q_offset, window, lo, hi);
    const float* sr = s + (size_t)row * tk;
    half_t* pr = p + (size_t)row * tk;
    float m = neg_inf(), sum = 0.f;
    for (int j = lo + threadIdx.x; j <= hi; j += THREADS) online_add(sr[j], m, sum);
    block_max_sum(m, sum, shm, shs);
    const float inv = 1.f / sum;
    for (int j = threadIdx.x; j < tk; j += THREADS)
        pr[j] = (j >= lo && j <= hi) ? f2h(__expf(sr[j] - m) * inv) : (half_t)0;
}

extern "C" __global__ void masked_softmax_bwd(const half_t* __restrict__ p, const float* __restrict__ dp,
                                              half_t* __restrict__ ds, int tq, int tk, int q_offset,
                                              int window, float scale) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    int lo, hi;
    visible_keys(row, tq, tk, q_offset, window, lo, hi);
    const half_t* pr = p + (size_t)row * tk;
    const float* dpr = dp + (size_t)row * tk;
    half_t* dsr = ds + (size_t)row * tk;
    float dot = 0.f;
    for (int j = lo + threadIdx.x; j <= hi; j += THREADS) dot += h2f(pr[j]) * dpr[j];
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < tk; j += THREADS)
        dsr[j] = (j >= lo && j <= hi) ? f2h(h2f(pr[j]) * (dpr[j] - dot) * scale) : (half_t)0;
}
"""


def _grouped(q, k, v):
    import cupy
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    return (cupy.ascontiguousarray(q).reshape(b * hkv, -1, d),
            cupy.ascontiguousarray(k).reshape(b * hkv, tk, d),
            cupy.ascontiguousarray(v).reshape(b * hkv, tk, v.shape[-1]))


def _window(window):
    return np.int32(0 if window is None else window)


def forward(q, k, v, scale, window, q_offset):
    """(O, P): the output (B, Hq, Tq, Dv) float16 and the probabilities the backward needs."""
    import cupy
    qg, kg, vg = _grouped(q, k, v)
    s = bmm(qg, kg, trans_b=True, alpha=scale, out_dtype=np.float32)
    p = cupy.empty(s.shape, np.float16)
    rows, tk = s.shape[0] * s.shape[1], s.shape[2]
    if rows:
        kernel(SOURCE, "masked_softmax_fwd")((rows,), (THREADS,),
                                             (s, p, np.int32(q.shape[2]), np.int32(tk), np.int32(q_offset),
                                              _window(window)))
    del s
    o = bmm(p, vg)
    return o.reshape(q.shape[:3] + (v.shape[-1],)), p


def backward(go, q, k, v, p, scale, window, q_offset, needs=(True, True, True)):
    """(dQ, dK, dV), float16, None where `needs` says no gradient is wanted."""
    import cupy
    qg, kg, vg = _grouped(q, k, v)
    g = cupy.ascontiguousarray(go).reshape(qg.shape[0], -1, go.shape[-1])
    gq = gk = gv = None
    if needs[2]:
        gv = bmm(p, g, trans_a=True).reshape(v.shape)
    if needs[0] or needs[1]:
        dp = bmm(g, vg, trans_b=True, out_dtype=np.float32)
        ds = cupy.empty(p.shape, np.float16)
        rows, tk = p.shape[0] * p.shape[1], p.shape[2]
        if rows:
            kernel(SOURCE, "masked_softmax_bwd")((rows,), (THREADS,),
                                                 (p, dp, ds, np.int32(q.shape[2]), np.int32(tk),
                                                  np.int32(q_offset), _window(window), np.float32(scale)))
        del dp
        if needs[0]:
            gq = bmm(ds, kg).reshape(q.shape)
        if needs[1]:
            gk = bmm(ds, qg, trans_a=True).reshape(k.shape)
    return gq, gk, gv


class FusedAttention(Attention):
    """Attention (nn_ops/attention.py) by the GEMMs and kernels above; saves P (F.attention picks it)."""

    def forward(self, q, k, v):
        out, self.p = forward(q, k, v, self.scale, self.window, self.q_offset)
        self.q, self.k, self.v = q, k, v
        return self._in_layout(out)

    def backward(self, gy):
        return backward(self._out_as_bhtd(gy), self.q, self.k, self.v, self.p, self.scale, self.window,
                        self.q_offset, self.needs_grad)


# ----- NumPy reference ------------------------------------------------------------------------

def _grouped_ref(q, k, v):
    b, hkv = q.shape[0], k.shape[1]
    return (q.reshape(b * hkv, -1, q.shape[-1]), k.reshape(b * hkv, k.shape[2], -1),
            v.reshape(b * hkv, v.shape[2], -1))


def reference_forward(q, k, v, scale, window, q_offset):
    qg, kg, vg = _grouped_ref(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    s = reference_bmm(qg, kg, trans_b=True, alpha=scale, out_dtype=np.float32)
    s = s.reshape(s.shape[0], -1, tq, tk)
    visible = causal_mask(np, tq, tk, q_offset, window)
    m = np.where(visible, s, -np.inf).max(axis=-1, keepdims=True)
    e = np.where(visible, np.exp(s - m), 0)
    p = (e / e.sum(axis=-1, keepdims=True)).astype(np.float16).reshape(qg.shape[0], -1, tk)
    return reference_bmm(p, vg).reshape(q.shape[:3] + (v.shape[-1],)), p


def reference_backward(go, q, k, v, p, scale, window, q_offset):
    qg, kg, vg = _grouped_ref(q, k, v)
    g = go.reshape(qg.shape[0], -1, go.shape[-1])
    tq, tk = q.shape[2], k.shape[2]
    gv = reference_bmm(p, g, trans_a=True).reshape(v.shape)
    dp = reference_bmm(g, vg, trans_b=True, out_dtype=np.float32)
    pf = p.astype(np.float32)
    ds = pf * (dp - (pf * dp).sum(axis=-1, keepdims=True)) * np.float32(scale)
    visible = np.tile(causal_mask(np, tq, tk, q_offset, window), (ds.shape[1] // tq, 1))
    ds = np.where(visible, ds, 0).astype(np.float16)
    return reference_bmm(ds, kg).reshape(q.shape), reference_bmm(ds, qg, trans_a=True).reshape(k.shape), gv
