"""Export a train.py run as a Hugging Face Gemma3ForCausalLM directory.

    python -m models.export --run runs/tiny --out exported/tiny
    python -m models.export --run runs/gemma3_270m --out hub/gemma3 --weights last --dtype bfloat16

The directory holds config.json (a Gemma3TextConfig), generation_config.json, model.safetensors
and the run's tokenizer files (copied from <run>/tokenizer/), so that
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it offline.
A padded vocabulary (50304 rows for GPT-2's 50257 ids) is cut back to the real one. bfloat16 is
float32 rounded to nearest, ties to even. The directory is built beside --out under a temporary
name and renamed into place, so an interrupted export never leaves a directory that looks whole.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from nn.arguments import OneLineParser
from nn.checkpoint import CheckpointError, fsync_path, load_weights

from .config import ConfigError, Gemma3Config
from .gemma3 import Gemma3

WEIGHTS = "model.safetensors"
WRITTEN = ("config.json", "generation_config.json", WEIGHTS)  # what the export writes itself
DTYPES = {"float32": "F32", "bfloat16": "BF16"}  # --dtype -> safetensors dtype
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ----- bfloat16 and safetensors ----------------------------------------------------------------
def bfloat16_bits(array):
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even (finite inputs)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def encode(array, dtype):
    """(safetensors dtype, little-endian array) of a float array exported as `dtype` (a --dtype name)."""
    if dtype == "bfloat16":
        return DTYPES[dtype], bfloat16_bits(array).astype("<u2", copy=False)
    return DTYPES[dtype], np.ascontiguousarray(array, dtype="<f4")


def write_safetensors(tensors, path):
    """Write name -> (safetensors dtype, array) as one .safetensors file (PyTorch-format metadata)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, array) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, array in tensors.values():
            f.write(array.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


# ----- reading the run -------------------------------------------------------------------------
def read_run_config(run_dir):
    """The run's config.json as a dict; CheckpointError when `run_dir` is not a train.py run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"--run {run_dir} is not a directory: give a train.py run directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"--run {run_dir} has no config.json: it is not a train.py run directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--run {run_dir}: cannot read {path} ({e}): restore it from a copy") from None
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
        raise CheckpointError(f"--run {run_dir}: {path} holds no model config: it is not a train.py run's")
    return config


def model_config(run_dir, run_config):
    try:
        return Gemma3Config.from_dict(run_config["model"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"--run {run_dir}: the model config in config.json is damaged ({e})") from None


def tokenizer_info(run_dir, run_config, vocab_size):
    """(tokenizer folder, bos id, eos id); CheckpointError when the run has no usable tokenizer. A
    tokenizer without a bos token (GPT-2) gets its eos as bos, as GPT-2's own configs have it."""
    folder = os.path.join(run_dir, "tokenizer")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not files:
        raise CheckpointError(f"--run {run_dir} has no tokenizer files ({folder}/ is missing or empty): "
                              "train.py writes the run's tokenizer there; copy the tokenizer's files (vocab.json + "
                              "merges.txt, or tokenizer.json) into it")
    clash = sorted(set(files) & set(WRITTEN))
    if clash:
        raise CheckpointError(f"--run {run_dir}: {folder}/ holds {', '.join(clash)}, which the export writes "
                              "itself: remove it from the tokenizer folder")
    info = run_config.get("tokenizer")
    if not (isinstance(info, dict) and isinstance(info.get("eos_id"), int)):
        raise CheckpointError(f"--run {run_dir}: config.json has no \"tokenizer\" field with an eos_id: "
                              "train.py records the run's tokenizer there (name, sha256, vocab_size, bos_id, eos_id)")
    bos = info.get("bos_id")
    # A tokenizer may name more ids than the model has rows (Gemma 3's image token), not its bos and eos.
    for name, token in (("eos_id", info["eos_id"]), ("bos_id", bos)):
        if token is not None and not 0 <= token < vocab_size:
            raise CheckpointError(f"--run {run_dir}: the tokenizer's {name} {token} is not one of the model's "
                                  f"{vocab_size} ids")
    return folder, info["eos_id"] if bos is None else bos, info["eos_id"]  # GPT-2: <|endoftext|> both begins and ends


def weights_path(run_dir, which):
    """best.safetensors, or last/model.safetensors (last.old's while a save is between its renames)."""
    if which == "best":
        return os.path.join(run_dir, "best.safetensors")
    path = os.path.join(run_dir, "last", WEIGHTS)
    old = os.path.join(run_dir, "last.old", WEIGHTS)
    return old if not os.path.exists(path) and os.path.isfile(old) else path


def read_weights(run_dir, which, config):
    """The run's weights, checked against the model the config describes (names and shapes)."""
    path = weights_path(run_dir, which)
    if not os.path.isfile(path):
        other = "last" if which == "best" else "best"
        raise CheckpointError(f"--weights {which}: --run {run_dir} has no {os.path.relpath(path, run_dir)} "
                              f"(try --weights {other})")
    expected = {name: p.shape for name, p in Gemma3(config).named_parameters()}
    state = load_weights(path, required=list(expected))
    wrong = [name for name in state if name not in expected or state[name].shape != expected[name]]
    if wrong:
        raise CheckpointError(f"--weights {which}: {path} holds weights of another model ({wrong[0]})")
    return state


# ----- the Hugging Face directory ----------------------------------------------------------------
def hf_config(config, vocab_size, dtype, bos_id, eos_id):
    """config.json: Gemma3Config.to_hf() with the real vocabulary, the dtype and the special ids."""
    d = config.to_hf()
    d.update(vocab_size=vocab_size, dtype=dtype, final_logit_softcapping=None, use_bidirectional_attention=False,
             bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return d


def hf_tensors(state, config, vocab_size, dtype):
    """name -> (safetensors dtype, array) under Hugging Face's keys, vocabulary rows cut to vocab_size."""
    tensors = {}
    for name in sorted(state):
        array = state[name][:vocab_size] if name in (EMBEDDING, HEAD) else state[name]
        tensors[name] = encode(array, dtype)
    return tensors


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def check_out(out_dir, run_dir, overwrite):
    """Refuse an --out that is a file, holds something (unless --overwrite), or holds the run."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"--out {out_dir} is a file: give a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise CheckpointError(f"--out {out_dir} is not empty: choose another --out, or pass --overwrite "
                                  "to replace it")
        out, run = os.path.realpath(out_dir), os.path.realpath(run_dir)
        if os.path.commonpath([out, run]) == out:
            raise CheckpointError(f"--out {out_dir} holds the run {run_dir}: --overwrite would delete it; "
                                  "choose another --out")


def export_run(run_dir, out_dir, weights="best", dtype="float32", overwrite=False):
    """Write the Hugging Face directory `out_dir` from the train.py run `run_dir`; returns a summary dict.

    weights: "best" or "last"; dtype: "float32" or "bfloat16". Every refusal is a one-line CheckpointError.
    """
    if weights not in ("best", "last"):
        raise CheckpointError(f"--weights {weights}: choose best or last")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}")
    run_config = read_run_config(run_dir)
    config = model_config(run_dir, run_config)
    vocab_size = config.unpadded_vocab_size or config.vocab_size
    tokenizer_dir, bos_id, eos_id = tokenizer_info(run_dir, run_config, vocab_size)
    check_out(out_dir, run_dir, overwrite)
    state = read_weights(run_dir, weights, config)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    aside = None
    try:
        write_safetensors(hf_tensors(state, config, vocab_size, dtype), os.path.join(tmp, WEIGHTS))
        write_json(os.path.join(tmp, "config.json"), hf_config(config, vocab_size, dtype, bos_id, eos_id))
        write_json(os.path.join(tmp, "generation_config.json"),
                   {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id})
        for file in sorted(os.listdir(tokenizer_dir)):
            source = os.path.join(tokenizer_dir, file)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(tmp, file))
                fsync_path(os.path.join(tmp, file))
        fsync_path(tmp)
        if os.path.isdir(out_dir) and os.listdir(out_dir):  # --overwrite: the old directory goes aside first
            aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(out_dir, aside)
        os.replace(tmp, out_dir)  # onto nothing, or onto an empty directory
        fsync_path(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return dict(out=out_dir, weights=weights_path(run_dir, weights), dtype=dtype, vocab_size=vocab_size,
                tie_word_embeddings=config.tie_word_embeddings, eos_id=eos_id)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], prog="python -m models.export")
    p.add_argument("--run", required=True, help="a train.py run directory")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write (must be empty or absent)")
    p.add_argument("--weights", default="best", choices=["best", "last"],
                   help="best.safetensors (lowest validation loss) or last/model.safetensors")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the dtype of the exported weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def main(argv=None):
    """Exit status: 0 written, 2 a run or --out that cannot be used, 1 a write that failed."""
    args = parse_args(argv)
    try:
        done = export_run(args.run, args.out, args.weights, args.dtype, args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"exported {done['weights']} to {done['out']}: {done['dtype']}, vocabulary {done['vocab_size']}, "
          f"{'tied' if done['tie_word_embeddings'] else 'untied'} head, eos id {done['eos_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
