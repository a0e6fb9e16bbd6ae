"""Load a Hugging Face Gemma 3 checkpoint directory (config.json + *.safetensors) into Gemma3.

Our parameter names are Hugging Face's Gemma3ForCausalLM keys, so loading is a key-for-key
copy. Multimodal checkpoints (Gemma3ForConditionalGeneration) keep the text model under
`language_model`; those keys are renamed and the vision tower is left out.
bfloat16 tensors (how Gemma 3 is published) are widened to float32 exactly: a bf16 number
is the top 16 bits of a float32.
"""
import glob
import json
import os
import struct

import numpy as np

from nn.checkpoint import CheckpointError  # the project's one error for files that cannot be read

from .config import Gemma3Config
from .gemma3 import Gemma3


_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_SKIPPED_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                     "multi_modal_projector.")


def _read_bf16(path, name):
    """Read one BF16 tensor from a safetensors file as float32 (safetensors' NumPy side has no bf16)."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        info = json.loads(f.read(header_len))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_safetensors(path):
    """name -> NumPy array for every tensor of one .safetensors file."""
    from safetensors import safe_open
    tensors = {}
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() == "BF16":
                tensors[name] = _read_bf16(path, name)
            else:
                tensors[name] = f.get_tensor(name)
    return tensors


def hf_state_dict(directory):
    """All text-model tensors of a checkpoint directory, under Gemma3ForCausalLM names."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}: expected a Hugging Face "
                              "checkpoint directory (config.json + model*.safetensors)")
    state = {}
    for path in files:
        for name, array in read_safetensors(path).items():
            if name.startswith(_SKIPPED_PREFIXES):
                continue
            for old, new in _TEXT_PREFIXES:
                if name.startswith(old):
                    name = new + name[len(old):]
            state[name] = array
    return state


VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def hf_config(directory, pad_vocab=False):
    """The Gemma3Config of a Hugging Face directory; pad_vocab: vocab_size rounded up to a multiple of
    128 (the extra ids masked out), as training wants it for the output GEMM's speed."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    config = Gemma3Config.from_hf(directory)
    return config.with_padded_vocab() if pad_vocab else config


def hf_weights(directory, config):
    """The checkpoint's text-model weights for `config`: a tied head's copy dropped, and the vocabulary
    rows padded with zeros up to config.vocab_size (padded ids are never inputs, and their logits are
    masked out, so those rows never change the loss)."""
    state = hf_state_dict(directory)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some exporters write the tied head out anyway
    for name in VOCAB_ROWS:
        if name in state and len(state[name]) < config.vocab_size:
            rows = state[name]
            state[name] = np.concatenate([rows, np.zeros((config.vocab_size - len(rows),) + rows.shape[1:],
                                                         rows.dtype)])
    return state


def load_hf_checkpoint(directory, dtype=None, pad_vocab=False):
    """Build a Gemma3 from a Hugging Face directory: its config and its weights.

    dtype: the parameters' dtype (default float32; pass np.float16 for fp16 inference).
    pad_vocab: round the vocabulary up to a multiple of 128 (hf_config).
    """
    config = hf_config(directory, pad_vocab)
    model = Gemma3(config)
    model.load_state_dict(hf_weights(directory, config), strict=True)
    if dtype is not None:
        model.to(dtype=dtype)
    return model
