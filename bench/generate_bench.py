"""Generation speed: tokens/s of greedy decoding, ours (fast path, KV cache) against Hugging Face
transformers' Gemma3ForCausalLM.generate on the same GPU in the same process.

    python bench/generate_bench.py --out bench/runs/DATE_COMMIT_h200_generate.json     # on a GPU
    python bench/generate_bench.py --batches 1 --variants ours,hf-static-compile
    python bench/generate_bench.py --smoke          # tiny preset on the CPU, a few tokens: the script works

Both sides hold the same random weights of the preset (models.Gemma3Config.preset, seed 0):
ours are built, then copied into Gemma3ForCausalLM(Gemma3TextConfig) key for key, with the
vocabulary cut to its unpadded size (ours masks the padding ids; HF then cannot produce them
either), so both decode the same tokens up to float16 near ties. No network is needed.
Every batch row has its own random prompt of --prompt-len ids; each run decodes exactly
--new-tokens tokens greedily (no stop id) and its time includes the prompt's prefill.
tokens/s = batch x new tokens / seconds, the best of --reps timed runs after --warmup untimed.
Variants:
  ours               generate_greedy_batch, float16, the fused kernels (tinygrad3.kernels), KV cache
  hf-dynamic         generate with its default DynamicCache, sdpa attention, no compilation
  hf-static          cache_implementation="static", compilation disabled
  hf-static-compile  the static cache with generate's torch.compile of the decoding forward
                     (CompileConfig: inductor, mode reduce-overhead, i.e. CUDA graphs)
A variant that fails (a compile that does not work, out of memory) is reported with its error
and the others still run. The table is printed last; --out writes it with the environment as JSON.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models import Gemma3, Gemma3Config  # noqa: E402
from models.generation import generate_greedy_batch  # noqa: E402
from tinygrad3 import backend, kernels, no_grad  # noqa: E402

VARIANTS = ("ours", "hf-dynamic", "hf-static", "hf-static-compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma3_270m", choices=Gemma3Config.PRESETS)
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--reps", type=int, default=3, help="timed runs per row (the best is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation, CUDA graphs)")
    p.add_argument("--smoke", action="store_true", help="the tiny preset on the CPU in float32, 8 new "
                   "tokens, batches 1 and 2, one run each: checks the script end to end")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batches, args.new_tokens, args.reps, args.warmup = "tiny", "1,2", 8, 1, 1
    args.device, args.dtype = ("cpu", "float32") if args.smoke else ("cuda", "float16")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    for name in ("prompt_len", "new_tokens", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batches, default=0) < 1:
        p.error("--batches must be positive integers")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.device == "cuda" and not backend.cuda_available():
        p.error("no CUDA GPU with CuPy here: run on a GPU, or pass --smoke for the CPU check")
    return args


def prompts(config, batch, length, seed=0):
    """batch rows of random ids in the unpadded vocabulary, the same for every variant."""
    vocab = config.unpadded_vocab_size or config.vocab_size
    return np.random.default_rng([seed, batch]).integers(0, vocab, size=(batch, length))


# ----- ours --------------------------------------------------------------------------------------
class Ours:
    def __init__(self, config, args):
        self.model = Gemma3(config, seed=0)
        self.state = self.model.state_dict()  # float32, for the HF copy
        self.model.to(device=args.device, dtype=np.dtype(args.dtype)).eval()
        self.fast = args.device == "cuda"
        self.path = "fast path" if self.fast else "reference path (cpu)"

    def sync(self):
        if self.fast:
            backend.cupy.cuda.Device().synchronize()

    def generate(self, ids, new_tokens):
        with kernels.fast(self.fast):
            return generate_greedy_batch(self.model, ids, new_tokens, use_cache=True)

    def last_logits(self, ids):
        """float64 logits of the last prompt position (the parity check)."""
        with kernels.fast(self.fast), no_grad():
            xp = backend.get_array_module(self.model.parameters()[0].data)
            logits, _ = self.model(xp.asarray(ids))
            return backend.to_numpy(logits.data[:, -1]).astype(np.float64)


# ----- Hugging Face ------------------------------------------------------------------------------
class HF:
    def __init__(self, config, state, args):
        import torch
        import transformers
        self.torch, self.device = torch, torch.device(args.device)
        vocab = config.unpadded_vocab_size or config.vocab_size
        hf_config = transformers.Gemma3TextConfig(**dict(config.to_hf(), vocab_size=vocab), pad_token_id=None,
                                                  eos_token_id=None, attn_implementation="sdpa")
        weights = {name: torch.from_numpy(a[:vocab] if name in ("model.embed_tokens.weight", "lm_head.weight")
                                          else a) for name, a in state.items()}
        if config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        self.model = transformers.Gemma3ForCausalLM(hf_config)
        self.model.load_state_dict(weights, strict=True)
        self.model.to(device=self.device, dtype=getattr(torch, args.dtype)).eval()
        self.model.generation_config.eos_token_id = None  # every run decodes all its tokens
        self.transformers = transformers

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def options(self, variant, new_tokens):
        options = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                       disable_compile=variant != "hf-static-compile")
        if variant != "hf-dynamic":
            options["cache_implementation"] = "static"
        if variant == "hf-static-compile":
            compile_config = self.transformers.CompileConfig()
            compile_config._compile_all_devices = self.device.type != "cuda"  # generate compiles on GPUs only
            options["compile_config"] = compile_config
        return options

    def generate(self, variant, ids, new_tokens):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(ids).to(self.device)
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                      generation_config=self.transformers.GenerationConfig(
                                          **self.options(variant, new_tokens)))
        return out[:, ids.shape[1]:].cpu().numpy()

    def compiled(self):
        return hasattr(self.model, "_compiled_call")

    def last_logits(self, ids):
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(ids).to(self.device)).logits[:, -1]
        return logits.double().cpu().numpy()


# ----- timing -------------------------------------------------------------------------------------
def time_runs(run, sync, warmup, reps):
    """(best seconds, every timed run's seconds, the tokens of the last run)."""
    for _ in range(warmup):
        tokens = run()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        tokens = run()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), times, tokens


