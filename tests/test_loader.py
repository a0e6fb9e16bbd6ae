"""data.loader.BatchLoader: correct windows, seeded streams, resumable state, clear errors;
uint16 and uint32 token files."""
import json

import numpy as np
import pytest

from data.errors import DataError
from data.loader import BatchLoader, load_meta
from data.meta import FORMAT_VERSION, write_json_atomic
from data.tokenizer import dtype_for


def make_dataset(root, train, validation, vocab_size=50257):
    """A prepared directory written directly (no tokenizer, no `datasets`): format 1 (GPT-2,
    uint16) for GPT-2's vocab_size, format 2 with a made-up tokenizer otherwise."""
    root.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(vocab_size)
    splits = {}
    for split, tokens in (("train", train), ("validation", validation)):
        np.asarray(tokens, dtype=dtype).tofile(root / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": len(tokens), "stories": 1}
    tokenizer = "gpt2" if vocab_size == 50257 else {"name": "made-up", "sha256": "ab" * 32, "vocab_size": vocab_size,
                                                    "bos_id": None, "eos_id": vocab_size - 1}
    write_json_atomic(root / "meta.json", {
        "format_version": 1 if tokenizer == "gpt2" else FORMAT_VERSION, "tokenizer": tokenizer,
        "vocab_size": vocab_size, "eot_id": vocab_size - 1, "dtype": dtype, "splits": splits, "source": "test",
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
    with pytest.raises(DataError, match="ids up to 60000 but the model has only 50000 embeddings.*vocab_size > 60000"):
        BatchLoader(data_dir, 2, 8, model_vocab_size=50000)  # the largest id the splits hold, not the tokenizer's
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


def test_uint32_ids_above_65535_come_back_whole(tmp_path):
    train = 70000 + np.arange(3000)  # token i is 70000 + i: a window's first token gives its offset
    data = make_dataset(tmp_path / "wide", train, np.arange(100000, 100500), vocab_size=200000)
    assert load_meta(data)["dtype"] == "uint32"
    loader = BatchLoader(data, batch_size=8, block_size=16, seed=1, model_vocab_size=200000)
    for dtype in ("int64", "int32"):
        x, y = loader.next_batch("train") if dtype == "int64" else BatchLoader(data, 8, 16, dtype=dtype).next_batch()
        assert x.dtype == dtype and x.min() >= 70000
        for row_x, row_y in zip(x, y):
            start = int(row_x[0]) - 70000
            np.testing.assert_array_equal(row_x, train[start:start + 16])
            np.testing.assert_array_equal(row_y, train[start + 1:start + 17])
    assert BatchLoader(data, 4, 8).next_batch("validation")[0].min() >= 100000
    with pytest.raises(DataError, match="holds made-up ids up to 100499 but the model has only 65536"):
        BatchLoader(data, 2, 8, model_vocab_size=65536)
    # A tokenizer naming more ids than the model has rows is fine while the data hold none of them.
    BatchLoader(data, 2, 8, model_vocab_size=100500)
    with pytest.raises(DataError, match="ids up to 100499"):
        BatchLoader(data, 2, 8, model_vocab_size=100499)


def test_uint32_end_to_end_from_a_wide_tokenizer(tmp_path):
    pytest.importorskip("datasets")
    from small_tokenizers import SHIFT, train_bpe, widen

    from data.prepare import is_held_out, prepare
    from data.synthetic import generate_stories, write_text
    from data.tokenizer import load_tokenizer

    wide = load_tokenizer(widen(train_bpe(tmp_path / "tok", merges=200), tmp_path / "wide"))
    source = write_text(tmp_path / "stories.txt", 150, seed=3)
    meta = prepare(source, tmp_path / "data", tokenizer=wide, val_fraction=0.1, quiet=True)
    assert meta["dtype"] == "uint32" and wide.vocab_size > 65535
    stories = [story for story in generate_stories(150, seed=3) if not is_held_out(story, 0.1)]
    train = np.array(sum((wide.document(wide.encode(story)) for story in stories), []))
    loader = BatchLoader(tmp_path / "data", batch_size=16, block_size=64, seed=2, model_vocab_size=wide.vocab_size)
    assert loader.tokens("train") == len(train)
    x, y = loader.next_batch("train")
    assert x.min() >= SHIFT and (x == wide.eos_id).any() and (x == wide.bos_id).any()
    windows = np.lib.stride_tricks.sliding_window_view(train, 65)
    for row_x, row_y in zip(x, y):
        window = np.concatenate([row_x, row_y[-1:]])
        assert (windows == window).all(axis=1).any() and (row_y[:-1] == row_x[1:]).all()

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
