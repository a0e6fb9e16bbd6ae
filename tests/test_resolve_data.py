"""data.resolve: --data to a prepared directory keyed by its source and tokenizer, the refusal of
another tokenizer's data, and the identity of data."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("datasets")
from data import resolve  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.meta import META_NAME, check_tokenizer, load_meta, tokenizer_identity, write_json_atomic  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.resolve import data_identity, resolve_data  # noqa: E402
from data.synthetic import generate_stories, write_text  # noqa: E402
from data.tokenizer import EOT, GPT2_IDENTITY, gpt2, load_tokenizer  # noqa: E402
from small_tokenizers import train_bpe  # noqa: E402

N = 300  # stories per source; the seeds used below all hold some out at the default 1 %


def all_stories(data_dir):
    """Every story of a prepared directory (train + validation), sorted."""
    texts = []
    for split in ("train", "validation"):
        ids = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16)
        texts += gpt2().decode(ids.tolist()).split(EOT)[:-1]
    return sorted(texts)


@pytest.fixture
def calls(monkeypatch):
    """The out_dir of every data.prepare.prepare call resolve_data makes."""
    made = []

    def counting_prepare(*args, **kwargs):
        made.append(str(kwargs["out_dir"]))
        return prepare(*args, **kwargs)

    monkeypatch.setattr(resolve, "prepare", counting_prepare)
    return made


def test_sources_of_one_name_get_their_own_directories_and_tokens(tmp_path, calls):
    a = write_text(tmp_path / "a" / "stories.txt", N, seed=1)
    b = write_text(tmp_path / "b" / "stories.txt", N, seed=5)
    root = tmp_path / "root"
    dir_a = resolve_data(str(a), root, quiet=True)
    dir_b = resolve_data(str(b), root, quiet=True)
    assert dir_a != dir_b
    for path in (dir_a, dir_b):
        assert os.path.dirname(path) == str(root / "data" / "prepared")
        assert re.fullmatch(r"stories-[0-9a-f]{12}", os.path.basename(path))
    assert all_stories(dir_a) == sorted(generate_stories(N, seed=1))
    assert all_stories(dir_b) == sorted(generate_stories(N, seed=5))
    assert load_meta(dir_b)["source"] == str(b)
    # Unchanged sources are reused, whichever order they come in, without preparing again.
    assert calls == [dir_a, dir_b]
    assert resolve_data(str(a), root, quiet=True) == dir_a
    assert resolve_data(str(b), root, quiet=True) == dir_b
    assert calls == [dir_a, dir_b]


def test_an_edited_source_is_prepared_again(tmp_path, calls):
    source = write_text(tmp_path / "stories.txt", N, seed=1)
    root = tmp_path / "root"
    before = resolve_data(str(source), root, quiet=True)
    write_text(source, N, seed=6)
    after = resolve_data(str(source), root, quiet=True)
    assert after != before and len(calls) == 2
    assert all_stories(after) == sorted(generate_stories(N, seed=6))
    # An edit that keeps the file's size is seen too (by its mtime).
    text = source.read_text()
    mtime = source.stat().st_mtime_ns
    source.write_text(text.replace("Once", "ONCE", 1))
    assert source.stat().st_size == len(text) and source.stat().st_mtime_ns != mtime
    edited = resolve_data(str(source), root, quiet=True)
    assert edited not in (before, after) and len(calls) == 3
    assert "ONCE" in "".join(all_stories(edited)) and "ONCE" not in "".join(all_stories(after))


def test_a_directory_and_a_glob_source(tmp_path, calls):
    shards = tmp_path / "shards"
    write_text(shards / "train-0.txt", 40, seed=2)
    write_text(shards / "valid-0.txt", 10, seed=3)
    root = tmp_path / "root"
    from_dir = resolve_data(str(shards), root, quiet=True)
    from_glob = resolve_data(str(shards / "*.txt"), root, quiet=True)
    assert all(os.path.basename(path).startswith("shards-") for path in (from_dir, from_glob))
    assert from_dir != from_glob  # two sources (a glob may match other files later)
    expected = sorted(generate_stories(40, seed=2) + generate_stories(10, seed=3))
    assert all_stories(from_dir) == all_stories(from_glob) == expected
    with pytest.raises(DataError, match="the glob .* matches no"):
        resolve_data(str(tmp_path / "*.parquet"), root, quiet=True)
    assert len(calls) == 2


def test_a_killed_or_foreign_keyed_directory_is_prepared_again(tmp_path, calls):
    source = write_text(tmp_path / "stories.txt", N, seed=1)
    other = write_text(tmp_path / "other.txt", N, seed=5)
    root = tmp_path / "root"
    keyed = resolve_data(str(source), root, quiet=True)
    # What a kill -9 between the renames leaves: one .bin renamed, the other not, no meta.json.
    os.replace(os.path.join(keyed, "validation.bin"), os.path.join(keyed, "validation.bin.tmp"))
    os.unlink(os.path.join(keyed, META_NAME))
    assert resolve_data(str(source), root, quiet=True) == keyed and len(calls) == 2
    assert all_stories(keyed) == sorted(generate_stories(N, seed=1))
    # An accepted dataset of another source in the source's own directory is never reused.
    shutil.rmtree(keyed)
    shutil.copytree(resolve_data(str(other), root, quiet=True), keyed)
    assert resolve_data(str(source), root, quiet=True) == keyed and len(calls) == 4
    assert all_stories(keyed) == sorted(generate_stories(N, seed=1))


def test_a_rejected_prepared_directory_shows_why(tmp_path, calls):
    data = tmp_path / "data"
    prepare(write_text(tmp_path / "s.txt", N, seed=1), data, quiet=True)
    (data / "notes.txt").write_text("a text file beside the dataset")
    (data / "extra.jsonl").write_text('{"text": "and a json one"}\n')
    meta = load_meta(data)
    root = tmp_path / "root"
    assert resolve_data(str(data), root, quiet=True) == str(data)

    write_json_atomic(data / META_NAME, dict(meta, format_version=0))
    with pytest.raises(DataError, match=r"meta.json has format 0 / dtype uint16, this code reads format 2 .*--force"):
        resolve_data(str(data), root, quiet=True)
    write_json_atomic(data / META_NAME, meta)
    with open(data / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(data / "train.bin") - 2)
    with pytest.raises(DataError, match=r"train.bin is \d+ bytes but meta.json records \d+ bytes"):
        resolve_data(str(data), root, quiet=True)
    (data / META_NAME).unlink()
    with pytest.raises(DataError, match="meta.json is missing"):
        resolve_data(str(data), root, quiet=True)
    assert calls == [] and not (root / "data" / "prepared").exists()


def test_unknown_data_names_what_is_accepted(tmp_path, calls):
    with pytest.raises(DataError, match="--data 'nowhere.txt' is neither 'tinystories', 'synthetic'"):
        resolve_data("nowhere.txt", tmp_path, quiet=True)
    (tmp_path / "notes.md").write_text("no story format")
    with pytest.raises(DataError, match="unsupported type"):
        resolve_data(str(tmp_path / "notes.md"), tmp_path, quiet=True)
    assert calls == [] and not (tmp_path / "data").exists()


def test_synthetic_and_tinystories_keep_their_directories(tmp_path, monkeypatch):
    root = tmp_path / "root"
    out = resolve_data("synthetic", root, quiet=True)
    assert out == str(root / "data" / "synthetic")
    assert sum(info["stories"] for info in load_meta(out)["splits"].values()) == 2000
    made = []

    def fake_prepare(**kwargs):  # stands in for the download: copy a prepared dataset into place
        made.append(kwargs)
        shutil.copytree(out, kwargs["out_dir"])

    monkeypatch.setattr(resolve, "prepare", fake_prepare)
    target = str(root / "data" / "tinystories")
    assert resolve_data("tinystories", root, quiet=True) == target
    assert made == [{"out_dir": target, "tokenizer": load_tokenizer("gpt2"), "quiet": True}]  # the hub default
    assert resolve_data("tinystories", root, quiet=True) == target and len(made) == 1


def test_identity_is_the_tokens(tmp_path):
    source = write_text(tmp_path / "stories.txt", N, seed=1)
    one = tmp_path / "one"
    prepare(source, one, quiet=True)
    identity = data_identity(one)
    assert json.loads(json.dumps(identity)) == identity
    assert set(identity) == {"tokenizer", "vocab_size", "eot_id", "dtype", "splits"}
    assert identity["splits"]["train"]["tokens"] == load_meta(one)["splits"]["train"]["tokens"]
    # The same tokens prepared again elsewhere, or the directory moved: the same data.
    prepare(source, tmp_path / "two", quiet=True)
    assert data_identity(tmp_path / "two") == identity
    shutil.move(str(one), tmp_path / "moved")
    assert data_identity(tmp_path / "moved") == identity
    # Another source, or the same stories split otherwise: other data.
    other = write_text(tmp_path / "other.txt", N, seed=5)
    prepare(other, tmp_path / "other", quiet=True)
    assert data_identity(tmp_path / "other") != identity
    prepare(source, tmp_path / "split", val_fraction=0.2, quiet=True)
    split = data_identity(tmp_path / "split")
    assert split != identity
    total = [sum(info["tokens"] for info in ident["splits"].values()) for ident in (split, identity)]
    assert total[0] == total[1]


def test_identity_of_a_dataset_without_recorded_hashes(tmp_path):
    prepare(write_text(tmp_path / "s.txt", N, seed=1), tmp_path / "new", quiet=True)
    identity = data_identity(tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    meta = load_meta(old)
    for info in meta["splits"].values():
        del info["sha256"]
    del meta["source_fingerprint"]
    write_json_atomic(old / META_NAME, meta)
    assert data_identity(old) == identity  # computed from the .bin: the recorded value
    tokens = np.fromfile(old / "train.bin", dtype=np.uint16)
    tokens[len(tokens) // 2] ^= 1  # one token changed, same size and meta.json
    tokens.tofile(old / "train.bin")
    changed = data_identity(old)
    assert changed != identity and changed["splits"]["validation"] == identity["splits"]["validation"]


def test_identity_is_the_same_in_another_process(tmp_path):
    prepare(write_text(tmp_path / "s.txt", N, seed=1), tmp_path / "data", quiet=True)
    code = ("import json, sys; from data.resolve import data_identity; "
            "print(json.dumps(data_identity(sys.argv[1])))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    printed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], cwd=root,
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(printed) == data_identity(tmp_path / "data")


def test_identity_of_a_rejected_directory_is_load_meta_error(tmp_path):
    with pytest.raises(DataError, match="meta.json is missing"):
        data_identity(tmp_path)


# ----- tokenizers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok") / "tiny-bpe", config={"bos_token": "<bos>", "eos_token": "<eos>"})


def test_another_tokenizer_gets_its_own_directories(tmp_path, trained, calls, monkeypatch):
    tok = load_tokenizer(trained)
    root = tmp_path / "root"
    gpt2_dir = resolve_data("synthetic", root, quiet=True)
    other = resolve_data("synthetic", root, tokenizer=str(trained), quiet=True)
    assert other == str(root / "data" / f"synthetic-tiny-bpe-{tok.sha256[:8]}")
    assert load_meta(other)["tokenizer"] == tok.identity() and load_meta(gpt2_dir)["tokenizer"] == GPT2_IDENTITY
    assert resolve_data("synthetic", root, tokenizer=tok, quiet=True) == other
    assert data_identity(other) != data_identity(gpt2_dir)
    assert data_identity(other)["tokenizer"] == {key: tok.identity()[key]
                                                 for key in ("sha256", "vocab_size", "bos_id", "eos_id")}
    source = write_text(tmp_path / "stories.txt", N, seed=1)
    plain = resolve_data(str(source), root, quiet=True)
    keyed = resolve_data(str(source), root, tokenizer=trained, quiet=True)
    assert keyed == f"{plain}-tiny-bpe-{tok.sha256[:8]}" and calls == [plain, keyed]
    assert load_meta(keyed)["tokenizer"] == tok.identity()
    assert resolve_data(str(source), root, tokenizer=trained, quiet=True) == keyed and len(calls) == 2
    made = []
    monkeypatch.setattr(resolve, "prepare", lambda **kw: made.append(kw) or shutil.copytree(other, kw["out_dir"]))
    target = str(root / "data" / f"tinystories-tiny-bpe-{tok.sha256[:8]}")
    assert resolve_data("tinystories", root, tokenizer=trained, quiet=True) == target
    assert [(kw["out_dir"], kw["tokenizer"].identity()) for kw in made] == [(target, tok.identity())]


def test_a_prepared_directory_of_another_tokenizer_is_refused(tmp_path, trained, calls):
    tok = load_tokenizer(trained)
    source = write_text(tmp_path / "s.txt", N, seed=1)
    prepare(source, tmp_path / "hf", tokenizer=tok, quiet=True)
    prepare(source, tmp_path / "gpt2", quiet=True)
    with pytest.raises(DataError, match=rf"hf was prepared with the tokenizer tiny-bpe \(sha256 {tok.sha256[:8]}, "
                                        r"558 ids\), not gpt2 \(sha256 8c804d3e, 50257 ids\); prepare --data with it: "
                                        r"python -m data.prepare --tokenizer gpt2 ") as error:
        resolve_data(str(tmp_path / "hf"), tmp_path / "root", quiet=True)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=rf"gpt2 was prepared with the tokenizer gpt2 .* not tiny-bpe .*"
                                        rf"python -m data.prepare --tokenizer {trained} "):
        resolve_data(str(tmp_path / "gpt2"), tmp_path / "root", tokenizer=str(trained), quiet=True)
    assert resolve_data(str(tmp_path / "hf"), tmp_path / "root", tokenizer=tok, quiet=True) == str(tmp_path / "hf")
    assert calls == []
    # check_tokenizer itself: the meta when it matches, the caller's fix in the message otherwise.
    assert check_tokenizer(tmp_path / "hf", tok.identity()) == load_meta(tmp_path / "hf")
    with pytest.raises(DataError, match="not gpt2 .*; run it again with --tokenizer tok$"):
        check_tokenizer(tmp_path / "hf", GPT2_IDENTITY, "run it again with --tokenizer tok")
    renamed = dict(tok.identity(), name="another-name")  # the name does not matter, the contents do
    assert check_tokenizer(tmp_path / "hf", renamed)
    with pytest.raises(DataError, match="not tiny-bpe"):
        check_tokenizer(tmp_path / "hf", dict(tok.identity(), vocab_size=559))


def test_a_format_1_gpt2_directory_is_still_gpt2_data(tmp_path, trained):
    new = tmp_path / "new"
    prepare(write_text(tmp_path / "s.txt", N, seed=1), new, quiet=True)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    meta = load_meta(old)
    for key in ("sha256",):
        for info in meta["splits"].values():
            del info[key]
    write_json_atomic(old / META_NAME, dict(meta, format_version=1, tokenizer="gpt2"))
    assert tokenizer_identity(load_meta(old)) == GPT2_IDENTITY
    assert resolve_data(str(old), tmp_path / "root", quiet=True) == str(old)
    assert data_identity(old) == data_identity(new)
    assert data_identity(new)["tokenizer"] == "gpt2"  # as recorded by runs before other tokenizers
    with pytest.raises(DataError, match="prepared with the tokenizer gpt2 .* not tiny-bpe"):
        resolve_data(str(old), tmp_path / "root", tokenizer=trained, quiet=True)
    write_json_atomic(old / META_NAME, dict(meta, format_version=1, tokenizer="gpt2", dtype="uint32"))
    with pytest.raises(DataError, match="format 1 / dtype uint32"):
        load_meta(old)
    write_json_atomic(old / META_NAME, dict(meta, format_version=2, dtype="uint32"))  # GPT-2 ids fit uint16
    with pytest.raises(DataError, match="format 2 / dtype uint32"):
        load_meta(old)
