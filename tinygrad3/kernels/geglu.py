"""GeGLU, y = gelu_tanh(gate) * up, fused, for float16 arrays of one shape.

It reproduces the unfused pair `F.gelu_tanh(gate) * up` of the reference path rounding for
rounding: the GELU is computed in float32 and rounded to float16 (a), then multiplied by up
in float16. With u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u):

    a = gelu(x) = 0.5 x (1 + t)
    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

Backward of y = a * up: d_up = gy a, d_a = gy up (both float16 products, as the unfused
multiply's backward), then d_gate = d_a gelu'(gate) in float32, rounded once.

Unlike the unfused pair, the forward saves only gate and up: a and t are recomputed.

Both kernels are memory-bound (the forward moves 6 bytes per element, the backward 10), so
what they need is bytes in flight: each access moves 16 bytes.

Vector kernels (geglu_fwd_vec, geglu_bwd_vec), when every array starts on a 16-byte boundary
(CuPy's allocations do; a view at an odd offset does not): a grid-stride loop over vectors of
8 halves, one 16-byte load of gate and of up (and of gy) per vector, one 16-byte store of y
(of g_gate and of g_up). Each iteration takes two vectors, v and v + stride, and issues all of
their loads before any arithmetic, so a thread has 64 bytes (backward: 96) of loads in flight.
The last n % 8 elements (n not a multiple of 8) are taken one each by the grid's first threads.
The grid is BLOCKS_PER_SM blocks per SM (the kernels' __launch_bounds__), one wave.

Fallback (geglu_fwd, geglu_bwd): the same grid-stride loop over single elements, for arrays
that are not 16-byte aligned. Every path computes each element with the same device functions
(geglu_one, geglu_grad_one), so they agree bit for bit.
"""
import math

import numpy as np

from ..backend import get_array_module
from ..nn_ops.geglu import GeGLU
from .cuda import address, grid_stride_blocks, kernel

THREADS = 256
VEC = 8              # halves per 16-byte vector
BLOCKS_PER_SM = 4    # the vector kernels' __launch_bounds__ and grid: one wave

SOURCE = r"""
#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f

// PTX_HELPERS_BEGIN
// 16 bytes (8 halves) at a 16-byte aligned p.
__device__ __forceinline__ uint4 load16(const half_t* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void store16(half_t* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
// PTX_HELPERS_END

__device__ __forceinline__ float tanh_arg(float x) { return GELU_C * (x + GELU_A * (x * x * x)); }

__device__ __forceinline__ half_t geglu_one(half_t gate, half_t up) {
    const float x = h2f(gate);
    const float a = h2f(f2h(0.5f * x * (1.f + tanhf(tanh_arg(x)))));
    return f2h(a * h2f(up));
}

__device__ __forceinline__ void geglu_grad_one(half_t gy, half_t gate, half_t up, half_t& g_gate, half_t& g_up) {
    const float x = h2f(gate), g = h2f(gy);
    const float t = tanhf(tanh_arg(x));
    const float a = h2f(f2h(0.5f * x * (1.f + t)));
    const float ga = h2f(f2h(g * h2f(up)));
    const float d = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_C * (1.f + 3.f * GELU_A * x * x);
    g_up = f2h(g * a);
    g_gate = f2h(ga * d);
}

// Half k (0..7) of a vector, and a vector from 8 halves.
__device__ __forceinline__ half_t half_of(const uint4& v, int k) {
    const unsigned w = k < 2 ? v.x : k < 4 ? v.y : k < 6 ? v.z : v.w;
    return (half_t)(k & 1 ? w >> 16 : w & 0xffffu);
}
__device__ __forceinline__ uint4 pack8(const half_t h[8]) {
    uint4 v;
    v.x = (unsigned)h[0] | ((unsigned)h[1] << 16);
    v.y = (unsigned)h[2] | ((unsigned)h[3] << 16);
    v.z = (unsigned)h[4] | ((unsigned)h[5] << 16);
    v.w = (unsigned)h[6] | ((unsigned)h[7] << 16);
    return v;
}

__device__ __forceinline__ uint4 geglu8(const uint4& gate, const uint4& up) {
    half_t y[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) y[k] = geglu_one(half_of(gate, k), half_of(up, k));
    return pack8(y);
}

__device__ __forceinline__ void geglu_grad8(const uint4& gy, const uint4& gate, const uint4& up,
                                            uint4& g_gate, uint4& g_up) {
    half_t dg[8], du[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) geglu_grad_one(half_of(gy, k), half_of(gate, k), half_of(up, k), dg[k], du[k]);
    g_gate = pack8(dg);
    g_up = pack8(du);
}

// ----- fallback: one element per thread and iteration, any alignment
extern "C" __global__ void geglu_fwd(const half_t* __restrict__ gate, const half_t* __restrict__ up,
                                     half_t* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        y[i] = geglu_one(gate[i], up[i]);
}

extern "C" __global__ void geglu_bwd(const half_t* __restrict__ gy, const half_t* __restrict__ gate,
                                     const half_t* __restrict__ up, half_t* __restrict__ g_gate,
                                     half_t* __restrict__ g_up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        geglu_grad_one(gy[i], gate[i], up[i], g_gate[i], g_up[i]);
}

// ----- vector kernels: every array 16-byte aligned; vectors v, v + stride per iteration, loads first
extern "C" __global__ void __launch_bounds__(256, 4) geglu_fwd_vec(const half_t* __restrict__ gate,
                                                                   const half_t* __restrict__ up,
                                                                   half_t* __restrict__ y, long long n) {
    const long long vecs = n >> 3, stride = (long long)blockDim.x * gridDim.x;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long v = first;
    for (; v + stride < vecs; v += 2 * stride) {
        const uint4 g0 = load16(gate + 8 * v), u0 = load16(up + 8 * v);
        const uint4 g1 = load16(gate + 8 * (v + stride)), u1 = load16(up + 8 * (v + stride));
        store16(y + 8 * v, geglu8(g0, u0));
        store16(y + 8 * (v + stride), geglu8(g1, u1));
    }
    if (v < vecs) store16(y + 8 * v, geglu8(load16(gate + 8 * v), load16(up + 8 * v)));
    const long long i = 8 * vecs + first;  // the tail, n % 8 elements
    if (i < n) y[i] = geglu_one(gate[i], up[i]);
}

extern "C" __global__ void __launch_bounds__(256, 4) geglu_bwd_vec(const half_t* __restrict__ gy,
                                                                   const half_t* __restrict__ gate,
                                                                   const half_t* __restrict__ up,
                                                                   half_t* __restrict__ g_gate,
                                                                   half_t* __restrict__ g_up, long long n) {
    const long long vecs = n >> 3, stride = (long long)blockDim.x * gridDim.x;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long v = first;
    uint4 dg, du;
    for (; v + stride < vecs; v += 2 * stride) {
        const long long o0 = 8 * v, o1 = 8 * (v + stride);
        const uint4 y0 = load16(gy + o0), g0 = load16(gate + o0), u0 = load16(up + o0);
        const uint4 y1 = load16(gy + o1), g1 = load16(gate + o1), u1 = load16(up + o1);
        geglu_grad8(y0, g0, u0, dg, du);
        store16(g_gate + o0, dg);
        store16(g_up + o0, du);
        geglu_grad8(y1, g1, u1, dg, du);
        store16(g_gate + o1, dg);
        store16(g_up + o1, du);
    }
    if (v < vecs) {
        geglu_grad8(load16(gy + 8 * v), load16(gate + 8 * v), load16(up + 8 * v), dg, du);
        store16(g_gate + 8 * v, dg);
        store16(g_up + 8 * v, du);
    }
    const long long i = 8 * vecs + first;  // the tail, n % 8 elements
    if (i < n) geglu_grad_one(gy[i], gate[i], up[i], g_gate[i], g_up[i]);
}
"""


