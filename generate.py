"""Tell a story with a trained Gemma 3.

    python generate.py --run runs/gemma3_270m --prompt "Once upon a time there was a pumpkin"
    python generate.py --run runs/tiny --weights last --greedy --max-new-tokens 50
    python generate.py --hf path/to/gemma-3-270m --prompt "..."   # a Hugging Face checkpoint directory

A run directory (made by train.py) gives the model config (config.json), the weights
(best.safetensors, or last/model.safetensors with --weights last) and the tokenizer the model
was trained with (tokenizer/, checked against the identity config.json records; a run without
either is GPT-2's). A Hugging Face directory gives config.json, *.safetensors and tokenizer.json.
--tokenizer SPEC overrides the directory's tokenizer. The prompt is the tokenizer's bos (when it
has one) and the prompt's ids; generation stops at the tokenizer's eos and never samples an id the
tokenizer lacks. Generation uses a KV cache; --no-cache recomputes every step instead.
On CUDA with float16 the fused kernels run (the fast path); --reference keeps the readable
reference path. The story goes to stdout; stderr gets one line naming the path that runs.
The prompt and --max-new-tokens must fit the model's context (max_position_embeddings).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from data.errors import DataError
from data.tokenizer import GPT2_IDENTITY, describe_identity, gpt2_tokenizer, load_tokenizer, same_tokenizer
from models import Gemma3, Gemma3Config, generate, load_hf_checkpoint
from nn.checkpoint import CheckpointError, DamagedFileError, load_weights, non_finite
from nn.arguments import OneLineParser
from nn.module import StateDictError
from tinygrad3 import backend, kernels


class GenerateError(ValueError):
    """Arguments or files that generation cannot use; the message names the flag."""


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a train.py run directory")
    source.add_argument("--hf", help="a Hugging Face Gemma 3 checkpoint directory")
    p.add_argument("--weights", default="best", choices=["best", "last"], help="which weights of a run")
    p.add_argument("--tokenizer", default=None, metavar="SPEC", help="gpt2, a tokenizer.json or a directory "
                   "holding one, in place of the run's or the checkpoint's own tokenizer")
    p.add_argument("--prompt", default="Once upon a time there was a pumpkin")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, > 0")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (k >= 1)")
    p.add_argument("--top-p", type=float, default=0.95, help="sample among the most likely tokens holding "
                   "this much probability, in (0, 1]; 1 keeps them all")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float16", "float32"],
                   help="default float16 on cuda, float32 on cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--reference", action="store_true", help="the readable reference path (no fused "
                   "kernels); the default on CUDA with float16 is the fast path")
    args = p.parse_args(argv)
    check_arguments(p, args)
    try:
        args.device = backend.check_device(args.device or backend.default_device())
    except (ValueError, RuntimeError) as e:
        p.error(f"--device: {e}")
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    try:
        args.families, args.path = kernel_path(args)
    except ValueError as e:  # TINYGRAD3_FAST naming unknown families
        p.error(str(e))
    return args


def check_arguments(p, args):
    """Values that mean nothing, refused by flag name before anything is loaded."""
    if args.prompt == "":
        p.error("--prompt is empty: give some text for the story to continue")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.greedy and not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--temperature must be a finite number > 0, got {args.temperature:g} (for always the most "
                "likely token, use --greedy)")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k} (leave it out to sample from every token)")
    if not 0 < args.top_p <= 1:  # NaN fails this too
        p.error(f"--top-p must be in (0, 1], got {args.top_p:g} (1 samples from every token)")


def kernel_path(args):
    """(kernel families to turn on, the line saying which path runs and why)."""
    if args.device != "cuda":
        return (), "reference path (cpu)"
    if args.reference:
        return (), "reference path (--reference)"
    if args.dtype != "float16":
        return (), f"reference path (the fused kernels take float16, not --dtype {args.dtype})"
    chosen = kernels.environment_families()
    if chosen is None:
        return kernels.FAMILIES, "fast path"
    families = tuple(f for f in kernels.FAMILIES if f in chosen)
    if not families:
        return (), "reference path (TINYGRAD3_FAST=0)"
    return families, "fast path" + ("" if families == kernels.FAMILIES else f" ({', '.join(families)})")


# ----- train.py run directories -----------------------------------------------------------------
def _read_json(path, flag):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise GenerateError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # truncated, edited or binary: JSONDecodeError, UnicodeDecodeError
        raise GenerateError(f"{flag}: {path} is damaged (not JSON: {e}): restore it from a copy") from None


def is_run_directory(directory):
    """True when `directory` holds a train.py run (its config.json, best weights or checkpoints)."""
    if any(os.path.exists(os.path.join(directory, name)) for name in ("best.safetensors", "last", "last.old")):
        return True
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model" in config and "args" in config


def run_weights_path(run_dir, which):
    """The weights file --weights names; a checkpoint caught between its renames is read from last.old."""
    if which == "best":
        return os.path.join(run_dir, "best.safetensors")
    path = os.path.join(run_dir, "last", "model.safetensors")
    old = os.path.join(run_dir, "last.old", "model.safetensors")
    return old if not os.path.exists(path) and os.path.isfile(old) else path


def intact(path):
    """True when `path` is a weights file that loads (readable, every float finite)."""
    try:
        load_weights(path)
    except CheckpointError:
        return False
    return True


def recorded_tokenizer(config, flag, config_path):
    """The tokenizer identity config.json records (None for a run from before it did)."""
    recorded = config.get("tokenizer")
    if recorded is None:
        return None
    if not (isinstance(recorded, dict) and isinstance(recorded.get("name"), str)
            and isinstance(recorded.get("sha256"), str) and isinstance(recorded.get("vocab_size"), int)):
        raise GenerateError(f"{flag}: the tokenizer field of {config_path} is damaged (no name, sha256 and "
                            "vocab_size): restore it from a copy")
    return recorded


def run_tokenizer(run_dir, recorded, spec):
    """--tokenizer, else RUN/tokenizer/, else GPT-2 (the tokenizer of runs that saved none),
    refused unless it is the tokenizer config.json records (when it records one)."""
    flag = f"--run {run_dir}"
    saved = os.path.join(run_dir, "tokenizer")
    if spec is not None:
        tokenizer, where = load_tokenizer(spec), f"--tokenizer {spec}"
    elif os.path.isdir(saved):
        try:
            tokenizer, where = load_tokenizer(saved), f"{flag}: {saved}"
        except DataError as e:
            raise GenerateError(f"{flag}: its tokenizer cannot be read ({e})") from None
    elif recorded is None or same_tokenizer(recorded, GPT2_IDENTITY):
        return gpt2_tokenizer()
    else:
        raise GenerateError(f"{flag} has no tokenizer/ directory, but its model was trained with "
                            f"{describe_identity(recorded)}: give that tokenizer with --tokenizer SPEC")
    if recorded is not None and not same_tokenizer(tokenizer.identity(), recorded):
        raise GenerateError(f"{where} is {describe_identity(tokenizer.identity())}, but the model was trained with "
                            f"{describe_identity(recorded)} (config.json): give that tokenizer with --tokenizer SPEC")
    return tokenizer


def load_run(run_dir, which, tokenizer_spec=None):
    """(model, tokenizer) from a train.py run directory."""
    flag = f"--run {run_dir}"
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise GenerateError(f"{flag} has no config.json: it is not a train.py run directory")
    config = _read_json(config_path, flag)
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
        if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
            raise GenerateError(f"{flag} is a Hugging Face checkpoint directory, not a train.py run: "
                                f"use --hf {run_dir}")
        raise GenerateError(f"{flag}: {config_path} holds no model config (it is damaged, or not a train.py "
                            "run's): restore it from a copy")
    recorded = recorded_tokenizer(config, flag, config_path)
    try:
        config = Gemma3Config.from_dict(config["model"])
    except (TypeError, ValueError) as e:  # unknown or missing fields, values that describe no model
        raise GenerateError(f"{flag}: the model config in {config_path} is damaged ({e}): restore it "
                            "from a copy") from None
    tokenizer = run_tokenizer(run_dir, recorded, tokenizer_spec)
    model_vocab = config.unpadded_vocab_size or config.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise GenerateError(f"{flag}: the tokenizer {describe_identity(tokenizer.identity())} has more ids than "
                            f"the model's {model_vocab}: give the tokenizer the model was trained with "
                            "(--tokenizer SPEC)")
    path = run_weights_path(run_dir, which)
    other = "last" if which == "best" else "best"
    if not os.path.isfile(path):
        why = "the run has not evaluated yet" if which == "best" else "the run has saved no checkpoint yet"
        raise GenerateError(f"--weights {which}: no weights at {path}: {why} (try --weights {other})")
    model = Gemma3(config)
    try:
        state = load_weights(path, required=[name for name, _ in model.named_parameters()])
        model.load_state_dict(state)
    except DamagedFileError as e:
        fix = f"try --weights {other}" if intact(run_weights_path(run_dir, other)) else \
            "the run has no other intact weights: train it again"
        raise GenerateError(f"--weights {which}: {e.path} is damaged ({e.reason}): {fix}") from None
    except (CheckpointError, StateDictError) as e:  # unreadable, or the weights of another model
        raise GenerateError(f"--weights {which}: {path}: {e}") from None
    return model, tokenizer


# ----- Hugging Face directories ------------------------------------------------------------------
def check_hf_files(directory, flag):
    """Every *.safetensors file's header parses (a truncated or damaged file is named here)."""
    from safetensors import SafetensorError, safe_open
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            try:
                with safe_open(path, framework="numpy"):
                    pass
            except (SafetensorError, OSError) as e:
                raise GenerateError(f"{flag}: {path} is damaged ({e}): download the checkpoint again") from None


