"""Train.py's --data as a prepared directory, and the identity of a prepared dataset.

    data_dir = resolve_data("stories.txt", root)   # root/data/prepared/stories-<key>, prepared once
    data_dir = resolve_data("synthetic", root, tokenizer="tok/")  # root/data/synthetic-<name>-<sha8>
    identity = data_identity(data_dir)             # a JSON-serialisable dict; equal iff same tokens

Data are prepared with `tokenizer` (a `data.tokenizer.load_tokenizer` spec or a Tokenizer,
default GPT-2). GPT-2's directories are the ones below; any other tokenizer gets its own, the
same name followed by `-<name>-<sha8>` (its `Tokenizer.directory_suffix()`), so that no
tokenizer ever reads another one's tokens. --data is one of:
- 'synthetic': root/data/synthetic, generated and prepared on first use (data.synthetic);
- 'tinystories': root/data/tinystories, downloaded and prepared on first use;
- a prepared directory: a directory holding meta.json, train.bin or validation.bin is used as
  it is when `data.meta.load_meta` accepts it and it was prepared with this tokenizer
  (`data.meta.check_tokenizer`), and their error is raised otherwise (an older format, a
  truncated .bin, another tokenizer): it is never taken for a raw source;
- a raw source (a text/json/jsonl/parquet file, or a directory or glob of them; see
  data.sources): prepared into root/data/prepared/<name>-<key>, where <name> is the file's
  name up to its first dot (a directory's or a glob's last plain path part) and <key> the first
  12 hex digits of the source's fingerprint (`data.sources.fingerprint`: its absolute path and
  each file's absolute path, size and mtime_ns). That directory is reused only when its
  meta.json records the same fingerprint and tokenizer, so two sources of one name get two directories and
  an edited source is prepared again into a new one; the directory of an older version stays
  (delete root/data/prepared to reclaim the space). An interrupted preparation is never
  accepted (data.prepare writes meta.json last) and is redone by the next call.

Two prepared datasets are the same data when they hold the same tokens: `data_identity` is
the tokenizer ("gpt2", or {sha256, vocab_size, bos_id, eos_id} of another), vocab_size,
eot_id, dtype and, per split, the token count and the sha256 of the .bin. Where the directory
lives, what it was prepared from and when do not matter (nor the tokenizer's name); a dataset
prepared before meta.json recorded the sha256 has it computed from the .bin, and a format-1
GPT-2 dataset has the identity of the same tokens prepared now.
"""
import glob
import hashlib
import os
import re
from pathlib import Path

from .errors import DataError
from .meta import META_NAME, SPLITS, bin_path, check_tokenizer, is_prepared, load_meta, tokenizer_identity
from .prepare import prepare
from .sources import fingerprint
from .tokenizer import GPT2_IDENTITY, NAME, Tokenizer, load_tokenizer, same_tokenizer

HASH_CHUNK = 1 << 24  # bytes read at a time when a .bin's sha256 is computed


def resolve_data(spec, root, tokenizer=NAME, quiet=False):
    """The prepared directory (an absolute path string) for `--data spec` under project `root`,
    prepared with `tokenizer` (first, when needed); DataError naming the problem and the fix
    otherwise."""
    fix = None if isinstance(tokenizer, Tokenizer) else (
        f"prepare --data with it: python -m data.prepare --tokenizer {tokenizer} --source ... --out DIR")
    tokenizer = load_tokenizer(tokenizer)
    spec, root, suffix = str(spec), os.path.abspath(root), tokenizer.directory_suffix()
    if spec == "synthetic":
        from .synthetic import prepare_synthetic

        out = os.path.join(root, "data", "synthetic" + suffix)
        prepare_synthetic(out, tokenizer=tokenizer)
        return out
    if spec == "tinystories":
        out = os.path.join(root, "data", "tinystories" + suffix)
        if is_prepared(out):
            check_tokenizer(out, tokenizer, fix)
        else:
            _say(quiet, f"preparing TinyStories into {out} (first run only) ...")
            prepare(out_dir=out, tokenizer=tokenizer, quiet=quiet)
        return out
    if looks_prepared(spec):
        check_tokenizer(spec, tokenizer, fix)
        return os.path.abspath(spec)
    if not (os.path.exists(spec) or glob.has_magic(spec)):
        raise DataError(f"--data {spec!r} is neither 'tinystories', 'synthetic', a prepared directory "
                        "(with meta.json) nor an existing file, directory or glob to prepare")
    key = fingerprint(spec)
    out = os.path.join(root, "data", "prepared", f"{source_name(spec)}-{key[:12]}{suffix}")
    if is_prepared(out):
        meta = load_meta(out)
        if meta.get("source_fingerprint") == key and same_tokenizer(tokenizer_identity(meta), tokenizer.identity()):
            return out
    _say(quiet, f"preparing {spec} into {out} ...")
    prepare(source=spec, out_dir=out, tokenizer=tokenizer, force=True, quiet=quiet)
    return out


def looks_prepared(path):
    """True for a directory holding meta.json, train.bin or validation.bin."""
    path = Path(path)
    names = [META_NAME] + [bin_path(path, split).name for split in SPLITS]
    return path.is_dir() and any((path / name).exists() for name in names)


def source_name(spec):
    """A short directory-name part for a raw source: 'a/stories.txt' -> 'stories',
    'shards/*.parquet' -> 'shards'."""
    parts = [part for part in Path(os.path.abspath(spec)).parts if not glob.has_magic(part)]
    name = re.sub(r"[^\w-]+", "_", parts[-1].split(".")[0]).strip("_")
    return name or "source"


def data_identity(data_dir):
    """What makes the prepared dataset in `data_dir` the data it is (see the module docstring):
    {tokenizer, vocab_size, eot_id, dtype, splits: {split: {tokens, sha256}}}."""
    meta = load_meta(data_dir)
    prepared_with = tokenizer_identity(meta)
    tokenizer = NAME if same_tokenizer(prepared_with, GPT2_IDENTITY) else {
        key: value for key, value in prepared_with.items() if key != "name"}
    splits = {}
    for split in SPLITS:
        info = meta["splits"][split]
        sha256 = info.get("sha256") or file_sha256(bin_path(data_dir, split))
        splits[split] = {"tokens": info["tokens"], "sha256": sha256}
    return {"tokenizer": tokenizer, "vocab_size": meta["vocab_size"],
            "eot_id": meta["eot_id"], "dtype": meta["dtype"], "splits": splits}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _say(quiet, text):
    if not quiet:
        print(text, flush=True)
