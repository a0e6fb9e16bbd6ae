"""GeGLU, y = gelu_tanh(gate) * up for x = [gate | up], fused, for float16 arrays.

x has rows of 2 C halves, gate (C) then up (C), as one GEMM of the stacked gate and up weights
writes them; y and its gradient gy have rows of C; x's gradient has x's shape, [d_gate | d_up].
Element i of y (row r = i / C, column c) reads gate at x[i + r C] and up C halves further.

It reproduces the unfused pair `F.gelu_tanh(gate) * up` of the reference path rounding for
rounding: the GELU is computed in float32 and rounded to float16 (a), then multiplied by up
in float16. With u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u):

    a = gelu(x) = 0.5 x (1 + t)
    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

Backward of y = a * up: d_up = gy a, d_a = gy up (both float16 products, as the unfused
multiply's backward), then d_gate = d_a gelu'(gate) in float32, rounded once.

Unlike the unfused pair, the forward saves only x: a and t are recomputed.

Both kernels are memory-bound (the forward moves 6 bytes per element of y, the backward 10), so
what they need is bytes in flight: each access moves 16 bytes.

Vector kernels (geglu_fwd_vec, geglu_bwd_vec), when every array starts on a 16-byte boundary
(CuPy's allocations do; a view at an odd offset does not) and C is a multiple of 8 (so no vector
straddles two rows): a grid-stride loop over vectors of 8 halves of y, one 16-byte load of gate
and of up (and of gy) per vector, one 16-byte store of y (of d_gate and of d_up). Each iteration
takes two vectors, v and v + stride, and issues all of their loads before any arithmetic, so a
thread has 64 bytes (backward: 96) of loads in flight. The grid is BLOCKS_PER_SM blocks per SM
(the kernels' __launch_bounds__), one wave.

Fallback (geglu_fwd, geglu_bwd): the same grid-stride loop over single elements, for any
alignment and C. Every path computes each element with the same device functions (geglu_one,
geglu_grad_one), so they agree bit for bit.
"""
import math

import numpy as np

from ..backend import address, get_array_module
from ..nn_ops.geglu import GeGLU, halves
from .cuda import grid_stride_blocks, kernel

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

// ----- fallback: one element of y per thread and iteration, any alignment; g: where its gate is in x
extern "C" __global__ void geglu_fwd(const half_t* __restrict__ x, half_t* __restrict__ y, long long n,
                                     long long cols) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const long long g = i + i / cols * cols;
        y[i] = geglu_one(x[g], x[g + cols]);
    }
}

extern "C" __global__ void geglu_bwd(const half_t* __restrict__ gy, const half_t* __restrict__ x,
                                     half_t* __restrict__ gx, long long n, long long cols) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const long long g = i + i / cols * cols;
        geglu_grad_one(gy[i], x[g], x[g + cols], gx[g], gx[g + cols]);
    }
}

// ----- vector kernels: every array 16-byte aligned, cols a multiple of 8, fewer than 2^31 vectors of y;
// vectors v, v + stride per iteration, loads first. Vector v of y starts at 8 v, its gate at gate_at(v).
__device__ __forceinline__ long long gate_at(unsigned v, unsigned per_row) {
    return 8 * (long long)(v + v / per_row * per_row);
}

extern "C" __global__ void __launch_bounds__(256, 4) geglu_fwd_vec(const half_t* __restrict__ x,
                                                                   half_t* __restrict__ y, long long n,
                                                                   long long cols) {
    const unsigned vecs = (unsigned)(n >> 3), per_row = (unsigned)(cols >> 3), stride = blockDim.x * gridDim.x;
    unsigned v = blockIdx.x * blockDim.x + threadIdx.x;
    for (; v + stride < vecs; v += 2 * stride) {
        const long long a0 = gate_at(v, per_row), a1 = gate_at(v + stride, per_row);
        const uint4 g0 = load16(x + a0), u0 = load16(x + a0 + cols);
        const uint4 g1 = load16(x + a1), u1 = load16(x + a1 + cols);
        store16(y + 8 * (long long)v, geglu8(g0, u0));
        store16(y + 8 * (long long)(v + stride), geglu8(g1, u1));
    }
    if (v < vecs) {
        const long long a = gate_at(v, per_row);
        store16(y + 8 * (long long)v, geglu8(load16(x + a), load16(x + a + cols)));
    }
}

