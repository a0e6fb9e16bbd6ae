"""The sidecar `meta.json` of a prepared dataset, and what makes a dataset accepted.

A prepared directory holds `train.bin` and `validation.bin` (token ids, uint16, stories
each followed by <|endoftext|>) and `meta.json`, written last. The directory is accepted
when meta.json parses, has this format version, and each .bin holds exactly the number
of tokens meta.json records; anything else (an interrupted run) is rejected.

meta.json fields: format_version, tokenizer, vocab_size, eot_id, dtype, splits
({split: {file, tokens, stories, sha256}}: sha256 is the hex digest of the .bin's bytes),
source, source_fingerprint (`data.sources.fingerprint` of a local source when it was read,
null for a hub dataset), text_column, val_fraction (the held-out fraction, or null when the
source had its own validation split), created, seconds. Datasets prepared before sha256 and
source_fingerprint were recorded are still accepted (format 1 either way).
"""
import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError

META_NAME = "meta.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DTYPE = "uint16"


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
        version = meta["format_version"]
        splits = {name: meta["splits"][name] for name in SPLITS}
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{meta_file} is not a valid sidecar ({error!r}); {fix} --force") from None
    if version != FORMAT_VERSION or meta.get("dtype") != DTYPE:
        raise DataError(f"{meta_file} has format {version} / dtype {meta.get('dtype')}, this code "
                        f"reads format {FORMAT_VERSION} / {DTYPE}; {fix} --force")
    itemsize = np.dtype(DTYPE).itemsize
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
