"""Random training windows from a prepared dataset, as (x, y) token-id arrays on a device.

    meta = load_meta("data/tinystories")                  # checked sidecar (see data.meta)
    loader = BatchLoader("data/tinystories", batch_size=32, block_size=256, device="cuda",
                         seed=0, model_vocab_size=50304)
    x, y = loader.next_batch("train")        # (32, 256) int64; y[:, t] is the token after x[:, t]
    x, y = loader.next_batch("validation")   # each split has its own random stream
    state = loader.state_dict()              # JSON-serialisable: store it in the checkpoint
    loader.load_state_dict(state)            # the same batches follow as without the restart

Each batch takes `batch_size` windows of `block_size + 1` tokens at uniformly random
offsets of the split's memmap (uint16 or uint32, as meta.json's dtype says; only those pages
are read, nothing is loaded whole), x = window[:, :-1], y = window[:, 1:]. The stream is a
function of `seed` alone: the same seed gives the same batches on 'cpu' and 'cuda'.

On 'cuda', the windows are gathered into pinned host buffers and copied on a separate
non-blocking stream while the current training step runs: every `next_batch` returns the
batch prepared during the previous call and starts the next one. The returned arrays are
ordered on the current stream (it waits for the copy), so they can be used at once.
"""
from collections import namedtuple

import numpy as np

from .errors import DataError
from .meta import SPLITS, bin_path, load_meta, tokenizer_identity

__all__ = ["BatchLoader", "load_meta"]


class BatchLoader:
    """Random (x, y) batches from `data_dir`'s splits; see the module docstring.

    data_dir: a directory accepted by `load_meta` (made by `python -m data.prepare`).
    splits: which splits to open (default both).
    model_vocab_size: the model's embedding rows; a DataError if the data's ids exceed it.
    dtype: of the returned ids, 'int64' (default) or 'int32'.
    """

    def __init__(self, data_dir, batch_size, block_size, device="cpu", seed=0, splits=SPLITS,
                 model_vocab_size=None, dtype="int64"):
        self.meta = load_meta(data_dir)
        self.vocab_size, self.eot_id = self.meta["vocab_size"], self.meta["eot_id"]
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.dtype = np.dtype(dtype)
        self.device = _check_device(device)
        self.data = {}
        for split in splits:
            if split not in SPLITS:
                raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
            tokens = np.memmap(bin_path(data_dir, split), dtype=self.meta["dtype"], mode="r")
            if len(tokens) < block_size + 1:
                raise DataError(f"the {split} split of {data_dir} has {len(tokens)} tokens, fewer "
                                f"than block_size + 1 = {block_size + 1}; use a smaller block_size "
                                "or prepare more data")
            self.data[split] = tokens
        if model_vocab_size is not None and self.vocab_size > model_vocab_size:
            # A tokenizer may name more ids than a checkpoint has rows (Gemma 3's holds an image token
            # past the text model's 262,144): what matters is the largest id the data really hold.
            largest = max(_largest_id(tokens) for tokens in self.data.values())
            if largest >= model_vocab_size:
                raise DataError(f"{data_dir} holds {tokenizer_identity(self.meta)['name']} ids up to {largest} "
                                f"but the model has only {model_vocab_size} embeddings; use a model with "
                                f"vocab_size > {largest}")
        self._rngs = {split: np.random.default_rng([seed, SPLITS.index(split)]) for split in self.data}
        self._steps = np.arange(block_size + 1)
        self._prefetch = _CudaPrefetcher((batch_size, block_size), self.dtype) if self.device == "cuda" else None

    def tokens(self, split):
        """Number of tokens in a split."""
        return len(self._split(split))

    def next_batch(self, split="train"):
        """(x, y), each (batch_size, block_size): numpy arrays on 'cpu', cupy arrays on 'cuda'."""
        self._split(split)
        if self._prefetch is None:
            window = self._window(split)
            return window[:, :-1].astype(self.dtype), window[:, 1:].astype(self.dtype)
        if split not in self._prefetch.pending:
            self._submit(split)
        batch = self._prefetch.take(split)
        self._submit(split)
        return batch

    def state_dict(self):
        """The position of every split's random stream (batches already returned), as JSON data."""
        states = {split: rng.bit_generator.state for split, rng in self._rngs.items()}
        if self._prefetch is not None:  # a prefetched batch has not been handed out yet
            states.update({split: p.rng_state for split, p in self._prefetch.pending.items()})
        return {"seed": self.seed, "rng": states}

    def load_state_dict(self, state):
        """Continue the random streams from `state_dict()`'s position."""
        for split, rng_state in state["rng"].items():
            if split in self._rngs:
                self._rngs[split].bit_generator.state = rng_state
        if self._prefetch is not None:
            self._prefetch.pending.clear()

    def _split(self, split):
        if split not in self.data:
            raise DataError(f"split {split!r} is not open in this loader (open: {', '.join(self.data)})")
        return self.data[split]

    def _window(self, split):
        """(batch_size, block_size + 1) windows (the .bin's dtype) at random offsets."""
        tokens = self.data[split]
        offsets = self._rngs[split].integers(0, len(tokens) - self.block_size, size=self.batch_size)
        return np.asarray(tokens[offsets[:, None] + self._steps])

    def _submit(self, split):
        rng_state = self._rngs[split].bit_generator.state

        def fill(x, y):
            window = self._window(split)
            x[...] = window[:, :-1]
            y[...] = window[:, 1:]

        self._prefetch.submit(split, rng_state, fill)