extern "C" __global__ void __launch_bounds__(256, 4) geglu_bwd_vec(const half_t* __restrict__ gy,
                                                                   const half_t* __restrict__ x,
                                                                   half_t* __restrict__ gx, long long n,
                                                                   long long cols) {
    const unsigned vecs = (unsigned)(n >> 3), per_row = (unsigned)(cols >> 3), stride = blockDim.x * gridDim.x;
    unsigned v = blockIdx.x * blockDim.x + threadIdx.x;
    uint4 dg, du;
    for (; v + stride < vecs; v += 2 * stride) {
        const long long a0 = gate_at(v, per_row), a1 = gate_at(v + stride, per_row);
        const uint4 y0 = load16(gy + 8 * (long long)v), g0 = load16(x + a0), u0 = load16(x + a0 + cols);
        const uint4 y1 = load16(gy + 8 * (long long)(v + stride)), g1 = load16(x + a1), u1 = load16(x + a1 + cols);
        geglu_grad8(y0, g0, u0, dg, du);
        store16(gx + a0, dg);
        store16(gx + a0 + cols, du);
        geglu_grad8(y1, g1, u1, dg, du);
        store16(gx + a1, dg);
        store16(gx + a1 + cols, du);
    }
    if (v < vecs) {
        const long long a = gate_at(v, per_row);
        geglu_grad8(load16(gy + 8 * (long long)v), load16(x + a), load16(x + a + cols), dg, du);
        store16(gx + a, dg);
        store16(gx + a + cols, du);
    }
}
"""


# ----- launching: through these names, which tests/test_geglu_emulated.py replaces to run the same
# host code with NumPy arrays on the CPU emulator

def _launch(name, blocks, args):
    kernel(SOURCE, name)((blocks,), (THREADS,), args)


def _blocks(n, per_sm):
    return grid_stride_blocks(n, THREADS, per_sm=per_sm)



def vector_ok(cols, n, *arrays):
    """The vector kernels' condition: every array starts on a 16-byte boundary, rows of a whole
    number of vectors, vector indices in 32 bits."""
    return cols % VEC == 0 and n // VEC < 2 ** 31 and all(address(a) % 16 == 0 for a in arrays)


def _run(name, arrays, n, cols):
    sizes = (np.int64(n), np.int64(cols))
    if vector_ok(cols, n, *arrays):  # 8 halves a thread per iteration, two vectors in flight
        _launch(name + "_vec", _blocks(max(n // VEC, 1), BLOCKS_PER_SM), arrays + sizes)
    else:
        _launch(name, _blocks(n, 8), arrays + sizes)


def _check(x):
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: x's last axis ({x.shape[-1]}) must hold gate and up, two equal halves")


def forward(x):
    """y (x's shape with half its last axis) for x = [gate | up]."""
    _check(x)
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    y = xp.empty(x.shape[:-1] + (x.shape[-1] // 2,), x.dtype)
    if y.size:
        _run("geglu_fwd", (x, y), y.size, y.shape[-1])
    return y


def backward(gy, x):
    """x's gradient [d_gate | d_up] (x's shape) from y's gradient gy."""
    _check(x)
    xp = get_array_module(x)
    gy, x = xp.ascontiguousarray(gy), xp.ascontiguousarray(x)
    gx = xp.empty_like(x)
    if gy.size:
        _run("geglu_bwd", (gy, x, gx), gy.size, gy.shape[-1])
    return gx


class FusedGeGLU(GeGLU):
    """GeGLU (nn_ops/geglu.py) by the kernels above, one pass each way (F.geglu picks it)."""

    def forward(self, x):
        self.x = x
        return forward(x)

    def backward(self, gy):
        return backward(gy, self.x)


# ----- NumPy reference ------------------------------------------------------------------------

_C, _A = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)


def _gelu_parts(gate):
    x = gate.astype(np.float32)
    t = np.tanh(_C * (x + _A * (x * x * x)))
    return x, t, (np.float32(0.5) * x * (1 + t)).astype(np.float16)


def reference_forward(x):
    gate, up = halves(x)
    return _gelu_parts(gate)[2] * up


def reference_backward(gy, x):
    gate, up = halves(x)
    x32, t, a = _gelu_parts(gate)
    d = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * _C * (1 + 3 * _A * x32 * x32)
    return np.concatenate([((gy * up).astype(np.float32) * d).astype(np.float16), gy * a], axis=-1)
