"""Training throughput of one optimizer update: our engine against the fastest PyTorch we can build.

    python bench/throughput.py --out bench/runs/DATE_COMMIT_h200_throughput.json   # every row and side (GPU)
    python bench/throughput.py --smoke                   # one small row, every default side (GPU, a check)
    python bench/throughput.py --max-autotune            # + the plain model under max-autotune (slow compile)
    python bench/throughput.py --rows 16x1024x4 --sides ours-fast,torch-plain-reduce-overhead --steps 3
    python bench/throughput.py --skip-compile --ablation 16x1024x1   # + one family of kernels at a time
    python bench/throughput.py --preset tiny --device cpu --sides ours-ref,torch-eager  # CPU smoke test
    python bench/throughput.py --recompute --sides ours-fast,torch-compile   # ours with activation recomputation

A row is BATCHxBLOCKxACCUM: one update is ACCUM micro-batches of BATCH x BLOCK random token ids
(forward + backward each) and one optimizer step. Sides:
  ours-ref      nn.trainer.Trainer's update: fp16 Gemma3, AdamW with fp32 masters, LossScaler, clip 1.0
  ours-fast     the same with the fused kernels on (tinygrad3.kernels; ours-fast:FAMILY for one family)
  ours-graph    ours-fast with each micro-batch replayed as a CUDA graph
  ours-default  exactly the kernels and graphs `python train.py` chooses with no flags (train.kernel_path)
Every PyTorch side runs one update function: fp16 autocast, GradScaler, clip_grad_norm_ 1.0, fused
AdamW, the loss over the real (unpadded) vocabulary, and starts from our model's initial weights:
  torch-eager   HF Gemma3ForCausalLM (sdpa attention), eager
  torch-compile the same loss function under torch.compile (default mode)
  torch-plain   bench/torch_gemma3.py, a plain PyTorch Gemma 3: flash SDPA on causal layers,
                flex_attention (compiled) with a sliding-window block mask on sliding layers; eager
  torch-plain-reduce-overhead  the plain model under torch.compile(mode="reduce-overhead"): CUDA graphs
  torch-plain-max-autotune     under mode="max-autotune" (autotuned GEMMs + CUDA graphs; --max-autotune)
Each compiled side compiles afresh per row (static shapes; torch._dynamo.reset() first). A side that
fails (a compile error, out of memory) is reported as failed with its reason and the run goes on;
the CUDA-graph sides are skipped on the CPU.
Timing: device events around each update, after --warmup updates (compiled sides: at least 3); the
median of --steps updates. "/ best torch" is a side's tok/s over the fastest PyTorch side's on its row.
Peak memory: ours, the CuPy memory pool's held bytes (its high-water: the pool is emptied before
each row and only grows), plus the graphs' own pools for ours-graph: memory taken from the GPU, so
it is compared with torch's max_memory_reserved (its cache emptied before each run; "reserved GiB")
and also shown beside torch's max_memory_allocated, a lower bound that excludes its cache ("peak GiB").
MFU = tokens/s x models.flops.flops_per_token over --peak-tflops ("MFU") and over the fp16 GEMM rate
measured at the start of the run (torch.matmul of two 8192 x 8192 fp16 matrices; "MFU/GEMM").
--recompute applies to our side only (every decoder layer under tinygrad3.recompute: one more
forward of the layers per micro-batch, not counted in MFU's FLOPs); PyTorch's side is unchanged. The
printed header and the JSON's environment say whether it was on. The JSON also records the date,
GPU, commit and command line. The tables are printed last.
"""
import argparse
import datetime
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import nn  # noqa: E402
from models import Gemma3, Gemma3Config  # noqa: E402
from models.flops import flops_per_token  # noqa: E402
from tinygrad3 import backend, kernels  # noqa: E402

