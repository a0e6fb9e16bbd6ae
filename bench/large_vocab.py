"""google/gemma-3-270m's own configuration, with its 262,144-token vocabulary, trained for a few updates.

    python bench/large_vocab.py --out bench/runs/DATE_COMMIT_h200_large_vocab.json     # GPU: both paths
    python bench/large_vocab.py --device cpu --small                                   # CPU: reference path

The model is Gemma3Config.from_hf of the checkpoint's config.json (GEMMA3_270M below, or --config):
hidden 640, 18 layers, a tied 262,144 x 640 embedding (168M of its 268M parameters), every 6th
layer full attention. Each path starts from the same random model (--seed) and trains on one fixed
batch of --batch-size x --block-size random ids that includes the top ids of the vocabulary
(262,143 among the inputs and the targets), as train.py does: fp16 on CUDA with float32 AdamW
masters, the loss scaler and clipping at 1.0 (float32 without a scaler on the CPU), one
micro-batch per update. Paths:
  fast-graphs  the fused kernels (every family) with each micro-batch replayed as a CUDA graph
  reference    the reference ops, eager (the only path on the CPU)
Checks, per path: every loss is finite and the last of the --check-updates updates is below the
first (the same batch each time, so the model memorises it); and the two paths' first losses,
made from the same weights and batch, differ by at most --loss-tol. Then --steps more updates are
timed (device events on CUDA, the host clock on the CPU): tok/s is the median's. Memory, sampled
after every update: the CuPy pool's held bytes plus the CUDA graphs' pools (the pool is emptied
before each path and only grows, so this is its high-water) and the device's used memory
(cudaMemGetInfo: everything on the GPU, CUDA context included; also recorded before the path starts).
--small keeps the vocabulary, the tied head and the rotary bases but shrinks the layers (2 of
hidden 64, window 8), for a CPU check in seconds. The JSON (--out) records the date, GPU, commit,
command line, the config, the largest ids trained on and, per path, every loss and the timings.
Exit status 0 when every check passes, 1 otherwise.
"""
import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nn  # noqa: E402
from models import ConfigError, Gemma3, Gemma3Config  # noqa: E402
from nn.trainer import micro_batch_runner  # noqa: E402
from tinygrad3 import backend, kernels  # noqa: E402

# google/gemma-3-270m's config.json, its model fields (transformers 4.x names).
GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262_144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 512,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": None,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32_768,
    "tie_word_embeddings": True,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "hidden_activation": "gelu_pytorch_tanh",
    "use_bidirectional_attention": False,
    "torch_dtype": "bfloat16",
}
PATHS = ("fast-graphs", "reference")
TOP_IDS = 8  # how many of the vocabulary's top ids the batch holds (262,143 down)
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="PATH",
                   help="a Hugging Face config.json (or its directory) instead of the built-in gemma-3-270m one")
    p.add_argument("--small", action="store_true",
                   help="2 layers of hidden 64 (window 8), the same 262,144 vocabulary: a CPU check")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--paths", default=None,
                   help=f"comma-separated, from {', '.join(PATHS)} (default: both on cuda, reference on cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (--small: 2)")
    p.add_argument("--block-size", type=int, default=None, help="default 1024 (--small: 32)")
    p.add_argument("--check-updates", type=int, default=5,
                   help="updates on the fixed batch whose losses must be finite and fall (at least 2)")
    p.add_argument("--steps", type=int, default=3, help="timed updates after those (median)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("--loss-tol", type=float, default=0.02,
                   help="largest allowed difference of the two paths' first losses")
    p.add_argument("--seed", type=int, default=0, help="the random model's and the batch's seed")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "large_vocab.json"), help="the JSON file written")
    p.add_argument("--commit", default=None, help="commit to report (default: git rev-parse --short HEAD)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.batch_size = args.batch_size or (2 if args.small else 8)
    args.block_size = args.block_size or (32 if args.small else 1024)
    if args.batch_size < 1 or args.block_size < 1:
        p.error("--batch-size and --block-size must be at least 1")
    if args.check_updates < 2 or args.steps < 1:
        p.error("--check-updates must be at least 2 (a first and a last loss) and --steps at least 1")
    args.device = backend.check_device(args.device or backend.default_device())
    paths = args.paths.split(",") if args.paths else list(PATHS if args.device == "cuda" else ("reference",))
    for path in paths:
        if path not in PATHS:
            p.error(f"unknown path {path!r} in --paths: choose from {', '.join(PATHS)}")
        if path == "fast-graphs" and args.device != "cuda":
            p.error("--paths fast-graphs needs --device cuda (fused kernels and CUDA graphs); use --paths reference")
    args.paths = paths
    return args


def build_config(args):
    """The model config: --config's or GEMMA3_270M, shrunk by --small (vocabulary kept)."""
    config = Gemma3Config.from_hf(args.config if args.config else GEMMA3_270M)
    if args.small:
        config = dataclasses.replace(config, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    if args.block_size > config.max_position_embeddings:
        raise ConfigError(f"--block-size {args.block_size} exceeds max_position_embeddings "
                          f"({config.max_position_embeddings}); pass a smaller --block-size")
    return config


def fixed_batch(config, batch, block, seed):
    """(x, y) int64 of shape (batch, block): random ids, y x shifted by one, with the TOP_IDS largest
    ids of the vocabulary at the start of the first row and the end of the last (in x and in y)."""
    vocab = config.unpadded_vocab_size or config.vocab_size
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, block + 1), dtype=np.int64)
    top = vocab - 1 - np.arange(min(TOP_IDS, block + 1))
    ids[0, :len(top)] = top
    ids[-1, -len(top):] = top[::-1]
    return ids[:, :-1].copy(), ids[:, 1:].copy()


