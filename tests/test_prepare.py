"""data.prepare: round trips from text/jsonl/parquet sources, holdout, crash safety, errors,
the recorded sha256 and source fingerprint; Hugging Face tokenizers: the bos/eos document rule,
uint32 ids, the tokenizer recorded and checked."""
import hashlib
import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("datasets")
import pyarrow as pa  # noqa: E402  (datasets brings pyarrow)
import pyarrow.parquet as pq  # noqa: E402

from data import prepare as prepare_module  # noqa: E402
from data import sources  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.meta import META_NAME, is_prepared, load_meta, tokenizer_identity, write_json_atomic  # noqa: E402
from data.prepare import DEFAULT_OUT, default_out, main, prepare  # noqa: E402
from data.synthetic import generate_stories, prepare_synthetic, write_text  # noqa: E402
from data.tokenizer import EOT, EOT_ID, GPT2_IDENTITY, gpt2, load_tokenizer  # noqa: E402
from small_tokenizers import SHIFT, train_bpe, widen  # noqa: E402


def decoded_stories(out, split):
    """The stories of a prepared split, read back from its .bin."""
    ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
    assert ids[-1] == EOT_ID
    text = gpt2().decode(ids.tolist())
    return text.split(EOT)[:-1]


def token_count(stories):
    return sum(len(ids) + 1 for ids in gpt2().encode_ordinary_batch(stories))


def write_jsonl(path, stories, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, story in enumerate(stories):
            f.write(json.dumps({"id": i, column: story}) + "\n")


def assert_only_outputs(out):
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "validation.bin"]


def test_text_file_round_trip_with_holdout(tmp_path):
    stories = generate_stories(400, seed=11)
    source = write_text(tmp_path / "stories.txt", 400, seed=11)
    meta = prepare(source, tmp_path / "out", val_fraction=0.1, quiet=True)
    out = tmp_path / "out"
    train, val = decoded_stories(out, "train"), decoded_stories(out, "validation")
    assert sorted(train + val) == sorted(stories)
    assert train == [s for s in stories if s in set(train)]  # source order kept
    assert 20 < len(val) < 80  # about 10 %
    assert meta == load_meta(out)
    for split, stories_of in (("train", train), ("validation", val)):
        sha256 = hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
        assert meta["splits"][split] == {"file": f"{split}.bin", "tokens": token_count(stories_of),
                                         "stories": len(stories_of), "sha256": sha256}
    assert meta["source_fingerprint"] == sources.fingerprint(source)
    assert meta["format_version"] == 2 and meta["tokenizer"] == GPT2_IDENTITY
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    assert meta["source"] == str(source) and meta["val_fraction"] == 0.1
    assert_only_outputs(out)