DEFAULT_ROWS = "32x128x8,16x1024x4,8x2048x2,4x4096x1"
SMOKE_ROWS = "4x256x2"  # the tiny preset's window is 8: the sliding layers take the flex_attention path
OURS_SIDES = ("ours-ref", "ours-fast", "ours-graph", "ours-default")
# side -> (model, torch.compile mode or None for eager). "hf": transformers' Gemma3ForCausalLM (sdpa);
# "plain": bench/torch_gemma3.py.
TORCH_SIDES = {
    "torch-eager": ("hf", None),
    "torch-compile": ("hf", "default"),
    "torch-plain": ("plain", None),
    "torch-plain-reduce-overhead": ("plain", "reduce-overhead"),
    "torch-plain-max-autotune": ("plain", "max-autotune"),
}
SIDES = OURS_SIDES + tuple(TORCH_SIDES)
DEFAULT_SIDES = tuple(s for s in SIDES if s != "torch-plain-max-autotune")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor's modes that replay CUDA graphs
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None, help=f"comma-separated BATCHxBLOCKxACCUM (default {DEFAULT_ROWS})")
    p.add_argument("--sides", default=None, help=f"comma-separated, from {', '.join(SIDES)} "
                   f"and ours-fast:FAMILY (default: all but torch-plain-max-autotune)")
    p.add_argument("--smoke", action="store_true",
                   help=f"a quick check of every path: the tiny preset, row {SMOKE_ROWS}, 2 timed updates "
                        "(--rows, --preset and --steps still override)")
    p.add_argument("--max-autotune", action="store_true",
                   help="also run torch-plain-max-autotune (minutes of GEMM autotuning per row)")
    p.add_argument("--skip-compile", action="store_true",
                   help="leave out the torch.compile sides (torch-compile, torch-plain-reduce-overhead, "
                        "torch-plain-max-autotune)")
    p.add_argument("--ablation", default=None, metavar="ROW",
                   help="also run ours-fast with one kernel family at a time on this row")
    p.add_argument("--profile", default="", metavar="ROWS",
                   help="also time every op of ours-fast on these rows (device events and host clock)")
    p.add_argument("--kernels", default="", metavar="ROWS",
                   help="also list the GPU kernels of ours-graph's updates on these rows by GPU time "
                        "(CUPTI through torch.profiler, which sees CuPy's kernels too)")
    p.add_argument("--steps", type=int, default=None, help="timed updates per row and side (median; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first (compiled sides: at least 3)")
    p.add_argument("--preset", default=None, choices=Gemma3Config.PRESETS, help="default gemma3_270m")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--peak-tflops", type=float, default=750.0, help="fp16 GEMM peak for MFU (H100: 750 measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recompute", action="store_true",
                   help="ours: activation recomputation, each decoder layer re-run in backward (torch unchanged)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--commit", default=None, help="commit to report (default: git rev-parse --short HEAD)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.preset = args.preset or ("tiny" if args.smoke else "gemma3_270m")
    args.steps = args.steps or (2 if args.smoke else 3)
    args.rows = [parse_row(r) for r in (args.rows or (SMOKE_ROWS if args.smoke else DEFAULT_ROWS)).split(",") if r]
    sides = args.sides.split(",") if args.sides else list(DEFAULT_SIDES)
    if args.max_autotune and "torch-plain-max-autotune" not in sides:
        sides.append("torch-plain-max-autotune")
    args.sides = [s for s in sides if s and not (args.skip_compile and TORCH_SIDES.get(s, (None, None))[1])]
    for side in args.sides:
        if side not in SIDES and not (side.startswith("ours-fast:") and side[10:] in kernels.FAMILIES):
            p.error(f"unknown side {side!r} in --sides: choose from {', '.join(SIDES)} or ours-fast:FAMILY")
    args.ablation = parse_row(args.ablation) if args.ablation else None
    args.profile = [parse_row(r) for r in args.profile.split(",") if r]
    args.kernels = [parse_row(r) for r in args.kernels.split(",") if r]
    args.device = backend.check_device(args.device or backend.default_device())
    if (args.profile or args.kernels) and args.device != "cuda":
        p.error("--profile and --kernels time the GPU: they need --device cuda")
    return args


def parse_row(text):
    try:
        batch, block, accum = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bad row {text!r}: expected BATCHxBLOCKxACCUM, e.g. 16x1024x4") from None
    return batch, block, accum


class Timer:
    """Device events on CUDA (CuPy's or torch's), the host clock on the CPU."""

    def __init__(self, events):
        self.events = events

    def time_ms(self, fn):
        if self.events is None:
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        start, end = self.events()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed(end)


def measure(update, timer, warmup, steps):
    for _ in range(warmup):
        update()
    times = [timer.time_ms(update) for _ in range(steps)]
    return statistics.median(times), times


# ----- our engine ---------------------------------------------------------------------------------

class Ours:
    """nn.trainer.Trainer's update, built from its pieces."""

    def __init__(self, config, device, seed, recompute=False):
        self.xp = backend.array_module(device)
        self.model = Gemma3(config, seed=seed, recompute=recompute)
        masters = self.model.state_dict()
        dtype = np.float16 if device == "cuda" else np.float32
        self.model.to(device=device, dtype=dtype)
        self.opt = nn.AdamW(self.model.named_parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        self.opt.set_masters(masters)
        self.scaler = nn.LossScaler(enabled=dtype == np.float16)
        self.skipped = 0
        if device == "cuda":
            cupy = backend.cupy
            self.pool = cupy.get_default_memory_pool()
            self.timer = Timer(lambda: (_CupyEvent(), _CupyEvent()))
        else:
            self.pool, self.timer = None, Timer(None)

    def micro_loss(self, x, y, loss_weight):
        """As train.setup's loss_fn: the loss, its head's gradients made in the forward."""
        return self.model(x, y, return_logits=False, loss_grad=loss_weight)[1]

    def update(self, batches, graphed=None):
        loss_weight = self.scaler.scale / len(batches)
        loss_sum = self.xp.zeros((), np.float32)
        for x, y in batches:
            if graphed is not None:
                loss_sum += graphed(x, y, loss_weight)
                continue
            _, loss = self.model(x, y, return_logits=False, loss_grad=loss_weight)
            (loss * loss_weight).backward()
            loss_sum += loss.data
        result = self.opt.step(lr=1e-4, inv_scale=self.scaler.inv_scale, clip_norm=1.0)
        self.scaler.update(result.found_inf)
        self.skipped += result.found_inf
        self.opt.zero_grad()
        return float(loss_sum) / len(batches)

    def run(self, batches, families, warmup, steps, graphs=False):
        gc.collect()
        if self.pool is not None:
            self.pool.free_all_blocks()
        self.skipped = 0
        with kernels.fast(bool(families), families or kernels.FAMILIES):
            graphed = nn.GraphedMicroBatch(self.micro_loss, self.opt) if graphs else None
            # With graphs, the first update runs eagerly and the second captures: warm up past both.
            warmup = max(warmup, 2) if graphs else warmup
            median, times = measure(lambda: self.update(batches, graphed), self.timer, warmup, steps)
        peak = self.pool.total_bytes() if self.pool is not None else None
        if graphed is not None and peak is not None:
            peak += graphed.memory_bytes()
        return dict(ms=median, times_ms=times, peak_bytes=peak, skipped_updates=self.skipped)


class _CupyEvent:
    def __init__(self):
        self.event = backend.cupy.cuda.Event()

    def record(self):
        self.event.record()

    def synchronize(self):
        self.event.synchronize()

    def elapsed(self, end):
        return backend.cupy.cuda.get_elapsed_time(self.event, end.event)


def profile_ops(ours, batches, steps):
    """Per op over `steps` fast-path updates: calls, device ms (events around each call: GPU time
    plus any GPU idle while the host launched it) and host ms. Returns rows, biggest first.
    With --recompute, the "Recompute fwd/bwd" rows contain whole layers, whose ops are also
    counted on their own rows (so the rows add up to more than the update)."""
    from tinygrad3.tensor import Function
    cupy = backend.cupy
    stats = {}

    def timed(name, fn, *args, **kwargs):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        t0 = time.perf_counter()
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        entry = stats.setdefault(name, [0, 0.0, []])
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        entry[2].append((start, end))
        return out

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    patched = [(Function, "__call__", Function.__call__)]
    Function.__call__ = lambda self, *a, _f=Function.__call__: timed(type(self).__name__ + " fwd", _f, self, *a)
    for cls in set(subclasses(Function)):
        if "backward" in vars(cls):
            original = vars(cls)["backward"]
            patched.append((cls, "backward", original))
            cls.backward = lambda self, gy, _f=original: timed(type(self).__name__ + " bwd", _f, self, gy)
    step = ours.opt.step
    ours.opt.step = lambda *a, **k: timed("AdamW.step", step, *a, **k)
    try:
        with kernels.fast(True):
            ours.update(batches)  # warm-up
            stats.clear()
            total_ms = [ours.timer.time_ms(lambda: ours.update(batches)) for _ in range(steps)]
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
        del ours.opt.step
    rows = [dict(op=name, calls=calls // steps,
                 device_ms=sum(cupy.cuda.get_elapsed_time(a, b) for a, b in events) / steps,
                 host_ms=1e3 * host / steps)
            for name, (calls, host, events) in stats.items()]
    rows.sort(key=lambda r: -r["device_ms"])
    rows.append(dict(op="(whole update)", calls=1, device_ms=statistics.median(total_ms), host_ms=None))
    return rows


def kernel_profile(ours, batches, steps):
    """GPU time per kernel name over `steps` ours-graph updates, biggest first (kernel launches
    inside CUDA graphs are traced by CUPTI like any other). Needs torch (for its profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with kernels.fast(True):
        graphed = nn.GraphedMicroBatch(ours.micro_loss, ours.opt)
        for _ in range(2):  # eager, then capture
            ours.update(batches, graphed)
        backend.cupy.cuda.Device().synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                ours.update(batches, graphed)
            backend.cupy.cuda.Device().synchronize()
    rows = []
    for event in prof.key_averages():
        ms = getattr(event, "self_device_time_total", None)
        ms = (ms if ms is not None else event.self_cuda_time_total) / 1e3 / steps
        if ms > 0:
            rows.append(dict(op=event.key[:90], calls=event.count // steps, device_ms=ms, host_ms=None))
    return sorted(rows, key=lambda r: -r["device_ms"])


def profile_table(rows):
    lines = ["| op | calls/update | device ms/update | host ms/update |", "|---|---:|---:|---:|"]
    for r in rows:
        host = "-" if r["host_ms"] is None else f"{r['host_ms']:.1f}"
        lines.append(f"| {r['op']} | {r['calls']} | {r['device_ms']:.1f} | {host} |")
    return "\n".join(lines)


# ----- PyTorch ------------------------------------------------------------------------------------

def first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


class Torch:
    """One PyTorch model's update: fp16 autocast, GradScaler, clip_grad_norm_ 1.0, fused AdamW."""

    def __init__(self, kind, config, device, state):
        import torch
        import torch_gemma3
        self.cross_entropy = torch_gemma3.real_vocab_cross_entropy
        self.torch, self.device, self.config, self.kind = torch, device, config, kind
        tensors = {name: torch.from_numpy(a) for name, a in state.items()}
        if kind == "hf":
            import transformers
            hf = transformers.Gemma3TextConfig(**config.to_hf(), pad_token_id=None, attn_implementation="sdpa")
            self.model = transformers.Gemma3ForCausalLM(hf)
            missing, unexpected = self.model.load_state_dict(tensors, strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is the embedding
                raise RuntimeError(f"HF names differ: missing {missing}, unexpected {unexpected}")
        else:
            # On the CPU flex_attention has no backward: sliding layers use SDPA with a mask there.
            sliding = "flex" if device == "cuda" else "sdpa"
            self.model = torch_gemma3.load_state_dict(torch_gemma3.Gemma3Torch(config, sliding=sliding), tensors)
        self.model.to(device).train()
        cuda = device == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.1, fused=True)
        self.scaler = torch.amp.GradScaler(device, enabled=cuda)
        self.autocast = dict(device_type=device, dtype=torch.float16, enabled=cuda)
        self.graphs = False
        events = (lambda: (_TorchEvent(torch), _TorchEvent(torch))) if cuda else None
        self.timer = Timer(events)

    def loss(self, x, y):
        with self.torch.autocast(**self.autocast):
            logits = self.model(x) if self.kind == "plain" else self.model(input_ids=x, use_cache=False).logits
        return self.cross_entropy(logits, y, self.config)

    def update(self, batches, loss_fn):
        torch = self.torch
        loss_sum = torch.zeros((), device=self.device)
        for x, y in batches:
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss = loss_fn(x, y)
            self.scaler.scale(loss / len(batches)).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        # Under CUDA graphs the backward's outputs are overwritten by the next replay: the gradients
        # accumulate into .grad buffers made outside the graphs, kept and zeroed, never freed.
        self.opt.zero_grad(set_to_none=not self.graphs)
        return float(loss_sum) / len(batches)

    def run(self, batches, mode, warmup, steps):
        torch = self.torch
        cuda = self.device == "cuda"
        torch._dynamo.reset()  # a fresh compile per row: no earlier row's code or CUDA graph pools
        self.graphs = mode in GRAPH_MODES
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p) if self.graphs else None
        batches = [(torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)) for x, y in batches]
        if self.kind == "plain" and self.model.sliding.kind == "flex":
            x = batches[0][0]
            self.model.block_mask(x.shape[1], x.device)  # made outside the compiled code
        loss_fn = self.loss if mode is None else torch.compile(self.loss, dynamic=False,
                                                               mode=None if mode == "default" else mode)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # so max_memory_reserved is this run's, as ours is
            torch.cuda.reset_peak_memory_stats()
        from torch._dynamo.utils import counters
        skips = counters["inductor"]["cudagraph_skips"]
        warmup = max(warmup, 3) if mode else warmup  # inductor compiles, then CUDA graphs record, in the first few
        start, result = time.perf_counter(), {}
        if warmup:  # the first update, with the compile
            result["first_update_s"] = self.timer.time_ms(lambda: self.update(batches, loss_fn)) / 1e3
        median, times = measure(lambda: self.update(batches, loss_fn), self.timer, max(warmup - 1, 0), steps)
        result.update(ms=median, times_ms=times, wall_s=time.perf_counter() - start)
        if self.graphs:
            result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        if cuda:
            result.update(peak_bytes=torch.cuda.max_memory_allocated(),
                          reserved_bytes=torch.cuda.max_memory_reserved())
        return result


