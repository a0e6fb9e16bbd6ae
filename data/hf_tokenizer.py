"""A Hugging Face tokenizer.json, read with the `tokenizers` package, as a `data.tokenizer.Tokenizer`.

The beginning- and end-of-document tokens come from the `bos_token` / `eos_token` of the
tokenizer_config.json beside tokenizer.json (a string, or {"content": ...}), else of its
special_tokens_map.json; a key that is there with null means none. Where neither file names
one, the first special token of tokenizer.json with a usual name is taken (eos: <eos>, </s>,
<|endoftext|>, <|end_of_text|>; bos: <bos>, <s>, <|begin_of_text|>, <|startoftext|>). A
tokenizer without an end-of-document token is refused.

Encoding adds no special tokens, and the text of a special token inside a story stays text
(`encode_special_tokens`), as GPT-2's `encode_ordinary` does; padding and truncation that a
tokenizer.json may configure are switched off. `name` is the config's `name_or_path` (its last
path part), else the directory's name (a file not called tokenizer.json: its name without the
extension); `sha256` is the digest of the tokenizer.json bytes, which `save` writes back unchanged.
"""
import hashlib
import json
import re
from pathlib import Path

from .errors import DataError
from .tokenizer import Tokenizer

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
USUAL_NAMES = {"bos_token": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>"),
               "eos_token": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")}


class HFTokenizer(Tokenizer):
    """tokenizer.json bytes, a name and the bos/eos token strings (bos may be None)."""

    def __init__(self, json_bytes, name, bos_token, eos_token, where="the tokenizer", backend=None):
        backend = backend or _backend(json_bytes, where)
        backend.encode_special_tokens = True
        backend.no_padding()
        backend.no_truncation()
        self.json_bytes, self.backend, self.name = json_bytes, backend, name
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        if eos_token is None:
            raise DataError(f"--tokenizer {where} has no end-of-document token; name it in a "
                            "tokenizer_config.json beside tokenizer.json, e.g. {\"eos_token\": \"</s>\"}")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = None if bos_token is None else self._id(bos_token, "bos_token", where)
        self.eos_id = self._id(eos_token, "eos_token", where)

    def _id(self, token, key, where):
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise DataError(f"--tokenizer {where}: its {key} {token!r} is not in tokenizer.json; "
                            f"fix {key} in tokenizer_config.json")
        return token_id

    def encode_batch(self, texts):
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory):
        """tokenizer.json (the same bytes) and a tokenizer_config.json for PreTrainedTokenizerFast."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_bytes(self.json_bytes)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "name_or_path": self.name,
                  "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "split_special_tokens": True, "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def __reduce__(self):
        return HFTokenizer, (self.json_bytes, self.name, self.bos_token, self.eos_token)


def load_hf_tokenizer(path):
    """The `HFTokenizer` of a tokenizer.json file and the config files beside it."""
    path = Path(path)
    configs = [_read_json(path.parent / name) for name in CONFIG_FILES]
    configs = [config for config in configs if isinstance(config, dict)]
    json_bytes = path.read_bytes()
    backend = _backend(json_bytes, path)
    tokens = {key: _special_token(key, configs, backend) for key in USUAL_NAMES}
    return HFTokenizer(json_bytes, _name(path, configs), tokens["bos_token"], tokens["eos_token"],
                       where=path, backend=backend)


def _backend(json_bytes, where):
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError:
        raise DataError("reading a Hugging Face tokenizer needs the `tokenizers` package: "
                        "pip install tokenizers") from None
    try:
        return Backend.from_str(json_bytes.decode("utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        raise DataError(f"--tokenizer {where} is not a Hugging Face tokenizer.json ({error}); "
                        "give a tokenizer.json written by `tokenizers` or transformers") from None


def _read_json(path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); fix or remove it") from None


def _special_token(key, configs, backend):
    """The content of `key` in the first config holding it, else a special token of a usual name."""
    for config in configs:
        if key in config:
            value = config[key]
            return value.get("content") if isinstance(value, dict) else value
    special = {token.content for token in backend.get_added_tokens_decoder().values() if token.special}
    return next((name for name in USUAL_NAMES[key] if name in special), None)


def _name(path, configs):
    named = next((config["name_or_path"] for config in configs if config.get("name_or_path")), None)
    if named:
        raw = Path(str(named)).name
    else:
        raw = path.resolve().parent.name if path.name == "tokenizer.json" else path.stem
    return re.sub(r"[^\w.-]+", "_", raw).strip("_.") or "tokenizer"
