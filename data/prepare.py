"""Tokenize stories into `train.bin` / `validation.bin` plus meta.json, with GPT-2 or any
Hugging Face tokenizer.

    python -m data.prepare                                  # roneneldan/TinyStories from the hub
    python -m data.prepare --source ../shared/data --out /tmp/tinystories-sample
    python -m data.prepare --source stories.txt --val-fraction 0.05 --out data/mine
    python -m data.prepare --tokenizer path/to/tokenizer.json --source stories.txt --out data/mine-hf

--tokenizer is 'gpt2' (the default), a Hugging Face tokenizer.json, or a directory holding one
(see data.tokenizer.load_tokenizer). Each story is stripped of surrounding whitespace and
encoded without special tokens (the text of a special token inside a story stays text); empty
stories are dropped. Document separators: a document is [bos_id if the tokenizer has one] +
the story's ids + [eos_id]. GPT-2 has no bos token, so its stories are each followed by
<|endoftext|> alone; a tokenizer with both, such as Gemma's, puts <bos> at the start of every
story and <eos> at its end. The .bin files hold uint16 ids when the tokenizer has at most
65535 ids, uint32 ids otherwise; meta.json records the dtype and the tokenizer's identity.
Without --out, TinyStories goes to data/tinystories, or data/tinystories-<name>-<sha8> for a
tokenizer other than GPT-2 (the directory `train.py --data tinystories` uses for it).

A source without a validation split gives the stories whose CRC-32 falls in the lowest
`val_fraction` of its range to validation: deterministic, independent of order and process
count, and duplicates land on the same side.

Crash safety: the .bin files are written as `*.bin.tmp` and renamed only once both are
complete; meta.json is removed before the renames and written (atomically) after them, so
an interrupted run never leaves a directory that `data.meta.is_prepared` accepts.

meta.json records the sha256 of each .bin and, for a local source, its fingerprint
(`data.sources.fingerprint`, taken before the source is read). An existing accepted output
of the same source is kept unless `force=True`, or rebuilt when that fingerprint no longer
matches the source (it was edited since, or prepared by a version that recorded none). An
output prepared with another tokenizer is replaced only with `force=True`.
"""
import argparse
import hashlib
import os
import shutil
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import meta as meta_file
from .errors import DataError
from .sources import DEFAULT_SOURCE, describe, fingerprint, load_source
from .tokenizer import NAME, describe_identity, load_tokenizer, same_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "tinystories"
STORIES_PER_PROCESS = 5000  # below this many stories per process, extra processes cost more than they save
WORK_DIR_NAME = ".prepare-work"


def is_held_out(text, val_fraction):
    """Whether a story goes to validation when the source has no validation split."""
    return zlib.crc32(text.encode("utf-8")) < val_fraction * 2**32


def default_out(tokenizer=NAME):
    """data/tinystories for GPT-2, data/tinystories-<name>-<sha8> for another tokenizer."""
    return DEFAULT_OUT.with_name(DEFAULT_OUT.name + load_tokenizer(tokenizer).directory_suffix())


def tokenize_batch(batch, tokenizer, val_fraction=None):
    """datasets.map function: stories -> their documents' ids (+ the held-out flag)."""
    texts = [(text or "").strip() for text in batch["text"]]
    ids = tokenizer.encode_batch(texts)
    out = {"ids": [tokenizer.document(story) if story else story for story in ids]}
    if val_fraction is not None:
        out["held_out"] = [is_held_out(text, val_fraction) for text in texts]
    return out