# ----- launching: through these names, which tests/test_geglu_emulated.py replaces to run the same
# host code with NumPy arrays on the CPU emulator

def _launch(name, blocks, args):
    kernel(SOURCE, name)((blocks,), (THREADS,), args)


def _blocks(n, per_sm):
    return grid_stride_blocks(n, THREADS, per_sm=per_sm)



def vector_ok(*arrays):
    """The vector kernels' condition: every array starts on a 16-byte boundary (any n)."""
    return all(address(a) % 16 == 0 for a in arrays)


def _run(name, arrays, n):
    if vector_ok(*arrays):  # 8 halves a thread per iteration, two vectors in flight
        _launch(name + "_vec", _blocks(max(n // VEC, 1), BLOCKS_PER_SM), arrays + (np.int64(n),))
    else:
        _launch(name, _blocks(n, 8), arrays + (np.int64(n),))


def forward(gate, up):
    xp = get_array_module(gate)
    gate, up = xp.ascontiguousarray(gate), xp.ascontiguousarray(up)
    y = xp.empty_like(gate)
    if gate.size:
        _run("geglu_fwd", (gate, up, y), gate.size)
    return y


def backward(gy, gate, up):
    xp = get_array_module(gate)
    gy, gate, up = (xp.ascontiguousarray(a) for a in (gy, gate, up))
    g_gate, g_up = xp.empty_like(gate), xp.empty_like(up)
    if gate.size:
        _run("geglu_bwd", (gy, gate, up, g_gate, g_up), gate.size)
    return g_gate, g_up


class FusedGeGLU(GeGLU):
    """GeGLU (nn_ops/geglu.py) by the kernels above, one pass each way (F.geglu picks it)."""

    def forward(self, gate, up):
        self.gate, self.up = gate, up
        return forward(gate, up)

    def backward(self, gy):
        return backward(gy, self.gate, self.up)


# ----- NumPy reference ------------------------------------------------------------------------

_C, _A = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)


def _gelu_parts(gate):
    x = gate.astype(np.float32)
    t = np.tanh(_C * (x + _A * (x * x * x)))
    return x, t, (np.float32(0.5) * x * (1 + t)).astype(np.float16)


def reference_forward(gate, up):
    return _gelu_parts(gate)[2] * up


def reference_backward(gy, gate, up):
    x, t, a = _gelu_parts(gate)
    d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _C * (1 + 3 * _A * x * x)
    return ((gy * up).astype(np.float32) * d).astype(np.float16), gy * a