def test_holdout_is_deterministic_and_parallel_safe(tmp_path, monkeypatch):
    source = write_text(tmp_path / "stories.txt", 600, seed=12)
    prepare(source, tmp_path / "one", num_proc=1, quiet=True, val_fraction=0.2)
    monkeypatch.setattr(prepare_module, "STORIES_PER_PROCESS", 100)  # 2 processes even for 600 stories
    prepare(source, tmp_path / "two", num_proc=2, quiet=True, val_fraction=0.2)
    for split in ("train", "validation"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (tmp_path / "two" / f"{split}.bin").read_bytes()


def test_jsonl_directory_uses_file_names_as_splits(tmp_path):
    train, val = generate_stories(60, seed=1), generate_stories(15, seed=2)
    source = tmp_path / "src"
    source.mkdir()
    write_jsonl(source / "stories-train-0.jsonl", train[:30])
    write_jsonl(source / "stories-train-1.jsonl", train[30:])
    write_jsonl(source / "stories-valid.jsonl", val)
    (source / "notes.md").write_text("not a source file")
    meta = prepare(source, tmp_path / "out", quiet=True)
    assert decoded_stories(tmp_path / "out", "train") == train
    assert decoded_stories(tmp_path / "out", "validation") == val
    assert meta["val_fraction"] is None
    assert meta["splits"]["validation"]["stories"] == 15


def test_parquet_glob_with_text_column(tmp_path):
    train, val = generate_stories(40, seed=3), generate_stories(10, seed=4)
    pq.write_table(pa.table({"story": train}), tmp_path / "train-00000.parquet")
    pq.write_table(pa.table({"story": val}), tmp_path / "validation-00000.parquet")
    (tmp_path / "other.txt").write_text("excluded by the glob")
    prepare(str(tmp_path / "*.parquet"), tmp_path / "out", text_column="story", quiet=True)
    assert decoded_stories(tmp_path / "out", "train") == train
    assert decoded_stories(tmp_path / "out", "validation") == val
    with pytest.raises(DataError, match="no column 'text'.*--text-column"):
        prepare(str(tmp_path / "*.parquet"), tmp_path / "out2", quiet=True)


def test_stories_are_stripped_and_special_text_stays_text(tmp_path):
    stories = ["  One <|endoftext|> inside.\n", "", "   ", "Two.", "\nThree lines\nof\ntext\n"]
    write_jsonl(tmp_path / "train.jsonl", stories)
    write_jsonl(tmp_path / "val.jsonl", ["Four."])
    meta = prepare(tmp_path, tmp_path / "out", quiet=True)
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert int((ids == EOT_ID).sum()) == 3 == meta["splits"]["train"]["stories"]
    assert gpt2().decode(ids.tolist()) == (
        "One <|endoftext|> inside.<|endoftext|>Two.<|endoftext|>Three lines\nof\ntext<|endoftext|>")


def test_interrupted_run_leaves_no_accepted_output(tmp_path, monkeypatch):
    source = write_text(tmp_path / "stories.txt", 300, seed=6)
    out = tmp_path / "out"
    real_write = prepare_module.BinWriter.write

    def write_then_die(self, table):
        real_write(self, table)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.BinWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, quiet=True, val_fraction=0.1)
    assert not is_prepared(out)
    assert not out.exists() or not any(out.iterdir())  # no .bin, .tmp or work files left


def test_interrupted_forced_rerun(tmp_path, monkeypatch):
    source = write_text(tmp_path / "stories.txt", 300, seed=7)
    out = tmp_path / "out"
    prepare(source, out, quiet=True, val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    # Interrupted while writing: the old output stays, untouched and accepted.
    monkeypatch.setattr(prepare_module.BinWriter, "write", die)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, quiet=True, val_fraction=0.1, force=True)
    assert is_prepared(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Interrupted while replacing the files: neither old nor new output is accepted.
    monkeypatch.undo()
    monkeypatch.setattr(prepare_module.BinWriter, "commit", die)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, quiet=True, val_fraction=0.1, force=True)
    assert not is_prepared(out)
    assert not (out / META_NAME).exists()


def test_a_crash_between_renames_is_not_accepted(tmp_path):
    prepare(write_text(tmp_path / "s.txt", 200, seed=8), tmp_path / "out", quiet=True, val_fraction=0.1)
    out = tmp_path / "out"
    assert is_prepared(out)
    with open(out / "train.bin", "r+b") as f:  # a shorter train.bin than meta.json records
        f.truncate(os.path.getsize(out / "train.bin") - 2)
    assert not is_prepared(out)
    with pytest.raises(DataError, match="train.bin.*--force"):
        load_meta(out)
    (out / "train.bin").unlink()
    assert not is_prepared(out)
    (out / META_NAME).unlink()
    with pytest.raises(DataError, match="meta.json is missing"):
        load_meta(out)


