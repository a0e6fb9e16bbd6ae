"""The wgmma helpers (tinygrad3/kernels/wgmma.py): each form of the instruction, with the swizzled
tiles and descriptors the Hopper kernels use, against NumPy products of the same float16 inputs.

The same probe kernels run on the GPU (`gpu` marker, compute capability 9.0: what the hardware does
with the descriptors) and on the CPU emulator (tests/cuda_emulator.py: what the emulator says it
does). Both passing ties the emulator's reading of descriptors, swizzle and fragments to the
hardware's, which is what makes the emulated tests of the Hopper flash kernels mean something.
"""
import functools
import zlib

import numpy as np
import pytest

from tinygrad3 import backend
from tinygrad3.kernels import wgmma

import cuda_emulator

PROBES = r"""
// Fragment x of a 64 x N product into row-major d (64 x N).
template <int N>
__device__ __forceinline__ void store_fragment(float* d, const float* x) {
    const int t = threadIdx.x, r = 16 * (t >> 5) + ((t & 31) >> 2), c = 2 * (t & 3);
    for (int j = 0; j < N / 8; ++j) {
        d[r * N + 8 * j + c] = x[4 * j];
        d[r * N + 8 * j + c + 1] = x[4 * j + 1];
        d[(r + 8) * N + 8 * j + c] = x[4 * j + 2];
        d[(r + 8) * N + 8 * j + c + 1] = x[4 * j + 3];
    }
}

// d = a b^T: a (64, HEAD_DIM), b (N, HEAD_DIM), both K-major in shared memory. The accumulators
// start as NaN: accumulate = 0 on the first k-step must ignore them.
template <int N, bool EARLY = false>
__device__ __forceinline__ void probe_ss(const half_t* a, const half_t* b, float* d) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sa = (half_t*)align1024(smem);
    half_t* sb = sa + 64 * HEAD_DIM;
    load_sw<64, 128>(sa, a, 0, 64, HEAD_DIM, threadIdx.x);
    load_sw<N, 128>(sb, b, 0, N, HEAD_DIM, threadIdx.x);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    float x[N / 2];
    for (int i = 0; i < N / 2; ++i) x[i] = __int_as_float(0x7fc00000);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
        wgmma_ss<N>(x, kmajor(sa, 64, 0, 16 * kk), kmajor(sb, N, 0, 16 * kk), kk > 0);
    wgmma_commit();
    if (EARLY) store_fragment<N>(d, x);   // a read before the wait (a kernel bug)
    wgmma_wait<0>();
    reg_fence<N / 2>(x);
    if (!EARLY) store_fragment<N>(d, x);
}

// d = 1 + a b: a (64, ROWS) from registers, b (ROWS, HEAD_DIM) MN-major in a ROWS-row shared tile.
template <int ROWS>
__device__ __forceinline__ void probe_rs(const half_t* a, const half_t* b, float* d) {
    extern __shared__ __align__(16) unsigned char smem[];
    half_t* sb = (half_t*)align1024(smem);
    load_sw<ROWS, 128>(sb, b, 0, ROWS, HEAD_DIM, threadIdx.x);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    const int t = threadIdx.x, r = 16 * (t >> 5) + ((t & 31) >> 2), c = 2 * (t & 3);
    unsigned ar[ROWS / 16][4];
    for (int kk = 0; kk < ROWS / 16; ++kk) {
        const half_t* p = a + r * ROWS + 16 * kk + c;
        ar[kk][0] = (unsigned)p[0] | ((unsigned)p[1] << 16);
        ar[kk][1] = (unsigned)p[8 * ROWS] | ((unsigned)p[8 * ROWS + 1] << 16);
        ar[kk][2] = (unsigned)p[8] | ((unsigned)p[9] << 16);
        ar[kk][3] = (unsigned)p[8 * ROWS + 8] | ((unsigned)p[8 * ROWS + 9] << 16);
    }
    float x[HEAD_DIM / 2];
    for (int i = 0; i < HEAD_DIM / 2; ++i) x[i] = 1.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < ROWS / 16; ++kk) wgmma_rs<HEAD_DIM>(x, ar[kk], mnmajor(sb, ROWS, 16 * kk), 1);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence<HEAD_DIM / 2>(x);
    store_fragment<HEAD_DIM>(d, x);
}

extern "C" __global__ void probe_ss64(const half_t* a, const half_t* b, float* d) { probe_ss<64>(a, b, d); }
extern "C" __global__ void probe_ss32(const half_t* a, const half_t* b, float* d) { probe_ss<32>(a, b, d); }
extern "C" __global__ void probe_rs64(const half_t* a, const half_t* b, float* d) { probe_rs<64>(a, b, d); }
extern "C" __global__ void probe_rs32(const half_t* a, const half_t* b, float* d) { probe_rs<32>(a, b, d); }
extern "C" __global__ void probe_ss64_early(const half_t* a, const half_t* b, float* d) { probe_ss<64, true>(a, b, d); }
"""

