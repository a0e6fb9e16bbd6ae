"""GeGLU, y = gelu_tanh(gate) * up, fused, for float16 arrays of one shape.

It reproduces the unfused pair `F.gelu_tanh(gate) * up` of the reference path rounding for
rounding: the GELU is computed in float32 and rounded to float16 (a), then multiplied by up
in float16. With u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u):

    a = gelu(x) = 0.5 x (1 + t)
    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

Backward of y = a * up: d_up = gy a, d_a = gy up (both float16 products, as the unfused
multiply's backward), then d_gate = d_a gelu'(gate) in float32, rounded once.

Unlike the unfused pair, the forward saves only gate and up: a and t are recomputed.
Both kernels are grid-stride loops over the elements.
"""
import math

import numpy as np

from .cuda import grid_stride_blocks, kernel

THREADS = 256

SOURCE = r"""
#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f

__device__ __forceinline__ float tanh_arg(float x) { return GELU_C * (x + GELU_A * (x * x * x)); }

extern "C" __global__ void geglu_fwd(const half_t* __restrict__ gate, const half_t* __restrict__ up,
                                     half_t* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float x = h2f(gate[i]);
        const float a = h2f(f2h(0.5f * x * (1.f + tanhf(tanh_arg(x)))));
        y[i] = f2h(a * h2f(up[i]));
    }
}

extern "C" __global__ void geglu_bwd(const half_t* __restrict__ gy, const half_t* __restrict__ gate,
                                     const half_t* __restrict__ up, half_t* __restrict__ g_gate,
                                     half_t* __restrict__ g_up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float x = h2f(gate[i]), g = h2f(gy[i]);
        const float t = tanhf(tanh_arg(x));
        const float a = h2f(f2h(0.5f * x * (1.f + t)));
        const float ga = h2f(f2h(g * h2f(up[i])));
        const float d = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_C * (1.f + 3.f * GELU_A * x * x);
        g_up[i] = f2h(g * a);
        g_gate[i] = f2h(ga * d);
    }
}
"""


def forward(gate, up):
    import cupy
    gate, up = cupy.ascontiguousarray(gate), cupy.ascontiguousarray(up)
    y = cupy.empty_like(gate)
    n = gate.size
    if n:
        kernel(SOURCE, "geglu_fwd")((grid_stride_blocks(n, THREADS),), (THREADS,), (gate, up, y, np.int64(n)))
    return y


def backward(gy, gate, up):
    import cupy
    gy, gate, up = (cupy.ascontiguousarray(a) for a in (gy, gate, up))
    g_gate, g_up = cupy.empty_like(gate), cupy.empty_like(up)
    n = gate.size
    if n:
        kernel(SOURCE, "geglu_bwd")((grid_stride_blocks(n, THREADS),), (THREADS,),
                                    (gy, gate, up, g_gate, g_up, np.int64(n)))
    return g_gate, g_up


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