class _TorchEvent:
    def __init__(self, torch):
        self.event = torch.cuda.Event(enable_timing=True)

    def record(self):
        self.event.record()

    def synchronize(self):
        self.event.synchronize()

    def elapsed(self, end):
        return self.event.elapsed_time(end.event)


def gemm_tflops(device, n=8192, reps=20):
    """fp16 torch.matmul of two n x n matrices on this GPU, TFLOP/s (after warm-up); None on the CPU."""
    if device != "cuda":
        return None
    import torch
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(2))

    def products():
        for _ in range(reps):
            torch.matmul(a, b)

    for _ in range(5):
        torch.matmul(a, b)
    timer = Timer(lambda: (_TorchEvent(torch), _TorchEvent(torch)))
    ms = statistics.median(timer.time_ms(products) for _ in range(3))
    a = b = None
    torch.cuda.empty_cache()
    return 2 * n ** 3 * reps / (ms / 1e3) / 1e12


# ----- the run ------------------------------------------------------------------------------------

def random_batches(rng, config, row):
    """ACCUM (x, y) pairs of random ids (NumPy int64): y is x shifted by one token."""
    batch, block, accum = row
    high = config.unpadded_vocab_size or config.vocab_size
    ids = rng.integers(0, high, size=(accum, batch, block + 1), dtype=np.int64)
    return [(ids[i, :, :-1].copy(), ids[i, :, 1:].copy()) for i in range(accum)]