# name: (shape of a, shape of b, shape of d, the product in float64) for head size d
def _cases(d):
    return {
        "probe_ss64": ((64, d), (64, d), (64, 64), lambda a, b: a @ b.T),
        "probe_ss32": ((64, d), (32, d), (64, 32), lambda a, b: a @ b.T),
        "probe_rs64": ((64, 64), (64, d), (64, d), lambda a, b: 1 + a @ b),
        "probe_rs32": ((64, 32), (32, d), (64, d), lambda a, b: 1 + a @ b),
    }


def _source(d):
    return f"#define HEAD_DIM {d}\n" + wgmma.source() + PROBES


def _shared(a_shape, b_shape):
    return 1024 + 2 * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])


def _inputs(name, d):
    rng = np.random.default_rng(zlib.crc32(f"{name} {d}".encode()))
    a_shape, b_shape, d_shape, product = _cases(d)[name]
    a = rng.standard_normal(a_shape).astype(np.float16)
    b = rng.standard_normal(b_shape).astype(np.float16)
    return a, b, np.full(d_shape, np.nan, np.float32), product(a.astype(np.float64), b.astype(np.float64))


def _check(out, expected):
    assert np.isfinite(out).all(), "unwritten or NaN entries (accumulate flag, fragment layout)"
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())


NAMES = ["probe_ss64", "probe_ss32", "probe_rs64", "probe_rs32"]


@functools.lru_cache(maxsize=None)
def _emulator(d):
    return cuda_emulator.Emulator(_source(d))


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("name", NAMES)
def test_emulated_wgmma_matches_numpy(name, d):
    if not cuda_emulator.available():
        pytest.skip("the CUDA emulator needs g++ on x86-64")
    a, b, out, expected = _inputs(name, d)
    _emulator(d).launch(name, (1,), 128, (a, b, out), _shared(a.shape, b.shape))
    _check(out, expected)


def test_emulated_accumulators_are_stale_before_the_wait():
    """The emulator computes a wgmma at its wait_group, so a kernel reading the accumulators
    earlier (undefined on the hardware) reads what they held before: here NaN."""
    if not cuda_emulator.available():
        pytest.skip("the CUDA emulator needs g++ on x86-64")
    a, b, out, _ = _inputs("probe_ss64", 64)
    _emulator(64).launch("probe_ss64_early", (1,), 128, (a, b, out), _shared(a.shape, b.shape))
    assert np.isnan(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_wgmma_matches_numpy(gpu_xp, name, d):
    from tinygrad3.kernels.cuda import kernel_sm90a
    if int(gpu_xp.cuda.Device().compute_capability) != 90:
        pytest.skip("wgmma needs compute capability 9.0")
    a, b, out, expected = _inputs(name, d)
    shared = _shared(a.shape, b.shape)
    ga, gb, gd = gpu_xp.asarray(a), gpu_xp.asarray(b), gpu_xp.asarray(out)
    kernel_sm90a(_source(d), name, shared)((1,), (128,), (ga, gb, gd), shared_mem=shared)
    _check(backend.to_numpy(gd), expected)
