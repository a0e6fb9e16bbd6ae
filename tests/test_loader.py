"""data.loader.BatchLoader: correct windows, seeded streams, resumable state, clear errors."""
import json

import numpy as np
import pytest

from data.errors import DataError
from data.loader import BatchLoader, load_meta
from data.meta import FORMAT_VERSION, write_json_atomic


def make_dataset(root, train, validation, vocab_size=50257):
    """A prepared directory written directly (no tokenizer, no `datasets`)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, tokens in (("train", train), ("validation", validation)):
        np.asarray(tokens, dtype=np.uint16).tofile(root / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": len(tokens), "stories": 1}
    write_json_atomic(root / "meta.json", {
        "format_version": FORMAT_VERSION, "tokenizer": "gpt2", "vocab_size": vocab_size,
        "eot_id": vocab_size - 1, "dtype": "uint16", "splits": splits, "source": "test",
        "text_column": "text", "val_fraction": None, "created": "2026-11-25T00:00:00+00:00",
        "seconds": 0.0})
    return root


@pytest.fixture
def data_dir(tmp_path):
    # Token i of train is i: a window's first token is its offset.
    return make_dataset(tmp_path / "data", np.arange(5000), 60000 - np.arange(700))


def cuda_available():
    try:
        from tinygrad3.backend import cuda_available as available
    except Exception:  # tinygrad3 unimportable: no GPU path to test either
        return False
    return available()


def test_windows_are_shifted_slices(data_dir):
    loader = BatchLoader(data_dir, batch_size=16, block_size=32)
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    for _ in range(5):
        x, y = loader.next_batch("train")
        assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == np.int64
        assert isinstance(x, np.ndarray) and type(x) is np.ndarray
        for row_x, row_y in zip(x, y):
            start = int(row_x[0])
            np.testing.assert_array_equal(row_x, train[start:start + 32])
            np.testing.assert_array_equal(row_y, train[start + 1:start + 33])
    val = np.fromfile(data_dir / "validation.bin", dtype=np.uint16)
    x, y = loader.next_batch("validation")
    for row_x, row_y in zip(x, y):
        start = int(np.flatnonzero(val == row_x[0])[0])
        np.testing.assert_array_equal(row_x, val[start:start + 32])
        np.testing.assert_array_equal(row_y, val[start + 1:start + 33])


def test_offsets_cover_the_whole_split(tmp_path):
    data = make_dataset(tmp_path / "d", np.arange(40), np.arange(40))
    loader = BatchLoader(data, batch_size=64, block_size=8)
    starts = np.concatenate([loader.next_batch("train")[0][:, 0] for _ in range(20)])
    assert set(starts.tolist()) == set(range(40 - 8))  # the last window ends on the last token
    x, y = BatchLoader(data, batch_size=4, block_size=39).next_batch()
    np.testing.assert_array_equal(x[0], np.arange(39))
    np.testing.assert_array_equal(y[0], np.arange(1, 40))


def test_same_seed_same_batches(data_dir):
    a, b, c = (BatchLoader(data_dir, 8, 16, seed=s) for s in (1, 1, 2))
    for _ in range(3):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a.next_batch()[0], c.next_batch()[0])


def test_splits_have_independent_streams(data_dir):
    a, b = BatchLoader(data_dir, 8, 16, seed=3), BatchLoader(data_dir, 8, 16, seed=3)
    a.next_batch("validation")
    a.next_batch("validation")
    np.testing.assert_array_equal(a.next_batch("train")[0], b.next_batch("train")[0])


def test_state_dict_resumes_the_stream(data_dir):
    loader = BatchLoader(data_dir, 8, 16, seed=4)
    for _ in range(3):
        loader.next_batch("train")
        loader.next_batch("validation")
    state = json.loads(json.dumps(loader.state_dict()))  # checkpoints store it as JSON
    expected = [loader.next_batch(split)[0] for split in ("train", "validation", "train")]
    resumed = BatchLoader(data_dir, 8, 16, seed=99)
    resumed.load_state_dict(state)
    for split, x in zip(("train", "validation", "train"), expected):
        np.testing.assert_array_equal(resumed.next_batch(split)[0], x)


def test_int32_ids_and_one_split(data_dir):
    loader = BatchLoader(data_dir, 2, 4, splits=("train",), dtype="int32")
    assert loader.next_batch()[0].dtype == np.int32
    assert loader.tokens("train") == 5000
    with pytest.raises(DataError, match="split 'validation' is not open"):
        loader.next_batch("validation")


def test_clear_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match=r"has 700 tokens, fewer than block_size \+ 1 = 701"):
        BatchLoader(data_dir, 2, 700)
    BatchLoader(data_dir, 2, 699)
    with pytest.raises(DataError, match="only 50000 embeddings.*vocab_size >= 50257"):
        BatchLoader(data_dir, 2, 8, model_vocab_size=50000)
    BatchLoader(data_dir, 2, 8, model_vocab_size=50304)  # a padded vocabulary is fine
    with pytest.raises(DataError, match="meta.json is missing.*data.prepare"):
        BatchLoader(tmp_path / "nothing", 2, 8)
    with pytest.raises(DataError, match="unknown device"):
        BatchLoader(data_dir, 2, 8, device="tpu")
    with pytest.raises(DataError, match="unknown split"):
        BatchLoader(data_dir, 2, 8, splits=("test",))
    with pytest.raises(DataError, match="must be positive"):
        BatchLoader(data_dir, 0, 8)
    assert load_meta(data_dir)["splits"]["train"]["tokens"] == 5000


def test_batches_of_a_prepared_synthetic_dataset(tmp_path):
    pytest.importorskip("datasets")
    from data.synthetic import prepare_synthetic
    from data.tokenizer import gpt2

    prepare_synthetic(tmp_path / "syn", n_stories=300, seed=0)
    text = (tmp_path / "syn" / "synthetic-300-seed0.txt").read_text()
    x, y = BatchLoader(tmp_path / "syn", 4, 64, seed=0).next_batch()
    for row in x:
        window = gpt2().decode(row.tolist())
        assert "<|endoftext|>" in window or window in text


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_cuda_batches_equal_cpu_batches(data_dir):
    import cupy

    cpu = BatchLoader(data_dir, 8, 16, seed=5)
    gpu = BatchLoader(data_dir, 8, 16, device="cuda", seed=5)
    for split in ("train", "train", "validation", "train"):
        (xc, yc), (xg, yg) = cpu.next_batch(split), gpu.next_batch(split)
        assert isinstance(xg, cupy.ndarray) and xg.dtype == np.int64 and xg.flags.c_contiguous
        np.testing.assert_array_equal(cupy.asnumpy(xg), xc)
        np.testing.assert_array_equal(cupy.asnumpy(yg), yc)
    state = json.loads(json.dumps(gpu.state_dict()))
    assert state == json.loads(json.dumps(cpu.state_dict()))  # the prefetched batch is not counted
    expected = [cpu.next_batch("train")[0] for _ in range(3)]
    resumed = BatchLoader(data_dir, 8, 16, device="cuda", seed=0)
    resumed.load_state_dict(state)
    for x in expected:
        np.testing.assert_array_equal(cupy.asnumpy(resumed.next_batch("train")[0]), x)
    # A batch stays valid while later ones are copied (fresh device arrays each time).
    first = gpu.next_batch("train")[0]
    snapshot = cupy.asnumpy(first)
    for _ in range(4):
        gpu.next_batch("train")
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(first), snapshot)