def row_name(row):
    return "x".join(map(str, row))


def train_default(device):
    """(families, graphs) of `python train.py --device DEVICE` with no other flag."""
    import train
    return tuple(train.kernel_path(train.parse_args(["--device", device]))[:2])


def families_of(side, device):
    if side == "ours-ref":
        return ()
    if side == "ours-default":
        return train_default(device)[0]
    return kernels.FAMILIES if side in ("ours-fast", "ours-graph") else (side[10:],)


def graphs_of(side, device):
    return side == "ours-graph" or (side == "ours-default" and train_default(device)[1])


def run_all(args, config, save):
    """Every (row, side) job; `save(results)` after each, so a run cut short keeps what it measured."""
    rng = np.random.default_rng(args.seed)
    jobs = [(row, side) for row in args.rows for side in args.sides]
    if args.ablation:
        jobs += [(args.ablation, f"ours-fast:{f}") for f in kernels.FAMILIES]
    jobs += [(row, "ours-fast-profile") for row in args.profile]
    jobs += [(row, "ours-graph-kernels") for row in args.kernels]
    batches = {row: random_batches(rng, config, row) for row in sorted({row for row, _ in jobs})}
    results = []

    def record(row, side, fn, skipped=None):
        batch, block, accum = row
        tokens = batch * block * accum
        entry = dict(row=row_name(row), side=side, tokens_per_update=tokens,
                     flops_per_update=flops_per_token(config, block) * tokens)
        if skipped:
            entry["skipped"] = skipped
        else:
            try:
                entry.update(fn())
                flops_s = entry["flops_per_update"] / (entry["ms"] / 1e3)
                entry.update(tok_s=tokens / (entry["ms"] / 1e3), mfu=flops_s / (args.peak_tflops * 1e12),
                             mfu_gemm=flops_s / (args.gemm_tflops * 1e12) if args.gemm_tflops else None)
            except Exception as e:  # one failing side must not cost the others' numbers
                traceback.print_exc()
                entry["error"] = first_line(e)
        results.append(entry)
        compare(results)
        save(results)
        shown = (f"{entry['tok_s']:,.0f} tok/s, {entry['ms']:.1f} ms/update" if "tok_s" in entry
                 else entry.get("error") or f"skipped: {skipped}")
        print(f"[{time.strftime('%H:%M:%S')}] {row_name(row)} {side}: {shown}", flush=True)

    ours_jobs = [(row, side) for row, side in jobs if side.startswith("ours")]
    if ours_jobs:
        ours = Ours(config, args.device, args.seed, recompute=args.recompute)
        for row, side in ours_jobs:
            xp = ours.xp
            dev_batches = [(xp.asarray(x), xp.asarray(y)) for x, y in batches[row]]
            if side == "ours-graph-kernels":
                ops = kernel_profile(ours, dev_batches, args.steps)
                results.append(dict(row=row_name(row), side=side, ops=ops))
                save(results)
                total = sum(r["device_ms"] for r in ops)
                print(f"\nours-graph, {row_name(row)}, GPU kernels ({total:.1f} ms per update):\n"
                      f"{profile_table(ops[:40])}\n", flush=True)
                continue
            if side == "ours-fast-profile":
                ops = profile_ops(ours, dev_batches, args.steps)
                results.append(dict(row=row_name(row), side=side, ops=ops))
                save(results)
                print(f"\nours-fast, {row_name(row)}, per op:\n{profile_table(ops)}\n", flush=True)
                continue
            record(row, side, lambda: ours.run(dev_batches, families_of(side, args.device), args.warmup,
                                               args.steps, graphs=graphs_of(side, args.device)))
        del ours
        gc.collect()
        if args.device == "cuda":
            backend.cupy.get_default_memory_pool().free_all_blocks()
    torch_jobs = [(row, side) for side in args.sides if side in TORCH_SIDES for row in args.rows]
    if torch_jobs:
        run_torch(args, config, torch_jobs, batches, record)
    return results