class BinWriter:
    """Appends token ids to `<split>.bin.tmp` (hashing them); `commit` renames it to `<split>.bin`."""

    def __init__(self, out_dir, split, dtype):
        self.path = meta_file.bin_path(out_dir, split)
        self.dtype = dtype
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.tokens = 0
        self.stories = 0
        self.sha256 = hashlib.sha256()

    def write(self, table):
        """Append the `ids` column of an Arrow table."""
        for chunk in table.column("ids").chunks:
            ids = chunk.flatten().to_numpy(zero_copy_only=False).astype(self.dtype, copy=False)
            data = ids.tobytes()
            self.file.write(data)
            self.sha256.update(data)
            self.tokens += len(ids)
            self.stories += int(np.count_nonzero(chunk.value_lengths().to_numpy(zero_copy_only=False)))

    def close(self):
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def commit(self):
        self.close()
        os.replace(self.tmp, self.path)

    def discard(self):
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_bins(tokenized, writers, quiet=False):
    """Stream every tokenized split into its writer, in order, with one progress bar."""
    import pyarrow.compute as pc
    from tqdm import tqdm

    rows = sum(len(dataset) for dataset in tokenized.values())
    with tqdm(total=rows, unit=" stories", desc="writing", disable=quiet) as bar:
        for split, dataset in tokenized.items():
            for table in dataset.with_format("arrow").iter(batch_size=4096):
                if "held_out" in table.column_names:
                    held_out = table.column("held_out")
                    writers["train"].write(table.filter(pc.invert(held_out)))
                    writers["validation"].write(table.filter(held_out))
                else:
                    writers[split].write(table)
                bar.update(table.num_rows)


def prepare(source=DEFAULT_SOURCE, out_dir=None, *, tokenizer=NAME, num_proc=None, val_fraction=0.01,
            text_column="text", force=False, quiet=False):
    """Prepare `source` into `out_dir` (default: `default_out(tokenizer)`); returns the meta dict
    (see data.meta).

    tokenizer: a `load_tokenizer` spec or a Tokenizer (default GPT-2).
    num_proc: tokenizing processes (default: all cores, fewer for small sources).
    val_fraction: fraction held out when the source has no validation split.
    force: rebuild even when `out_dir` already holds an accepted dataset.
    """
    tokenizer = load_tokenizer(tokenizer)
    out_dir = Path(default_out(tokenizer) if out_dir is None else out_dir)
    label = describe(source)
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if num_proc is not None and num_proc < 1:
        raise DataError(f"--num-proc must be at least 1, got {num_proc}")
    source_fingerprint = fingerprint(source)
    if meta_file.is_prepared(out_dir) and not force:
        existing = meta_file.load_meta(out_dir)
        if existing["source"] != label:
            raise DataError(f"{out_dir} already holds data prepared from {existing['source']}; "
                            "pass --force to replace it, or choose another --out")
        prepared_with = meta_file.tokenizer_identity(existing)
        if not same_tokenizer(prepared_with, tokenizer.identity()):
            raise DataError(f"{out_dir} already holds data prepared with the tokenizer "
                            f"{describe_identity(prepared_with)}, not {describe_identity(tokenizer.identity())}; "
                            "pass --force to replace it, or choose another --out")
        if existing.get("source_fingerprint") == source_fingerprint:
            _say(quiet, f"{out_dir} is already prepared from {label}; pass --force to rebuild")
            return existing
        _say(quiet, f"{label} changed since it was prepared into {out_dir}; rebuilding")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        meta = _build(source, label, source_fingerprint, out_dir, tokenizer, num_proc, val_fraction,
                      text_column, quiet)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed first run leaves no empty output directory
        raise
    _say(quiet, summary(meta, out_dir))
    return meta


def _build(source, label, source_fingerprint, out_dir, tokenizer, num_proc, val_fraction, text_column, quiet):
    """Tokenize and write both splits, then commit them and meta.json; returns the meta."""
    start = time.time()
    work_dir = out_dir / WORK_DIR_NAME
    shutil.rmtree(work_dir, ignore_errors=True)
    writers = {}
    bars = _progress_bars(enabled=not quiet)
    try:
        procs = num_proc or os.cpu_count() or 1
        splits = load_source(source, work_dir, text_column, procs)
        holdout = val_fraction if "validation" not in splits else None
        tokenized = {split: _tokenize(dataset, split, tokenizer, holdout, procs, work_dir)
                     for split, dataset in splits.items()}
        writers = {split: BinWriter(out_dir, split, tokenizer.dtype) for split in meta_file.SPLITS}
        write_bins(tokenized, writers, quiet)
        _check_counts(writers, label, holdout)
        meta = _meta(writers, tokenizer, label, source_fingerprint, text_column, holdout, time.time() - start)
        (out_dir / meta_file.META_NAME).unlink(missing_ok=True)
        for writer in writers.values():
            writer.commit()
        meta_file.write_json_atomic(out_dir / meta_file.META_NAME, meta)
        return meta
    finally:
        for writer in writers.values():
            writer.discard()
        shutil.rmtree(work_dir, ignore_errors=True)
        _progress_bars(enabled=bars)


