"""Training throughput of one optimizer update: our engine (reference and fast path) against PyTorch.

    python bench/throughput.py --out bench/throughput.json           # every row and side (GPU)
    python bench/throughput.py --rows 16x1024x4 --sides ours-fast,torch-eager --steps 3
    python bench/throughput.py --skip-compile --ablation 16x1024x1   # + one family of kernels at a time
    python bench/throughput.py --preset tiny --device cpu --sides ours-ref,torch-eager  # CPU smoke test
    python bench/throughput.py --recompute --sides ours-fast,torch-compile   # ours with activation recomputation

A row is BATCHxBLOCKxACCUM: one update is ACCUM micro-batches of BATCH x BLOCK random token ids
(forward + backward each) and one optimizer step. Sides:
  ours-ref      train.Trainer's update: fp16 Gemma3, AdamW with fp32 masters, LossScaler, clip 1.0
  ours-fast     the same with the fused kernels on (tinygrad3.kernels; ours-fast:FAMILY for one family)
  ours-graph    ours-fast with each micro-batch replayed as a CUDA graph
  ours-default  exactly the kernels and graphs `python train.py` chooses with no flags (train.kernel_path)
  torch-eager   HF Gemma3ForCausalLM (sdpa), fp16 autocast, GradScaler, clip_grad_norm_, fused AdamW
  torch-compile the same loss function under torch.compile
Timing: device events around each update, after --warmup updates; the median of --steps updates.
Peak memory: ours, the CuPy memory pool's held bytes (its high-water: the pool is emptied before
each row and only grows), plus the graphs' own pools for ours-graph: memory taken from the GPU, so
it is compared with torch's max_memory_reserved (its cache emptied before each run; "reserved GiB")
and also shown beside torch's max_memory_allocated, a lower bound that excludes its cache ("peak GiB").
MFU = tokens/s x models.flops.flops_per_token / --peak-tflops. The table is printed last.
--recompute applies to our side only (every decoder layer under tinygrad3.recompute: one more
forward of the layers per micro-batch, not counted in MFU's FLOPs); PyTorch's side is unchanged. The
printed header and the JSON's environment say whether it was on.
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nn  # noqa: E402
from models import Gemma3, Gemma3Config  # noqa: E402
from models.flops import flops_per_token  # noqa: E402
from tinygrad3 import backend, kernels  # noqa: E402

DEFAULT_ROWS = "32x128x8,16x1024x4,32x128x1,16x1024x1"
SIDES = ("ours-ref", "ours-fast", "ours-graph", "ours-default", "torch-eager", "torch-compile")
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated BATCHxBLOCKxACCUM")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)} "
                   "and ours-fast:FAMILY")
    p.add_argument("--skip-compile", action="store_true", help="leave out torch-compile")
    p.add_argument("--ablation", default=None, metavar="ROW",
                   help="also run ours-fast with one kernel family at a time on this row")
    p.add_argument("--profile", default="", metavar="ROWS",
                   help="also time every op of ours-fast on these rows (device events and host clock)")
    p.add_argument("--kernels", default="", metavar="ROWS",
                   help="also list the GPU kernels of ours-graph's updates on these rows by GPU time "
                        "(CUPTI through torch.profiler, which sees CuPy's kernels too)")
    p.add_argument("--steps", type=int, default=3, help="timed updates per row and side (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first (torch-compile: at least 3)")
    p.add_argument("--preset", default="gemma3_270m", choices=Gemma3Config.PRESETS)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--peak-tflops", type=float, default=750.0, help="fp16 GEMM peak for MFU (H100: 750 measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recompute", action="store_true",
                   help="ours: activation recomputation, each decoder layer re-run in backward (torch unchanged)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--commit", default=None, help="commit to report (default: git rev-parse --short HEAD)")
    args = p.parse_args(argv)
    args.rows = [parse_row(r) for r in args.rows.split(",") if r]
    args.sides = [s for s in args.sides.split(",") if s and not (args.skip_compile and s == "torch-compile")]
    for side in args.sides:
        if side not in SIDES and not (side.startswith("ours-fast:") and side[10:] in kernels.FAMILIES):
            p.error(f"unknown side {side!r}")
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
    """train.Trainer's update, built from its pieces."""

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
        """As train.Trainer.micro_loss: the loss, its head's gradients made in the forward."""
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