def _check_device(device):
    device = str(device).lower()
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        from tinygrad3.backend import check_device  # raises when no GPU is usable

        return check_device(device)
    raise DataError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


_Pending = namedtuple("_Pending", "rng_state x y copied")


def _largest_id(tokens, chunk=1 << 26):
    """The largest id of a memmapped split, read in chunks."""
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


class _CudaPrefetcher:
    """One batch in flight per split: pinned host buffers, copied on a non-blocking stream.

    Each split alternates between two pinned (x, y) buffer pairs, so one can be filled while
    the other's copy may still run; a pair is refilled only after its last copy finished.
    """

    def __init__(self, shape, dtype):
        import cupy

        self.cupy = cupy
        self.shape, self.dtype = shape, dtype
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pending = {}
        self._buffers = {}  # split -> [[x_host, y_host, last copy event], [...]]
        self._turn = {}

    def _pinned(self):
        count = int(np.prod(self.shape))
        memory = self.cupy.cuda.alloc_pinned_memory(count * self.dtype.itemsize)
        return np.frombuffer(memory, self.dtype, count).reshape(self.shape)

    def submit(self, split, rng_state, fill):
        """Fill a free pinned pair with `fill(x_host, y_host)` and start its copy to the GPU."""
        cupy = self.cupy
        if split not in self._buffers:
            self._buffers[split] = [[self._pinned(), self._pinned(), None] for _ in range(2)]
            self._turn[split] = 0
        buffer = self._buffers[split][self._turn[split]]
        self._turn[split] ^= 1
        x_host, y_host, last_copy = buffer
        if last_copy is not None:
            last_copy.synchronize()
        fill(x_host, y_host)
        # Work queued so far may still read memory that the allocations below reuse.
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        with self.stream:
            x = cupy.empty(self.shape, self.dtype)
            y = cupy.empty(self.shape, self.dtype)
            x.set(x_host, stream=self.stream)
            y.set(y_host, stream=self.stream)
            buffer[2] = self.stream.record()
        self.pending[split] = _Pending(rng_state, x, y, buffer[2])

    def take(self, split):
        """The split's pending (x, y), ordered after its copy on the current stream."""
        batch = self.pending.pop(split)
        self.cupy.cuda.get_current_stream().wait_event(batch.copied)
        return batch.x, batch.y