def run_torch(args, config, jobs, batches, record):
    """The PyTorch sides, one model at a time (HF's, then the plain one), each side over every row."""
    state = Gemma3(config, seed=args.seed).state_dict()  # what Ours starts from: the same seed
    for kind in ("hf", "plain"):
        runner = []

        def run(row, mode):
            if not runner:
                runner.append(Torch(kind, config, args.device, state))
            return runner[0].run(batches[row], mode, args.warmup, args.steps)

        for row, side in jobs:
            model, mode = TORCH_SIDES[side]
            if model != kind:
                continue
            if mode in GRAPH_MODES and args.device != "cuda":
                record(row, side, None, skipped="CUDA graphs need --device cuda")
                continue
            record(row, side, lambda: run(row, mode))
        if runner:
            del runner[:]
            gc.collect()
            if args.device == "cuda":
                import torch
                torch._dynamo.reset()
                torch.cuda.empty_cache()


def compare(results):
    """Each measured entry's tok/s over the fastest PyTorch side's on its row ("vs_best_torch")."""
    best = {}
    for r in results:
        if r["side"] in TORCH_SIDES and "tok_s" in r and r["tok_s"] > best.get(r["row"], (0, ""))[0]:
            best[r["row"]] = (r["tok_s"], r["side"])
    for r in results:
        if "tok_s" in r and r["row"] in best:
            r["vs_best_torch"] = r["tok_s"] / best[r["row"]][0]
            r["best_torch_side"] = best[r["row"]][1]
    return best