def test_existing_output_is_skipped_unless_forced(tmp_path, capsys):
    source = write_text(tmp_path / "s.txt", 200, seed=9)
    first = prepare(source, tmp_path / "out", quiet=True, val_fraction=0.1)
    mtime = os.path.getmtime(tmp_path / "out" / "train.bin")
    time.sleep(0.01)
    assert prepare(source, tmp_path / "out", val_fraction=0.1) == first
    assert "already prepared" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "out" / "train.bin") == mtime
    other = write_text(tmp_path / "other.txt", 200, seed=10)
    with pytest.raises(DataError, match="already holds data prepared from .*--force"):
        prepare(other, tmp_path / "out", quiet=True)
    second = prepare(other, tmp_path / "out", quiet=True, force=True, val_fraction=0.1)
    assert second["source"] == str(other) and second["created"] >= first["created"]


def test_an_edited_source_is_rebuilt_without_force(tmp_path, capsys):
    source = write_text(tmp_path / "s.txt", 200, seed=9)
    prepare(source, tmp_path / "out", quiet=True, val_fraction=0.1)
    write_text(source, 200, seed=10)
    meta = prepare(source, tmp_path / "out", val_fraction=0.1)
    assert "changed since it was prepared" in capsys.readouterr().out
    assert sorted(decoded_stories(tmp_path / "out", "train") + decoded_stories(tmp_path / "out", "validation")) \
        == sorted(generate_stories(200, seed=10))
    assert meta["source_fingerprint"] == sources.fingerprint(source)
    # An output that records no fingerprint (an older preparation) cannot be trusted: rebuilt.
    del meta["source_fingerprint"]
    write_json_atomic(tmp_path / "out" / META_NAME, meta)
    assert prepare(source, tmp_path / "out", quiet=True, val_fraction=0.1)["source_fingerprint"] \
        == sources.fingerprint(source)


