"""Where a model to fine-tune comes from: a Hugging Face Gemma 3 directory or a train.py run directory.

    source = read_init_from(path)    # its config (vocabulary padded to a multiple of 128), its tokenizer
    model.load_state_dict(source.weights(config))

A Hugging Face directory holds config.json (a Gemma 3 text config), *.safetensors and, usually,
tokenizer.json. A run directory holds config.json with the model's config under "model",
best.safetensors (or last/model.safetensors) and tokenizer/ (the tokenizer it was trained with;
older runs without it are GPT-2 runs).
"""
import dataclasses
import json
import os

from nn.checkpoint import CheckpointError, load_weights

from .config import Gemma3Config
from .hf_load import hf_config, hf_weights


@dataclasses.dataclass
class InitFrom:
    path: str
    kind: str               # "hugging_face" or "run"
    config: Gemma3Config
    tokenizer: str = None   # a tokenizer spec for data.tokenizer.load_tokenizer, or None when there is none

    def weights(self, config):
        """name -> array for a model of `config` (this source's config, perhaps with overrides)."""
        if self.kind == "hugging_face":
            return hf_weights(self.path, config)
        best = os.path.join(self.path, "best.safetensors")
        return load_weights(best if os.path.isfile(best) else os.path.join(self.path, "last", "model.safetensors"))


def read_init_from(path):
    """The InitFrom of `path`; a one-line CheckpointError when it is neither kind of directory."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"--init-from {path}: no config.json there; give a Hugging Face Gemma 3 checkpoint "
                              "directory (config.json, *.safetensors, tokenizer.json) or a train.py run directory")
    try:
        with open(config_file) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--init-from {path}: cannot read config.json ({e})") from None
    if isinstance(saved, dict) and "model" in saved and "args" in saved:  # a train.py run
        if not any(os.path.isfile(os.path.join(path, *name)) for name in (("best.safetensors",),
                                                                          ("last", "model.safetensors"))):
            raise CheckpointError(f"--init-from {path}: this run has no weights yet (no best.safetensors or "
                                  "last/model.safetensors)")
        tokenizer = os.path.join(path, "tokenizer")
        return InitFrom(path, "run", Gemma3Config.from_dict(saved["model"]),
                        tokenizer if os.path.isdir(tokenizer) else "gpt2")
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    return InitFrom(path, "hugging_face", hf_config(path, pad_vocab=True), path if has_tokenizer else None)