def agreement(tokens, reference):
    """Mean length of the common greedy prefix per row, as a fraction of the new tokens."""
    same = [int(np.argmin(np.append(a == b, False))) for a, b in zip(tokens, reference)]
    return float(np.mean(same)) / tokens.shape[1]


def parity(ours, hf, config, ids):
    """Relative difference of the last-position logits (unpadded vocabulary), ours against HF."""
    vocab = config.unpadded_vocab_size or config.vocab_size
    a, b = ours.last_logits(ids)[:, :vocab], hf.last_logits(ids)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def environment(args):
    env = {"python": platform.python_version(), "numpy": np.__version__, "device": args.device,
           "dtype": args.dtype, "preset": args.preset, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "reps": args.reps, "warmup": args.warmup,
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    for name in ("torch", "transformers", "cupy"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if args.device == "cuda":
        env["gpu"] = backend.cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return env


def main(argv=None):
    args = parse_args(argv)
    config = Gemma3Config.preset(args.preset)
    ours = Ours(config, args)
    hf, hf_error = None, None
    if any(v.startswith("hf") for v in args.variants):
        try:
            hf = HF(config, ours.state, args)
        except Exception as e:  # torch or transformers missing or too old: our rows still run
            hf_error = f"{type(e).__name__}: {e}"
            print(f"Hugging Face side unavailable: {hf_error}", file=sys.stderr)
    result = {"environment": environment(args), "ours_path": ours.path, "rows": []}
    if hf is not None:
        result["logits_rel_diff"] = parity(ours, hf, config, prompts(config, 1, args.prompt_len))
        print(f"last-position logits, ours vs HF: relative difference {result['logits_rel_diff']:.2e}")
    for batch in args.batches:
        ids = prompts(config, batch, args.prompt_len)
        reference = None
        for variant in args.variants:
            row = {"variant": variant, "batch": batch}
            result["rows"].append(row)
            if variant.startswith("hf") and hf is None:
                row["error"] = hf_error
                continue
            if variant == "ours":
                run, sync = (lambda: ours.generate(ids, args.new_tokens)), ours.sync
            else:
                run, sync = (lambda v=variant: hf.generate(v, ids, args.new_tokens)), hf.sync
            try:
                best, times, tokens = time_runs(run, sync, args.warmup, args.reps)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"{variant} batch {batch} failed:\n{traceback.format_exc()}", file=sys.stderr)
                continue
            if tokens.shape != (batch, args.new_tokens):
                row["error"] = f"produced {tokens.shape[1]} of {args.new_tokens} tokens"
                continue
            row.update(seconds=best, times=times, tokens_per_s=batch * args.new_tokens / best,
                       ms_per_step=1000 * best / args.new_tokens)
            if variant == "hf-static-compile":
                row["compiled"] = hf.compiled()
            if reference is None:
                reference = tokens
            row["same_tokens_as_" + args.variants[0]] = agreement(tokens, reference)
            print(f"{variant:>18} batch {batch:>3}: {row['tokens_per_s']:10.1f} tok/s  "
                  f"({row['ms_per_step']:.2f} ms/step)", flush=True)
    print()
    print(table(result, args))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


def table(result, args):
    env = result["environment"]
    lines = [f"Greedy generation, {args.preset} (random weights), {args.dtype} on {env.get('gpu', args.device)}, "
             f"prompt {args.prompt_len} + {args.new_tokens} new tokens; ours: {result['ours_path']}, KV cache; "
             f"best of {args.reps} after {args.warmup} warm-up", "",
             "| variant | batch | tokens/s | ms/step | vs ours | same tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    ours = {r["batch"]: r["tokens_per_s"] for r in result["rows"] if r["variant"] == "ours" and "tokens_per_s" in r}
    same_key = "same_tokens_as_" + args.variants[0]
    for r in result["rows"]:
        name = r["variant"] + (" (not compiled)" if r.get("compiled") is False else "")
        if "error" in r:
            lines.append(f"| {name} | {r['batch']} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / ours[r['batch']]:.2f}x" if r["batch"] in ours else ""
        lines.append(f"| {name} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {ratio} | "
                     f"{r[same_key]:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
