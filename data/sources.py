"""Where stories come from: a Hugging Face hub dataset, or local text/json/jsonl/parquet files.

`load_source` turns a source string into Hugging Face `Dataset`s with one column, `text`:
- a hub id such as `roneneldan/TinyStories` (used when no local path of that name exists);
- a text file (.txt/.text): stories separated by lines holding only `<|endoftext|>`;
- a .json/.jsonl/.parquet file whose column `text_column` holds one story per row;
- a directory (the supported files directly inside it) or a glob; all of one format.

Split rule for local files: a file whose name contains the word `val`, `valid` or
`validation` (words split on anything but letters and digits, e.g. `stories-valid.txt`,
`validation-00000-of-00001.parquet`) is validation data, every other file is training
data. With no validation file, `prepare` holds out a fraction of the stories instead.

`fingerprint` says whether a local source changed: the sha256 of its absolute path (or glob)
and, for each of its files, the absolute path, size and mtime_ns (an edit that keeps both the
size and the mtime of every file goes unseen; `touch` the file to make it seen).

`datasets` is imported inside the functions: only preparation needs it.
"""
import glob
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import DataError
from .tokenizer import EOT

DEFAULT_SOURCE = "roneneldan/TinyStories"
FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
VALIDATION_WORDS = {"val", "valid", "validation"}
LOCAL_HELP = ("pass a local source instead: python -m data.prepare --source PATH, where PATH is a "
              "text file of stories separated by <|endoftext|> lines, or a directory or glob of "
              ".txt/.json/.jsonl/.parquet files")


def is_hub_id(source):
    """True for 'owner/name' strings that name no local file, directory or glob."""
    source = str(source)
    return (not os.path.exists(source) and not glob.has_magic(source)
            and Path(source).suffix not in FORMATS
            and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None)


def describe(source):
    """The source as recorded in meta.json: the hub id, or the absolute local path or glob."""
    return str(source) if is_hub_id(source) else os.path.abspath(source)


def local_files(source):
    """The sorted supported files a local source names; DataError when there are none."""
    path = Path(source)
    kinds = "/".join(FORMATS)
    if glob.has_magic(str(source)):
        files = [Path(p) for p in sorted(glob.glob(str(source))) if Path(p).suffix in FORMATS]
        if not files:
            raise DataError(f"the glob {source} matches no {kinds} files")
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FORMATS)
        if not files:
            raise DataError(f"the directory {source} holds no {kinds} files")
    elif path.is_file():
        if path.suffix not in FORMATS:
            raise DataError(f"{source} has an unsupported type; use one of {kinds}")
        files = [path]
    else:
        raise DataError(f"the source {source} is neither a file, a directory, a glob nor a hub "
                        f"dataset id; {LOCAL_HELP}")
    formats = {FORMATS[f.suffix] for f in files}
    if len(formats) > 1:
        raise DataError(f"{source} mixes {', '.join(sorted(formats))} files; "
                        "pass a glob that selects one kind, e.g. 'dir/*.parquet'")
    for file in files:
        try:
            with open(file, "rb") as f:
                f.read(1)
        except OSError as error:
            raise DataError(f"cannot read {file}: {error.strerror}") from None
    return files


def fingerprint(source):
    """The sha256 hex digest of what local `source` holds now (see the module docstring); None
    for a hub id. DataError when the source names no readable supported files."""
    if is_hub_id(source):
        return None
    files = []
    for path in local_files(source):
        stat = path.stat()
        files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"source": describe(source), "files": files})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_validation_file(path):
    words = re.split(r"[^a-z0-9]+", Path(path).name.lower())
    return not VALIDATION_WORDS.isdisjoint(words)


def split_files(files):
    """{'train': [...], 'validation': [...]} by the file-name rule; empty lists are dropped."""
    splits = {"train": [f for f in files if not is_validation_file(f)],
              "validation": [f for f in files if is_validation_file(f)]}
    if not splits["train"]:
        raise DataError(f"every file of the source is a validation file ({files[0].name}, ...); "
                        "add training files (names without 'val'/'valid'/'validation')")
    return {name: paths for name, paths in splits.items() if paths}


def read_text_stories(paths):
    """Yield {'text': story} for each story of `<|endoftext|>`-separated UTF-8 text files."""
    for path in paths:
        lines = []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip() == EOT:
                        yield {"text": "".join(lines)}
                        lines = []
                    else:
                        lines.append(line)
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                            "convert it to UTF-8") from None
        yield {"text": "".join(lines)}


def load_source(source, work_dir, text_column="text", num_proc=1):
    """{split: Dataset with column 'text'} for `source`; 'validation' only if the source has it.

    `work_dir` receives the Arrow files `datasets` writes for local sources.
    """
    import datasets

    if is_hub_id(source):
        return _load_hub(source, text_column)
    files = local_files(source)
    splits = {}
    for split, paths in split_files(files).items():
        try:
            splits[split] = _load_files(paths, str(work_dir), text_column, num_proc)
        except datasets.exceptions.DatasetGenerationError as error:
            raise _data_error(error, paths) from None
    return splits


def _load_files(paths, work_dir, text_column, num_proc):
    import datasets

    kind = FORMATS[paths[0].suffix]
    if kind == "text":
        return datasets.Dataset.from_generator(
            read_text_stories, gen_kwargs={"paths": [str(p) for p in paths]},
            features=datasets.Features({"text": datasets.Value("string")}),
            cache_dir=work_dir, num_proc=min(num_proc, len(paths)))
    dataset = datasets.load_dataset(kind, data_files=[str(p) for p in paths], split="train",
                                    cache_dir=work_dir)
    return _text_only(dataset, text_column, ", ".join(p.name for p in paths))


def _text_only(dataset, text_column, where):
    if text_column not in dataset.column_names:
        raise DataError(f"{where} has no column {text_column!r} (columns: "
                        f"{', '.join(dataset.column_names)}); pass --text-column NAME")
    dataset = dataset.select_columns([text_column])
    return dataset if text_column == "text" else dataset.rename_column(text_column, "text")


def _data_error(error, paths):
    """The DataError behind a `datasets` failure, or a new one naming the files."""
    cause = error
    while cause is not None:
        if isinstance(cause, DataError):
            return cause
        cause = cause.__cause__ or cause.__context__
    names = ", ".join(str(p) for p in paths)
    return DataError(f"cannot read {names}: {error.__cause__ or error}")


def hub_reachable(timeout=3.0):
    """Whether the hub's host accepts a TCP connection (assumed yes behind a proxy)."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_hub(name, text_column):
    """Download (or, offline, read from the local cache) a hub dataset."""
    import datasets
    from huggingface_hub import constants

    online = hub_reachable()
    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    if not online:  # no retries against an unreachable host: only the local cache
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        dataset = datasets.load_dataset(name)
    except OSError as error:  # ConnectionError and DatasetNotFoundError included
        if not online:
            raise DataError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) and {name} "
                            f"is not in the local cache; {LOCAL_HELP}") from None
        if isinstance(error, datasets.exceptions.DatasetNotFoundError):
            raise DataError(f"the hub has no dataset {name}; check the name, or {LOCAL_HELP}") from None
        raise DataError(f"cannot download {name} from the Hugging Face hub ({error}); "
                        f"{LOCAL_HELP}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
    if "train" not in dataset:
        raise DataError(f"{name} has no 'train' split (splits: {', '.join(dataset)})")
    return {split: _text_only(dataset[split], text_column, f"{name}[{split}]")
            for split in ("train", "validation") if split in dataset}