def load_hf(directory, tokenizer_spec=None):
    """(model, tokenizer) from a Hugging Face checkpoint directory."""
    flag = f"--hf {directory}"
    if not os.path.isdir(directory):
        raise GenerateError(f"{flag} is not a directory: give a Hugging Face checkpoint directory")
    if is_run_directory(directory):
        raise GenerateError(f"{flag} is a train.py run directory: use --run {directory}")
    check_hf_files(directory, flag)
    try:
        model = load_hf_checkpoint(directory)
    except (ValueError, StateDictError, OSError) as e:  # no config.json, no weights, weights of another model
        raise GenerateError(f"{flag}: {e}") from None
    bad = non_finite(model.state_dict())
    if bad:
        raise GenerateError(f"{flag}: the weights hold non-finite values in {', '.join(bad[:5])}: the "
                            "checkpoint is damaged; download it again")
    if tokenizer_spec is not None:
        return model, load_tokenizer(tokenizer_spec)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise GenerateError(f"{flag} has no tokenizer.json, so its text cannot be encoded: give the "
                            "checkpoint's tokenizer with --tokenizer SPEC")
    try:
        return model, load_tokenizer(directory)
    except DataError as e:
        raise GenerateError(f"{flag}: its tokenizer cannot be read ({e})") from None