def git(*command):
    try:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def environment(args, config):
    now = datetime.datetime.now(datetime.timezone.utc)
    env = dict(date=now.date().isoformat(), time_utc=now.isoformat(timespec="seconds"), preset=args.preset,
               device=args.device, command=shlex.join(["python", "bench/throughput.py", *args.argv]),
               peak_tflops=args.peak_tflops, gemm_tflops=args.gemm_tflops, gpu=None,
               warmup=args.warmup, steps=args.steps, recompute=args.recompute,
               flops_per_token={b: flops_per_token(config, b) for b in sorted({r[1] for r in args.rows})})
    env["commit"] = args.commit or git("rev-parse", "--short", "HEAD")
    env["uncommitted_changes"] = bool(git("status", "--porcelain", "--untracked-files=no")) if not args.commit else None
    if args.device == "cuda":
        cupy = backend.cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        env.update(gpu=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                   cupy=cupy.__version__)
    try:
        import torch
        import transformers
        env.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return env


def gib(n):
    return f"{n / GIB:.1f}" if n is not None else "-"


def order(results, args):
    """The measured entries, by row (as given) and then side (as given)."""
    rows = {row_name(r): i for i, r in enumerate(args.rows)}
    sides = {s: i for i, s in enumerate(args.sides)}
    kept = [r for r in results if "ops" not in r]
    return sorted(kept, key=lambda r: (rows.get(r["row"], len(rows)), sides.get(r["side"], len(sides))))