def _progress_bars(enabled):
    """Switch the progress bars of `datasets` on or off; returns the previous setting."""
    import datasets

    previous = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    return previous


def _tokenize(dataset, split, tokenizer, holdout, procs, work_dir):
    import datasets

    procs = max(1, min(procs, len(dataset) // STORIES_PER_PROCESS))
    features = {"ids": datasets.List(datasets.Value(tokenizer.dtype))}
    if holdout is not None:
        features["held_out"] = datasets.Value("bool")
    return dataset.map(tokenize_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "val_fraction": holdout},
                       remove_columns=["text"], features=datasets.Features(features),
                       num_proc=procs if procs > 1 else None,
                       cache_file_name=str(work_dir / f"tokens-{split}.arrow"),
                       desc=f"tokenizing {split}")


def _check_counts(writers, source, holdout):
    if writers["train"].stories == 0:
        raise DataError(f"the source {source} holds no stories (it is empty or all blank)")
    if writers["validation"].stories == 0:
        fix = ("raise --val-fraction" if holdout is not None
               else "add stories to the validation files")
        raise DataError(f"the validation split of {source} is empty; {fix}")


def _meta(writers, tokenizer, source, source_fingerprint, text_column, holdout, seconds):
    return {
        "format_version": meta_file.FORMAT_VERSION,
        "tokenizer": tokenizer.identity(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eos_id,
        "dtype": tokenizer.dtype,
        "splits": {split: {"file": w.path.name, "tokens": w.tokens, "stories": w.stories,
                           "sha256": w.sha256.hexdigest()}
                   for split, w in writers.items()},
        "source": source,
        "source_fingerprint": source_fingerprint,
        "text_column": text_column,
        "val_fraction": holdout,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
    }


def summary(meta, out_dir):
    """A few lines: stories, tokens and tokens/story per split, time and throughput."""
    lines = [f"prepared {meta['source']} -> {out_dir} ({describe_identity(meta_file.tokenizer_identity(meta))}, "
             f"{meta['dtype']})"]
    total = 0
    for split, info in meta["splits"].items():
        total += info["tokens"]
        lines.append(f"  {split:<10} {info['stories']:>10,} stories {info['tokens']:>13,} tokens "
                     f"{info['tokens'] / info['stories']:>8.1f} tokens/story")
    seconds = meta["seconds"]
    lines.append(f"  {total:,} tokens in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} tokens/s)")
    return "\n".join(lines)


def _say(quiet, text):
    if not quiet:
        print(text, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="hub dataset id, or a text/json/jsonl/parquet file, directory or glob "
                             f"(default {DEFAULT_SOURCE})")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default {DEFAULT_OUT}, or {DEFAULT_OUT}-<name>-<sha8> for a "
                             "tokenizer other than gpt2)")
    parser.add_argument("--tokenizer", default=NAME,
                        help="gpt2, a Hugging Face tokenizer.json, or a directory holding one (default %(default)s)")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: all cores)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction held out for validation when the source has no validation "
                             "split (default %(default)s)")
    parser.add_argument("--text-column", default="text", help="story column of json/parquet sources")
    parser.add_argument("--force", action="store_true", help="rebuild an existing prepared output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    args = parser.parse_args(argv)
    try:
        prepare(args.source, args.out, tokenizer=args.tokenizer, num_proc=args.num_proc, val_fraction=args.val_fraction,
                text_column=args.text_column, force=args.force, quiet=args.quiet)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
