"""The sidecar `meta.json` of a prepared dataset, and what makes a dataset accepted.

A prepared directory holds `train.bin` and `validation.bin` (token ids: uint16 when the
tokenizer has at most 65535 ids, uint32 otherwise; each document is [bos] + ids + [eos], see
data.prepare) and `meta.json`, written last. The directory is accepted when meta.json parses,
has a format this code reads, and each .bin holds exactly the number of tokens meta.json
records; anything else (an interrupted run) is rejected.

meta.json fields (format 2): format_version, tokenizer (`Tokenizer.identity()`: name, sha256,
vocab_size, bos_id, eos_id), vocab_size and eot_id (the tokenizer's vocab_size and eos_id),
dtype, splits ({split: {file, tokens, stories, sha256}}: sha256 is the hex digest of the .bin's
bytes), source, source_fingerprint (`data.sources.fingerprint` of a local source when it was
read, null for a hub dataset), text_column, val_fraction (the held-out fraction, or null when
the source had its own validation split), created, seconds.

Format 1 (GPT-2 only: tokenizer "gpt2", dtype uint16) is still accepted and read as GPT-2
data; so are datasets prepared before sha256 and source_fingerprint were recorded.
"""
import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .tokenizer import GPT2_IDENTITY, NAME, describe_identity, dtype_for, same_tokenizer

META_NAME = "meta.json"
FORMAT_VERSION = 2
SPLITS = ("train", "validation")
IDENTITY_KEYS = tuple(GPT2_IDENTITY)


def bin_path(data_dir, split):
    return Path(data_dir) / f"{split}.bin"


def write_json_atomic(path, obj):
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tokenizer_identity(meta):
    """The identity dict of the tokenizer a meta was prepared with (format 1: GPT-2's)."""
    tokenizer = meta["tokenizer"]
    if tokenizer == NAME:
        return dict(GPT2_IDENTITY)
    return {key: tokenizer[key] for key in IDENTITY_KEYS}


def load_meta(data_dir):
    """The meta dict of the accepted prepared dataset in `data_dir`; DataError saying what is
    wrong otherwise."""
    data_dir = Path(data_dir)
    meta_file = data_dir / META_NAME
    fix = f"prepare it: python -m data.prepare --source ... --out {data_dir}"
    if not meta_file.is_file():
        raise DataError(f"{data_dir} holds no prepared dataset ({META_NAME} is missing); {fix}")
    try:
        meta = json.loads(meta_file.read_text())
        version, dtype = meta["format_version"], meta.get("dtype")
        splits = {name: meta["splits"][name] for name in SPLITS}
        vocab_size = tokenizer_identity(meta)["vocab_size"] if version in (1, FORMAT_VERSION) else None
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{meta_file} is not a valid sidecar ({error!r}); {fix} --force") from None
    readable = (dtype == "uint16" and meta["tokenizer"] == NAME if version == 1
                else version == FORMAT_VERSION and dtype == dtype_for(vocab_size))
    if not readable:
        raise DataError(f"{meta_file} has format {version} / dtype {dtype}, this code reads format "
                        f"{FORMAT_VERSION} (uint16 up to 65535 ids, uint32 above) and format 1 (GPT-2, "
                        f"uint16); {fix} --force")
    itemsize = np.dtype(dtype).itemsize
    for name, info in splits.items():
        path = bin_path(data_dir, name)
        expected = info["tokens"] * itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{path} is {found} but {META_NAME} records {expected} bytes "
                            f"(an interrupted or mixed preparation); {fix} --force")
    return meta


def is_prepared(data_dir):
    """True when `data_dir` holds an accepted prepared dataset."""
    try:
        load_meta(data_dir)
    except DataError:
        return False
    return True


def check_tokenizer(data_dir, identity, fix=None):
    """The meta of `data_dir` when it was prepared with the tokenizer `identity` (an identity
    dict or a Tokenizer; the same sha256 and vocab_size); DataError naming both otherwise.
    `fix` replaces the default remedy in the message."""
    identity = identity.identity() if hasattr(identity, "identity") else identity
    meta = load_meta(data_dir)
    prepared = tokenizer_identity(meta)
    if not same_tokenizer(prepared, identity):
        spec = NAME if same_tokenizer(identity, GPT2_IDENTITY) else f"<{identity['name']} tokenizer.json or directory>"
        fix = fix or f"prepare --data with it: python -m data.prepare --tokenizer {spec} --source ... --out DIR"
        raise DataError(f"{data_dir} was prepared with the tokenizer {describe_identity(prepared)}, "
                        f"not {describe_identity(identity)}; {fix}")
    return meta