def table(results, args):
    """Every (row, side): tok/s, ms, MFU against --peak-tflops and the measured GEMM rate, memory, / best torch."""
    lines = ["| row (batch x block x accum) | side | tok/s | ms/update | MFU | MFU/GEMM | peak GiB | reserved GiB "
             "| / best torch |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in order(results, args):
        if "error" in r or "skipped" in r:
            note = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['row']} | {r['side']} | {note} | | | | | | |")
            continue
        gemm = f"{100 * r['mfu_gemm']:.1f}%" if r.get("mfu_gemm") is not None else "-"
        ratio = f"{r['vs_best_torch']:.2f}" if "vs_best_torch" in r else "-"
        lines.append(f"| {r['row']} | {r['side']} | {r['tok_s']:,.0f} | {r['ms']:.1f} | {100 * r['mfu']:.1f}% "
                     f"| {gemm} | {gib(r.get('peak_bytes'))} | {gib(r.get('reserved_bytes', r.get('peak_bytes')))} "
                     f"| {ratio} |")
    return "\n".join(lines)


def summary(results, args):
    """Per row: our fastest side against PyTorch's fastest, with the memory each took from the GPU."""
    lines = ["| row | fastest ours | tok/s | GiB | fastest torch | tok/s | reserved GiB | ours / best torch |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for row in map(row_name, args.rows):
        measured = [r for r in results if r["row"] == row and "tok_s" in r]
        ours = max((r for r in measured if r["side"].startswith("ours")), key=lambda r: r["tok_s"], default=None)
        theirs = max((r for r in measured if r["side"] in TORCH_SIDES), key=lambda r: r["tok_s"], default=None)
        if ours is None or theirs is None:
            continue
        lines.append(f"| {row} | {ours['side']} | {ours['tok_s']:,.0f} | {gib(ours.get('peak_bytes'))} "
                     f"| {theirs['side']} | {theirs['tok_s']:,.0f} | {gib(theirs.get('reserved_bytes'))} "
                     f"| {ours['tok_s'] / theirs['tok_s']:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv=None):
    args = parse_args(argv)
    config = Gemma3Config.preset(args.preset)
    args.gemm_tflops = None
    if args.device == "cuda":
        try:
            args.gemm_tflops = gemm_tflops(args.device)
        except Exception as e:  # no torch: MFU against --peak-tflops only
            print(f"fp16 GEMM rate not measured ({first_line(e)})", flush=True)
    env = environment(args, config)

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save(results):
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(environment=env, results=results), f, indent=1)

    results = run_all(args, config, save)
    gemm = (f"fp16 GEMM (8192^3 torch.matmul) {args.gemm_tflops:.0f} TFLOP/s measured" if args.gemm_tflops
            else "fp16 GEMM rate not measured (CPU)")
    print(f"\n{env['gpu'] or args.device}, {args.preset}, median of {args.steps} updates after "
          f"{args.warmup} warm-up, commit {env.get('commit') or '?'}"
          f"{', ours with --recompute (activation recomputation)' if args.recompute else ''}")
    print(f"MFU against --peak-tflops {args.peak_tflops:.0f}; MFU/GEMM against the {gemm}\n")
    print(table(results, args))
    best = summary(results, args)
    if best:
        print("\n" + best)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
