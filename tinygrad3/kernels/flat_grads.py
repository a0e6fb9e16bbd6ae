"""Add many gradient arrays into one flat float32 buffer with one launch.

The optimizer keeps the gradients of all parameters in one flat float32 buffer (nn/optim.py):
parameter i owns flat[offset_i : offset_i + size_i]. Filling it one parameter at a time costs
about 200 launches per update; this kernel does the whole list in one:

    flat[offset_i + j] += float32(grad_i[j])      for every piece i and element j

The pieces (float16 or float32 arrays, any addresses) are described by a table in GPU memory:
their addresses, offsets, sizes, a float16 flag, and the number of the first CHUNK-element
chunk of each piece in one running count over all pieces. Block b handles chunk b: it finds
its piece by a binary search over those first-chunk numbers, then adds up to CHUNK elements.
Adding (rather than copying) is what lets micro-batches accumulate in float32.
"""
import numpy as np

from .cuda import kernel

THREADS = 256
CHUNK = 4096

SOURCE = r"""
#define CHUNK 4096

extern "C" __global__ void add_into_flat(float* __restrict__ flat, const long long* __restrict__ table,
                                         int pieces) {
    const long long* src = table;
    const long long* offset = table + pieces;
    const long long* size = table + 2 * pieces;
    const long long* is_half = table + 3 * pieces;
    const long long* first_chunk = table + 4 * pieces;
    const long long chunk = blockIdx.x;
    int lo = 0, hi = pieces - 1;  // the last piece whose first chunk is <= this chunk
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (first_chunk[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    const long long start = (chunk - first_chunk[lo]) * CHUNK;
    const long long end = min(start + CHUNK, size[lo]);
    float* dst = flat + offset[lo];
    if (is_half[lo]) {
        const half_t* g = (const half_t*)src[lo];
        for (long long j = start + threadIdx.x; j < end; j += blockDim.x) dst[j] += h2f(g[j]);
    } else {
        const float* g = (const float*)src[lo];
        for (long long j = start + threadIdx.x; j < end; j += blockDim.x) dst[j] += g[j];
    }
}
"""


def table(pieces):
    """The int64 table for [(array, offset)]: addresses, offsets, sizes, float16 flags, first
    chunks; and the total number of chunks (the grid)."""
    sizes = np.array([a.size for a, _ in pieces], np.int64)
    chunks = -(-sizes // CHUNK)
    first = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64)
    rows = (np.array([a.data.ptr for a, _ in pieces], np.int64), np.array([o for _, o in pieces], np.int64),
            sizes, np.array([a.dtype == np.float16 for a, _ in pieces], np.int64), first)
    return np.concatenate(rows), int(chunks.sum())


class FlatAdder:
    """Adds lists of (array, offset) pieces into a flat float32 CuPy buffer. The table of the
    last list is kept on the GPU, so a list of the same arrays (a CUDA graph's outputs) costs
    no upload; a new list is uploaded through pinned memory, without stalling the host."""

    def __init__(self):
        self._key, self._table, self._staging, self._grid = None, None, None, 0

    def add(self, flat, pieces):
        import cupy
        import cupyx
        pieces = [(cupy.ascontiguousarray(a), o) for a, o in pieces if a.size]
        if not pieces:
            return
        key = tuple((a.data.ptr, a.size, a.dtype.char, o) for a, o in pieces)
        if key != self._key:
            rows, self._grid = table(pieces)
            self._staging = cupyx.empty_pinned(rows.shape, np.int64)
            self._staging[...] = rows
            self._table = cupy.empty(rows.shape, np.int64)
            self._table.set(self._staging, stream=cupy.cuda.get_current_stream())
            self._key = key
        kernel(SOURCE, "add_into_flat")((self._grid,), (THREADS,), (flat, self._table, np.int32(len(pieces))))


def reference_add(flat, pieces):
    """NumPy: the same sums, one piece at a time."""
    for a, offset in pieces:
        flat[offset:offset + a.size] += a.reshape(-1).astype(np.float32)
    return flat