def prompt_ids(tokenizer, text, model_vocab):
    """The tokenizer's bos (when it has one, as every training document starts) and `text`'s ids."""
    ids = tokenizer.encode(text)
    if not ids:
        raise GenerateError("--prompt encodes to no tokens: give some text for the story to continue")
    if max(ids) >= model_vocab:
        raise GenerateError(f"--prompt encodes to id {max(ids)}, which the model's {model_vocab} ids lack: give "
                            "the model's own tokenizer (--tokenizer SPEC)")
    return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + ids


def sample_tokenizer_ids_only(model, tokenizer):
    """Mask the logits of every id the tokenizer lacks (padding, or a larger embedding table than
    its vocabulary), as the model masks its padding: such ids get probability 0 and are never drawn."""
    config = model.config
    if tokenizer.vocab_size < (config.unpadded_vocab_size or config.vocab_size):
        config.unpadded_vocab_size = tokenizer.vocab_size


def continuation(tokenizer, prompt, new):
    """The text `new` adds after the prompt's ids (decoded together, for tokenizers whose
    decoding of a piece depends on what comes before it)."""
    whole, head = tokenizer.decode(prompt + new), tokenizer.decode(prompt)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new)


def check_context(n_prompt, max_new_tokens, context):
    """Refuse a prompt, or prompt plus new tokens, longer than the model's positions."""
    if n_prompt >= context:
        raise GenerateError(f"--prompt is {n_prompt} tokens, which leaves no room in the model's context of "
                            f"{context} positions: shorten it to at most {context - 1} tokens")
    if n_prompt + max_new_tokens > context:
        raise GenerateError(f"--max-new-tokens {max_new_tokens} after the {n_prompt}-token prompt runs past the "
                            f"model's context of {context} positions: use --max-new-tokens <= {context - n_prompt}")


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer = (load_run(args.run, args.weights, args.tokenizer) if args.run else
                            load_hf(args.hf, args.tokenizer))
        prompt = prompt_ids(tokenizer, args.prompt, model.config.unpadded_vocab_size or model.config.vocab_size)
        check_context(len(prompt), args.max_new_tokens, model.config.max_position_embeddings)
    except (GenerateError, DataError) as e:  # DataError: --tokenizer, or the GPT-2 tokenizer files
        print(f"error: {e}", file=sys.stderr)
        return 2
    sample_tokenizer_ids_only(model, tokenizer)
    model.to(device=args.device, dtype=np.dtype(args.dtype)).eval()
    kernels.set_fast(bool(args.families), args.families or kernels.FAMILIES)
    print(args.path, file=sys.stderr)
    new = generate(model, prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_id=tokenizer.eos_id,
                   use_cache=not args.no_cache)
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    body = prompt[1:] if tokenizer.bos_id is not None else prompt
    print(args.prompt + continuation(tokenizer, body, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