class Torch:
    """HF Gemma3ForCausalLM with sdpa attention, fp16 autocast, GradScaler, clipping, fused AdamW."""

    def __init__(self, config, device, seed):
        import torch
        import transformers
        self.torch, self.device = torch, device
        hf = transformers.Gemma3TextConfig(**config.to_hf(), pad_token_id=None, attn_implementation="sdpa")
        torch.manual_seed(seed)
        self.model = transformers.Gemma3ForCausalLM(hf).to(device).train()
        self.vocab = config.vocab_size
        cuda = device == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.1, fused=True)
        self.scaler = torch.amp.GradScaler(device, enabled=cuda)
        self.autocast = dict(device_type=device, dtype=torch.float16, enabled=cuda)
        self.compiled = None
        events = (lambda: (_TorchEvent(torch), _TorchEvent(torch))) if cuda else None
        self.timer = Timer(events)

    def loss(self, x, y):
        torch = self.torch
        with torch.autocast(**self.autocast):
            logits = self.model(input_ids=x, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, self.vocab), y.view(-1))

    def update(self, batches, loss_fn):
        torch = self.torch
        loss_sum = torch.zeros((), device=self.device)
        for x, y in batches:
            loss = loss_fn(x, y)
            self.scaler.scale(loss / len(batches)).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return float(loss_sum) / len(batches)

    def run(self, batches, compiled, warmup, steps):
        torch = self.torch
        if compiled and self.compiled is None:
            self.compiled = torch.compile(self.loss, dynamic=False)
        loss_fn = self.compiled if compiled else self.loss
        batches = [(torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)) for x, y in batches]
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # so max_memory_reserved is this run's, as ours is
            torch.cuda.reset_peak_memory_stats()
        warmup = max(warmup, 3) if compiled else warmup  # inductor finishes compiling in the first few
        start = time.perf_counter()
        median, times = measure(lambda: self.update(batches, loss_fn), self.timer, warmup, steps)
        result = dict(ms=median, times_ms=times, wall_s=time.perf_counter() - start)
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

    def record(row, side, fn):
        batch, block, accum = row
        tokens = batch * block * accum
        entry = dict(row=row_name(row), side=side, tokens_per_update=tokens,
                     flops_per_update=flops_per_token(config, block) * tokens)
        try:
            entry.update(fn())
            entry["tok_s"] = tokens / (entry["ms"] / 1e3)
            entry["mfu"] = entry["flops_per_update"] / (entry["ms"] / 1e3) / (args.peak_tflops * 1e12)
        except Exception as e:  # one failing side must not cost the others' numbers
            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        results.append(entry)
        save(results)
        shown = (f"{entry['tok_s']:,.0f} tok/s, {entry['ms']:.1f} ms/update" if "error" not in entry
                 else entry["error"])
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
    torch_jobs = [(row, side) for row, side in jobs if side.startswith("torch")]
    if torch_jobs:
        theirs = Torch(config, args.device, args.seed)
        for compiled in (False, True):
            for row, side in torch_jobs:
                if (side == "torch-compile") == compiled:
                    record(row, side, lambda: theirs.run(batches[row], compiled, args.warmup, args.steps))
    return results


def environment(args, config):
    env = dict(date=datetime.date.today().isoformat(), preset=args.preset, device=args.device,
               command="python " + " ".join(sys.argv), peak_tflops=args.peak_tflops,
               warmup=args.warmup, steps=args.steps, recompute=args.recompute,
               flops_per_token={b: flops_per_token(config, b) for b in sorted({r[1] for r in args.rows})})
    env["commit"] = args.commit
    if not env["commit"]:
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
        except OSError:
            pass
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


def table(results):
    compile_tok = {r["row"]: r["tok_s"] for r in results if r["side"] == "torch-compile" and "tok_s" in r}
    lines = ["| row (batch x block x accum) | side | tok/s | ms/update | MFU | peak GiB | reserved GiB | / compile |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "ops" in r:
            continue
        if "error" in r:
            lines.append(f"| {r['row']} | {r['side']} | error: {r['error'][:80]} | | | | | |")
            continue
        peak = f"{r['peak_bytes'] / GIB:.1f}" if r.get("peak_bytes") is not None else "-"
        reserved = r.get("reserved_bytes", r.get("peak_bytes"))
        reserved = f"{reserved / GIB:.1f}" if reserved is not None else "-"
        ratio = f"{r['tok_s'] / compile_tok[r['row']]:.2f}" if r["row"] in compile_tok else "-"
        lines.append(f"| {r['row']} | {r['side']} | {r['tok_s']:,.0f} | {r['ms']:.1f} | {100 * r['mfu']:.1f}% "
                     f"| {peak} | {reserved} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    config = Gemma3Config.preset(args.preset)
    env = environment(args, config)

    def save(results):
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(environment=env, results=results), f, indent=1)

    results = run_all(args, config, save)
    print(f"\n{env.get('gpu', args.device)}, {args.preset}, median of {args.steps} updates after "
          f"{args.warmup} warm-up, commit {env.get('commit', '?')}"
          f"{', ours with --recompute (activation recomputation)' if args.recompute else ''}")
    print(table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