def test_fingerprint_follows_size_mtime_and_the_file_set(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("One story.")
    first = sources.fingerprint(source)
    assert sources.fingerprint(source) == first and len(first) == 64
    (source / "notes.md").write_text("not a source file")
    assert sources.fingerprint(source) == first
    stat = (source / "a.txt").stat()
    (source / "a.txt").write_text("One story!")  # same size
    os.utime(source / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sources.fingerprint(source) == first  # documented: size and mtime alike -> unseen
    os.utime(source / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    touched = sources.fingerprint(source)
    assert touched != first
    (source / "a.txt").write_text("One longer story.")
    os.utime(source / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    resized = sources.fingerprint(source)
    assert resized not in (first, touched)
    (source / "b.txt").write_text("Two.")
    assert sources.fingerprint(source) not in (first, touched, resized)
    assert sources.fingerprint(str(source / "*.txt")) != sources.fingerprint(source)  # the glob is part of it
    assert sources.fingerprint("roneneldan/TinyStories") is None
    with pytest.raises(DataError, match="neither a file"):
        sources.fingerprint(tmp_path / "missing.txt")


def test_empty_and_unreadable_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n\n")
    with pytest.raises(DataError, match="holds no stories"):
        prepare(tmp_path / "empty.txt", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "one.txt").write_text("Just one story.")
    with pytest.raises(DataError, match="validation split .* is empty.*--val-fraction"):
        prepare(tmp_path / "one.txt", tmp_path / "out", quiet=True)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        prepare(tmp_path / "latin1.txt", tmp_path / "out", quiet=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match="cannot read .*train.jsonl"):
        prepare(bad, tmp_path / "out", quiet=True)
    with pytest.raises(DataError, match="neither a file, a directory"):
        prepare(tmp_path / "missing.txt", tmp_path / "out", quiet=True)
    with pytest.raises(DataError, match="unsupported type"):
        (tmp_path / "data.csv").write_text("text\nhello\n")
        prepare(tmp_path / "data.csv", tmp_path / "out", quiet=True)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("A story.")
    write_jsonl(tmp_path / "mixed" / "b.jsonl", ["B story."])
    with pytest.raises(DataError, match="mixes json, text"):
        prepare(tmp_path / "mixed", tmp_path / "out", quiet=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission(tmp_path):
    source = write_text(tmp_path / "s.txt", 10, seed=1)
    source.chmod(0)
    with pytest.raises(DataError, match="cannot read"):
        prepare(source, tmp_path / "out", quiet=True)


def test_hub_source_without_network_fails_fast_with_the_fix(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    start = time.time()
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub.*--source"):
        prepare("roneneldan/TinyStories", tmp_path / "out", quiet=True)
    assert time.time() - start < 20
    assert datasets.config.HF_HUB_OFFLINE == constants.HF_HUB_OFFLINE  # restored


def test_cli_prints_errors_without_traceback(tmp_path, capsys):
    assert main(["--source", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    source = write_text(tmp_path / "s.txt", 300, seed=2)
    assert main(["--source", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "tokens/story" in printed and "tokens/s" in printed
    assert main(["--source", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "2"]) == 2


def test_prepare_synthetic_makes_and_reuses_a_dataset(tmp_path):
    start = time.time()
    meta = prepare_synthetic(tmp_path / "syn", n_stories=500, seed=1)
    assert time.time() - start < 15
    assert is_prepared(tmp_path / "syn")
    assert meta["splits"]["train"]["stories"] + meta["splits"]["validation"]["stories"] == 500
    assert prepare_synthetic(tmp_path / "syn", n_stories=500, seed=1) == meta
    other = prepare_synthetic(tmp_path / "syn", n_stories=300, seed=1)
    assert other["splits"]["train"]["stories"] + other["splits"]["validation"]["stories"] == 300


# ----- other tokenizers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small BPE tokenizer with <bos> = 0 and <eos> = 1."""
    return train_bpe(tmp_path_factory.mktemp("tok") / "tiny-bpe", config={"bos_token": "<bos>", "eos_token": "<eos>"})


def documents(out, split, dtype):
    """A prepared split cut into documents at its eos ids (each document keeps its eos)."""
    ids = np.fromfile(out / f"{split}.bin", dtype=dtype).tolist()
    meta = load_meta(out)
    eos = meta["eot_id"]
    assert ids[-1] == eos
    cuts = [i + 1 for i, token in enumerate(ids) if token == eos]
    return [ids[start:end] for start, end in zip([0] + cuts[:-1], cuts)]


def test_a_hugging_face_tokenizer_puts_bos_and_eos_around_every_story(tmp_path, trained):
    tok = load_tokenizer(trained)
    stories = generate_stories(200, seed=13)
    source = write_text(tmp_path / "stories.txt", 200, seed=13)
    meta = prepare(source, tmp_path / "out", tokenizer=trained, val_fraction=0.1, quiet=True)
    assert meta["tokenizer"] == tok.identity() and tokenizer_identity(meta) == tok.identity()
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (tok.vocab_size, tok.eos_id, "uint16")
    assert meta == load_meta(tmp_path / "out")
    told = []
    for split in ("train", "validation"):
        docs = documents(tmp_path / "out", split, np.uint16)
        assert len(docs) == meta["splits"][split]["stories"]
        assert meta["splits"][split]["tokens"] == sum(map(len, docs))
        for doc in docs:
            assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
            assert tok.bos_id not in doc[1:-1] and tok.eos_id not in doc[1:-1]
        told += [tok.decode(doc[1:-1]) for doc in docs]
    assert sorted(told) == sorted(stories)


def test_a_tokenizer_without_bos_ends_documents_with_eos_only(tmp_path):
    tok_dir = train_bpe(tmp_path / "no-bos", merges=50, specials=("<pad>", "</s>"),
                        config={"bos_token": None, "eos_token": "</s>"})
    write_jsonl(tmp_path / "train.jsonl", ["One.", "  ", "Two <pad> </s> here."])
    write_jsonl(tmp_path / "val.jsonl", ["Three."])
    prepare(tmp_path, tmp_path / "out", tokenizer=tok_dir, quiet=True)
    tok = load_tokenizer(tok_dir)
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).tolist()
    assert ids == tok.encode("One.") + [1] + tok.encode("Two <pad> </s> here.") + [1]
    assert ids.count(1) == 2 and 0 not in ids  # special-token text inside a story stays text


def test_uint32_bins_for_a_vocabulary_above_65535(tmp_path, trained):
    wide = widen(trained, tmp_path / "wide")
    source = write_text(tmp_path / "stories.txt", 120, seed=14)
    small = prepare(source, tmp_path / "small", tokenizer=trained, val_fraction=0.1, quiet=True)
    meta = prepare(source, tmp_path / "big", tokenizer=wide, val_fraction=0.1, quiet=True)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == small["vocab_size"] + SHIFT
    for split in ("train", "validation"):
        big_ids = np.fromfile(tmp_path / "big" / f"{split}.bin", dtype=np.uint32)
        small_ids = np.fromfile(tmp_path / "small" / f"{split}.bin", dtype=np.uint16)
        assert meta["splits"][split]["tokens"] == len(big_ids) == small["splits"][split]["tokens"]
        assert os.path.getsize(tmp_path / "big" / f"{split}.bin") == 4 * len(big_ids)
        assert big_ids.min() >= SHIFT
        np.testing.assert_array_equal(big_ids, small_ids.astype(np.uint32) + SHIFT)


def test_parallel_tokenizing_with_a_hugging_face_tokenizer(tmp_path, trained, monkeypatch):
    source = write_text(tmp_path / "stories.txt", 400, seed=15)
    prepare(source, tmp_path / "one", tokenizer=trained, num_proc=1, quiet=True, val_fraction=0.2)
    monkeypatch.setattr(prepare_module, "STORIES_PER_PROCESS", 100)
    prepare(source, tmp_path / "two", tokenizer=trained, num_proc=2, quiet=True, val_fraction=0.2)
    for split in ("train", "validation"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (tmp_path / "two" / f"{split}.bin").read_bytes()


def test_an_output_of_another_tokenizer_is_replaced_only_with_force(tmp_path, trained):
    source = write_text(tmp_path / "s.txt", 200, seed=9)
    prepare(source, tmp_path / "out", quiet=True, val_fraction=0.1)
    with pytest.raises(DataError, match=r"prepared with the tokenizer gpt2 \(sha256 8c804d3e, 50257 ids\), not "
                                        r"tiny-bpe .*--force") as error:
        prepare(source, tmp_path / "out", tokenizer=trained, quiet=True, val_fraction=0.1)
    assert "\n" not in str(error.value)
    assert load_meta(tmp_path / "out")["tokenizer"] == GPT2_IDENTITY
    meta = prepare(source, tmp_path / "out", tokenizer=trained, quiet=True, val_fraction=0.1, force=True)
    assert meta["tokenizer"] == load_tokenizer(trained).identity() == load_meta(tmp_path / "out")["tokenizer"]
    assert prepare(source, tmp_path / "out", tokenizer=trained, quiet=True, val_fraction=0.1) == meta  # reused


def test_cli_tokenizer_flag_and_default_out(tmp_path, trained, capsys):
    source = write_text(tmp_path / "s.txt", 100, seed=2)
    assert main(["--source", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0.1",
                 "--tokenizer", str(trained)]) == 0
    assert "tiny-bpe" in capsys.readouterr().out
    assert load_meta(tmp_path / "out")["tokenizer"] == load_tokenizer(trained).identity()
    assert main(["--source", str(source), "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tokenizer ") and err.count("\n") == 1
    assert default_out() == default_out("gpt2") == DEFAULT_OUT
    sha = load_tokenizer(trained).sha256
    assert default_out(trained) == DEFAULT_OUT.with_name(f"tinystories-tiny-bpe-{sha[:8]}")


def test_prepare_synthetic_with_a_tokenizer(tmp_path, trained):
    gpt2_meta = prepare_synthetic(tmp_path / "syn", n_stories=100, seed=1)
    meta = prepare_synthetic(tmp_path / "syn", n_stories=100, seed=1, tokenizer=trained)
    assert meta != gpt2_meta and meta["tokenizer"] == load_tokenizer(trained).identity()  # not reused
    assert prepare_synthetic(tmp_path / "syn", n_stories=100, seed=1, tokenizer=trained) == meta