class Memory:
    """High-waters sampled between updates: the CuPy pool (+ CUDA graph pools) and the device."""

    def __init__(self, device):
        self.cupy = backend.cupy if device == "cuda" else None
        self.pool_bytes = self.device_bytes = None
        self.start_bytes = self.device_used() if self.cupy is not None else None  # before the path's model

    def device_used(self):
        free, total = self.cupy.cuda.runtime.memGetInfo()
        return total - free

    def sample(self, runner):
        if self.cupy is None:
            return
        pool = self.cupy.get_default_memory_pool().total_bytes()
        pool += runner.memory_bytes() if hasattr(runner, "memory_bytes") else 0
        self.pool_bytes = max(self.pool_bytes or 0, pool)
        self.device_bytes = max(self.device_bytes or 0, self.device_used())


def timed_ms(device, fn):
    """fn()'s duration: device events on CUDA, the host clock on the CPU."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    cuda = backend.cupy.cuda
    start, end = cuda.Event(), cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return cuda.get_elapsed_time(start, end)


def train_path(path, config, batch, args):
    """One path: a fresh model, --check-updates updates (losses), then --steps timed ones."""
    graphs = path == "fast-graphs"
    families = kernels.FAMILIES if graphs else ()
    dtype = np.float16 if args.device == "cuda" else np.float32
    xp = backend.array_module(args.device)
    if args.device == "cuda":
        backend.cupy.get_default_memory_pool().free_all_blocks()
    memory, losses, skipped = Memory(args.device), [], []
    with kernels.fast(bool(families), families or kernels.FAMILIES):
        model = Gemma3(config, seed=args.seed)
        masters = model.state_dict()
        model.to(device=args.device, dtype=dtype)
        opt = nn.AdamW(model.named_parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        opt.set_masters(masters)
        del masters
        scaler = nn.LossScaler(enabled=dtype == np.float16)

        def loss_fn(x, y, loss_weight):
            return model(x, y, return_logits=False, loss_grad=loss_weight)[1]

        runner = micro_batch_runner(loss_fn, opt, model.parameters(), graphs=graphs)
        x, y = (xp.asarray(a) for a in batch)

        def update():
            loss = runner(x, y, scaler.scale, last=True)  # with graphs: valid until the next micro-batch
            runner.finish()
            result = opt.step(lr=args.lr, inv_scale=scaler.inv_scale, clip_norm=1.0)
            scaler.update(result.found_inf)
            opt.zero_grad()
            memory.sample(runner)
            losses.append(float(loss))
            skipped.append(bool(result.found_inf))

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for _ in range(args.check_updates):
                update()
            checked = losses[:]
            times = [timed_ms(args.device, update) for _ in range(args.steps)]
        backend.raise_deferred()  # an id out of range on the GPU is reported here
    ms = statistics.median(times)
    result = dict(dtype=np.dtype(dtype).name, losses=checked, timed_losses=losses[len(checked):],
                  skipped_updates=skipped, finite=all(map(math.isfinite, losses)),
                  decreased=checked[-1] < checked[0], ms=ms, times_ms=times,
                  tok_s=args.batch_size * args.block_size / (ms / 1e3),
                  pool_peak_gib=None if memory.pool_bytes is None else memory.pool_bytes / GIB,
                  device_peak_gib=None if memory.device_bytes is None else memory.device_bytes / GIB,
                  device_start_gib=None if memory.start_bytes is None else memory.start_bytes / GIB)
    return result


def first_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def git(*command):
    try:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def gpu_name(device):
    if device != "cuda":
        return None
    name = backend.cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else name


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(paths):
    lines = ["| path | dtype | first loss | last checked loss | falls | tok/s | ms/update | pool peak GiB "
             "| device peak GiB |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, r in paths.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {name} | {r['dtype']} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} "
                     f"| {'yes' if r['decreased'] else 'NO'} | {r['tok_s']:,.0f} | {r['ms']:.1f} "
                     f"| {fmt(r['pool_peak_gib'], '.2f')} | {fmt(r['device_peak_gib'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as e:
        print(f"error: {e} (--config {args.config or 'built-in gemma-3-270m'})", file=sys.stderr)
        return 2
    batch = fixed_batch(config, args.batch_size, args.block_size, args.seed)
    now = datetime.datetime.now(datetime.timezone.utc)
    report = dict(date=now.date().isoformat(), time_utc=now.isoformat(timespec="seconds"),
                  gpu=gpu_name(args.device), device=args.device,
                  commit=args.commit or git("rev-parse", "--short", "HEAD"),
                  command=shlex.join(["python", "bench/large_vocab.py", *args.argv]),
                  config=config.to_dict(), config_source=args.config or "built-in google/gemma-3-270m",
                  small=args.small, batch_size=args.batch_size, block_size=args.block_size, grad_accum=1,
                  lr=args.lr, seed=args.seed, check_updates=args.check_updates, steps=args.steps,
                  max_input_id=int(batch[0].max()), max_target_id=int(batch[1].max()), paths={})
    print(f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size:,} "
          f"(tied: {config.tie_word_embeddings}); {args.batch_size} x {args.block_size} tokens, ids up to "
          f"{max(report['max_input_id'], report['max_target_id']):,}; {report['gpu'] or args.device}", flush=True)
    for path in args.paths:
        try:
            report["paths"][path] = train_path(path, config, batch, args)
        except Exception as e:  # one failing path must not cost the other's numbers
            traceback.print_exc()
            report["paths"][path] = dict(error=first_line(e))
        gc.collect()  # the path's model, optimizer and graphs, before the next path starts
        r = report["paths"][path]
        shown = r.get("error") or f"losses {', '.join(f'{v:.4f}' for v in r['losses'])}; {r['tok_s']:,.0f} tok/s"
        print(f"[{time.strftime('%H:%M:%S')}] {path}: {shown}", flush=True)
    ran = {name: r for name, r in report["paths"].items() if "error" not in r}
    diff = ran["fast-graphs"]["losses"][0] - ran["reference"]["losses"][0] if len(ran) == 2 else None
    report.update(first_loss_difference=diff, loss_tol=args.loss_tol)
    report["passed"] = (len(ran) == len(args.paths) and all(r["finite"] and r["decreased"] for r in ran.values())
                        and (diff is None or abs(diff) <= args.loss_tol))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("\n" + table(report["paths"]))
    if diff is not None:
        print(f"\nfirst update's loss, fast-graphs - reference: {diff:+.2e} (--loss-tol {args.loss_tol:g})")
    print(f"\n{'PASS' if report['passed'] else 'FAIL'}; written to {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
