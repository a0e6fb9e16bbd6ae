"""Tell a story with a trained Gemma 3.

    python generate.py --run runs/gemma3_270m --prompt "Once upon a time there was a pumpkin"
    python generate.py --run runs/tiny --weights last --greedy --max-new-tokens 50
    python generate.py --hf path/to/gemma-3-270m --prompt "..."   # a Hugging Face checkpoint directory

A run directory (made by train.py) gives the model config (config.json) and the weights
(best.safetensors, or last/model.safetensors with --weights last); its text is GPT-2 BPE.
A Hugging Face directory gives config.json, *.safetensors and tokenizer.json (read with the
`tokenizers` package). Generation uses a KV cache; --no-cache recomputes every step instead.
"""
import argparse
import json
import os
import sys

import numpy as np

from models import Gemma3, Gemma3Config, generate, load_hf_checkpoint
from nn.checkpoint import CheckpointError, load_weights
from tinygrad3 import backend


class GenerateError(ValueError):
    """Arguments or files that generation cannot use."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a train.py run directory")
    source.add_argument("--hf", help="a Hugging Face Gemma 3 checkpoint directory")
    p.add_argument("--weights", default="best", choices=["best", "last"], help="which weights of a run")
    p.add_argument("--prompt", default="Once upon a time there was a pumpkin")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float16", "float32"],
                   help="default float16 on cuda, float32 on cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    args = p.parse_args(argv)
    args.device = backend.check_device(args.device or backend.default_device())
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def load_run(run_dir, which):
    """(model, tokenizer, stop id) from a train.py run directory."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise GenerateError(f"{run_dir} has no config.json: is it a train.py run directory?")
    with open(config_path) as f:
        config = Gemma3Config.from_dict(json.load(f)["model"])
    path = os.path.join(run_dir, "best.safetensors" if which == "best" else os.path.join("last", "model.safetensors"))
    if not os.path.isfile(path):
        raise GenerateError(f"no weights at {path}: the run has not evaluated yet (try --weights last)")
    model = Gemma3(config)
    model.load_state_dict(load_weights(path))
    from data.tokenizer import EOT_ID, gpt2
    return model, GPT2Text(gpt2()), EOT_ID


def load_hf(directory):
    """(model, tokenizer, stop id) from a Hugging Face checkpoint directory."""
    model = load_hf_checkpoint(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise GenerateError(f"{directory} has no tokenizer.json, so its text cannot be encoded")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise GenerateError("reading tokenizer.json needs the `tokenizers` package: pip install tokenizers") from None
    with open(os.path.join(directory, "config.json")) as f:
        eos = json.load(f).get("eos_token_id")
    return model, HFText(Tokenizer.from_file(path)), eos[0] if isinstance(eos, list) else eos


class GPT2Text:
    def __init__(self, encoding):
        self.encoding = encoding

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        return self.encoding.decode(ids)


class HFText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text):
        return self.tokenizer.encode(text).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def main(argv=None):
    args = parse_args(argv)
    try:
        model, text, stop_id = load_run(args.run, args.weights) if args.run else load_hf(args.hf)
    except (GenerateError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(device=args.device, dtype=np.dtype(args.dtype)).eval()
    prompt = text.encode(args.prompt)
    new = generate(model, prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_id=stop_id,
                   use_cache=not args.no_cache)
    if new and new[-1] == stop_id:
        new = new[:-1]
    print(args.prompt + text.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
