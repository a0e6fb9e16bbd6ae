"""What every kernel family shares: a CUDA prelude, lazy compilation, launch sizes.

float16 values travel as their 16 bits (`half_t`, an unsigned short) and are converted with
the PTX `cvt` instruction, so the kernels need no header and compile the same under NVRTC
(CuPy's RawModule) and nvcc. All arithmetic is float32.
"""
import functools

PRELUDE = r"""
typedef unsigned short half_t;

__device__ __forceinline__ float h2f(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_t f2h(float f) {  // round to nearest even, as NumPy's astype
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
"""

# Plain C++ on top of the conversions (block sums, the online softmax normaliser): what a CPU
# emulation of the kernels (tests/cuda_emulator.py) can compile as it is.
HELPERS = r"""
// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32;
// sh holds 32 floats. The first barrier keeps a previous call's readers of sh safe.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Running (max m, sum s of exp(x - m)) over a stream of x: the one-pass softmax
// normaliser. Adding x > m rescales the sum by exp(m - x); m starts at -inf, s at 0.
__device__ __forceinline__ void online_add(float x, float& m, float& s) {
    if (x > m) { s = s * __expf(m - x) + 1.f; m = x; }
    else s += __expf(x - m);
}

// Merge two (m, s) pairs; a side whose m equals the new max keeps its sum unscaled,
// which also keeps two empty sides (-inf, 0) from making inf - inf = NaN.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    const float a = (m == mm) ? s : s * __expf(m - mm);
    const float b = (m2 == mm) ? s2 : s2 * __expf(m2 - mm);
    m = mm;
    s = a + b;
}

// Block-wide merge of every thread's (m, s); each thread gets the result.
__device__ __forceinline__ void block_max_sum(float& m, float& s, float* shm, float* shs) {
    for (int o = 16; o > 0; o >>= 1)
        online_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { shm[warp] = m; shs[warp] = s; }
    __syncthreads();
    const bool have = lane < (int)(blockDim.x >> 5);
    m = have ? shm[lane] : neg_inf();
    s = have ? shs[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1)
        online_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
}
"""
PRELUDE += HELPERS



# Four consecutive elements as one access: 8 bytes of float16 (p 8-byte aligned) or 16 bytes of float32
# (p 16-byte aligned), converted to or from float. For the families' vector kernels (embedding, rmsnorm,
# qk_norm_rope), each of which puts it once in its source. ALIGNED_ACCESS is empty on the GPU; the CPU
# emulator (tests/cuda_emulator.py) defines it to check the alignment of every vector access.
VECTOR_IO = r"""
#ifndef ALIGNED_ACCESS
#define ALIGNED_ACCESS(p, bytes)
#endif
__device__ __forceinline__ void load4(const half_t* p, float v[4]) {
    ALIGNED_ACCESS(p, 8);
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    v[0] = h2f((half_t)(u.x & 0xffffu));
    v[1] = h2f((half_t)(u.x >> 16));
    v[2] = h2f((half_t)(u.y & 0xffffu));
    v[3] = h2f((half_t)(u.y >> 16));
}
__device__ __forceinline__ void load4(const float* p, float v[4]) {
    ALIGNED_ACCESS(p, 16);
    const float4 u = *reinterpret_cast<const float4*>(p);
    v[0] = u.x;
    v[1] = u.y;
    v[2] = u.z;
    v[3] = u.w;
}
__device__ __forceinline__ void store4(half_t* p, const float v[4]) {
    ALIGNED_ACCESS(p, 8);
    uint2 u;
    u.x = (unsigned)f2h(v[0]) | ((unsigned)f2h(v[1]) << 16);
    u.y = (unsigned)f2h(v[2]) | ((unsigned)f2h(v[3]) << 16);
    *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void store4(float* p, const float v[4]) {
    ALIGNED_ACCESS(p, 16);
    float4 u;
    u.x = v[0];
    u.y = v[1];
    u.z = v[2];
    u.w = v[3];
    *reinterpret_cast<float4*>(p) = u;
}
"""


# Inline PTX both the mma.sync and the wgmma families use (inside their PTX_HELPERS sections, which
# the CPU emulator in tests replaces with C++ equivalents).
ASYNC_COPY_PTX = r"""
__device__ __forceinline__ unsigned smem_u32(const void* p) {  // the shared-state-space address of p
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 (or 4) bytes global -> shared without registers (zeros when !valid), in commit groups.
__device__ __forceinline__ void cp_async16_at(unsigned dst, const void* src, bool valid) {  // dst: smem_u32
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    cp_async16_at(smem_u32(dst), src, valid);
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
"""


# Max and sum over the 4 lanes (4 g .. 4 g + 3) that share a row of an mma.sync or wgmma accumulator.
QUAD_REDUCE = r"""
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
"""


@functools.lru_cache(maxsize=None)
def _module(source):
    import cupy
    return cupy.RawModule(code=PRELUDE + source, options=("--std=c++17",))


def kernel(source, name):
    """The compiled kernel `name` of a family's source (compiled once per process)."""
    return _module(source).get_function(name)


@functools.lru_cache(maxsize=None)
def _module_sm90a(source, device_id):
    """Compiled by NVRTC for sm_90a, the architecture whose features (wgmma) only Hopper has
    (CuPy's own compilation picks the portable sm_90, which lacks them), loaded on the current
    device (`device_id`)."""
    from cupy.cuda import function
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(PRELUDE + source, "sm90a.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, ("--gpu-architecture=sm_90a", "--std=c++17"))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC could not compile an sm_90a kernel:\n{nvrtc.getProgramLog(prog)}") from e
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    module = function.Module()
    module.load(cubin)
    return module


@functools.lru_cache(maxsize=None)
def _function_sm90a(source, name, shared_bytes, device_id):
    from cupy_backends.cuda.api import driver
    fn = _module_sm90a(source, device_id).get_function(name)
    driver.funcSetAttribute(fn.ptr, 8, shared_bytes)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    return fn


def kernel_sm90a(source, name, shared_bytes):
    """As `kernel`, for a source that uses sm_90a instructions (wgmma), with `shared_bytes` of
    dynamic shared memory allowed, on the current device (compute capability 9.0 only)."""
    import cupy
    return _function_sm90a(source, name, shared_bytes, cupy.cuda.Device().id)


@functools.lru_cache(maxsize=None)
def sm_count():
    import cupy
    return cupy.cuda.Device().attributes["MultiProcessorCount"]


def grid_stride_blocks(n, threads, per_sm=8):
    """Blocks for a grid-stride loop over n items: enough to fill the GPU, no more."""
    return max(1, min(-(-n // threads), sm_count() * per_sm))
