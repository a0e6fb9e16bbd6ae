"""Loss-curve parity: our train.py Trainer against Hugging Face's Gemma3ForCausalLM in PyTorch.

    python bench/parity.py --preset tiny --data synthetic --device cpu --dtype float64 \\
        --updates 30 --eval-every 10 --tolerance 1e-6 --out runs/parity-tiny

Both sides start from the same weights (ours, copied into torch by name) and train on the same
batches with the same AdamW settings, schedule, clipping and accumulation (see parity_torch.py).
'cpu' runs float64 or float32 on both sides; 'cuda' runs fp16 mixed precision (ours: fp16
compute, float32 masters, our loss scaler; torch: autocast fp16 + GradScaler). --dtype float16
on 'cpu' runs that same recipe on the CPU (torch autocasts there too), to test it without a GPU.

Every eval prints a row: ours and torch's train/validation loss on the fixed eval batches and
their relative difference |ours - torch| / |torch|. Every eval (re)writes parity.csv (the evals),
parity.json (every update and eval, and the summary) and parity.png (both curves) into --out.
Exit status 1 when an eval loss (train or validation, on the fixed eval batches) differs by more
than --tolerance, the final validation loss by more than --final-tolerance, or, with
--update-tolerance, one update's training loss (a single batch) by more than that; 2 on a setup error.
"""
import argparse
import contextlib
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from bench.parity_report import print_header, print_row, write_outputs  # noqa: E402
from data.errors import DataError  # noqa: E402
from nn.checkpoint import CheckpointError  # noqa: E402

# parity.py flags handed on to train.py unchanged (parity's own: --updates, --tolerance, ...).
TRAIN_FLAGS = ("preset", "data", "device", "dtype", "block_size", "batch_size", "grad_accum", "lr", "min_lr",
               "warmup", "schedule", "weight_decay", "beta1", "beta2", "eps", "clip", "loss_scale",
               "scale_growth_interval", "eval_batches", "seed")


def build_parser(description=__doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="tiny", choices=train.Gemma3Config.PRESETS)
    a("--data", default="synthetic", help="as train.py's --data: 'synthetic', a prepared directory, ...")
    a("--device", default="cpu", choices=["cpu", "cuda"])
    a("--dtype", default=None, choices=["float16", "float32", "float64"],
      help="float64 (default on cpu) or float32; float16 = mixed precision (default and only choice on cuda)")
    a("--updates", type=int, default=30, help="optimizer updates on each side")
    a("--eval-every", type=int, default=10, help="updates between evals (also at 0 and at the end)")
    a("--eval-batches", type=int, default=4, help="fixed batches per split in each eval")
    a("--batch-size", type=int, default=4)
    a("--block-size", type=int, default=32)
    a("--grad-accum", type=int, default=2)
    a("--lr", type=float, default=1e-3)
    a("--min-lr", type=float, default=1e-4)
    a("--warmup", type=int, default=5)
    train.add_update_arguments(a)
    a("--seed", type=int, default=0)
    a("--tolerance", type=float, default=1e-6, help="largest relative difference allowed in any eval loss")
    a("--update-tolerance", type=float, default=None, help="also bound every update's training loss (one "
      "batch, not averaged: in fp16 runs it is far noisier than the eval curves); default: reported only")
    a("--final-tolerance", type=float, default=None, help="largest relative difference of the final "
      "validation loss (default: --tolerance)")
    a("--out", default=None, help="output directory (default runs/parity-<preset>-<dtype>)")
    a("--reference", action="store_true", help="our side on the reference path (train.py --reference; "
      "the default on cuda is train.py's: the fast path with CUDA graphs)")
    a("--no-cuda-graphs", action="store_true", help="our side with the kernels but no CUDA graphs")
    return p


def parse_args(argv=None, parser=None):
    p = parser or build_parser()
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float64")
    if args.device == "cuda" and args.dtype != "float16":
        p.error("on cuda the comparison is fp16 mixed precision: use --dtype float16")
    if args.final_tolerance is None:
        args.final_tolerance = args.tolerance
    args.out = args.out or os.path.join("runs", f"parity-{args.preset}-{args.dtype}")
    return args


def train_argv(args):
    """train.py's command line for our side of the run."""
    argv = ["--out", os.path.join(args.out, "ours"), "--max-updates", str(args.updates),
            "--eval-every", str(args.eval_every), "--no-progress"]
    for name in TRAIN_FLAGS:
        argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    flags = [f"--{name.replace('_', '-')}" for name in ("reference", "no_cuda_graphs")
             if getattr(args, name, False)]
    return argv + ["--overwrite"] + flags  # a new parity run replaces its own earlier one


def relative(ours, theirs):
    """|ours - theirs| / |theirs|; inf when either is not a finite number."""
    if ours is None or theirs is None or not (math.isfinite(ours) and math.isfinite(theirs)):
        return math.inf
    return abs(ours - theirs) / abs(theirs) if theirs else abs(ours)


class OurSide:
    """Our Trainer behind the contract both sides share: update(lr) and evaluate()."""

    def __init__(self, trainer):
        self.trainer, self.loader = trainer, trainer.loader

    def update(self, lr):
        result = self.trainer.update()
        if result["lr"] != lr:
            raise RuntimeError(f"update {self.trainer.step}: our trainer used lr {result['lr']}, expected {lr}")
        return result

    def evaluate(self):
        return self.trainer.evaluate()


class Parity:
    """Two runs side by side: one update each, in turn, and evals of both at the same steps.

    `sides` maps two names (the first is compared against the second) to objects with
    update(lr) -> {loss, grad_norm, scale, skipped} and evaluate() -> {train, validation};
    the trainer gives the schedule and the batch shape. The default is ours against PyTorch.
    """

    def __init__(self, args, trainer=None, sides=None):
        self.args = args
        self.trainer = trainer or train.setup(train.parse_args(train_argv(args)))
        if sides is None:
            from bench.parity_torch import TorchReference  # imports torch and transformers
            sides = {"ours": OurSide(self.trainer), "torch": TorchReference(self.trainer)}
        self.sides = sides
        self.names = tuple(sides)
        self.step, self.tokens = 0, 0
        self.updates, self.evals = [], []
        self.seconds = dict.fromkeys(self.names, 0.0)

    def timed(self, name, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        self.seconds[name] += time.perf_counter() - start
        return result

    def update(self):
        lr = self.trainer.schedule(self.step)
        results = {name: self.timed(name, side.update, lr) for name, side in self.sides.items()}
        self.step += 1
        self.tokens += self.trainer.tokens_per_update
        first, second = (self.sides[n].loader.state_dict()["rng"] for n in self.names)
        if first != second:
            raise RuntimeError(f"update {self.step}: the two sides' batch streams are out of step")
        a, b = self.names
        record = dict(step=self.step, tokens=self.tokens, lr=lr, rel=relative(results[a]["loss"], results[b]["loss"]))
        for key in ("loss", "grad_norm", "scale", "skipped"):
            for name in self.names:
                record[f"{name}_{key}"] = results[name][key]
        self.updates.append(record)

    def evaluate(self):
        losses = {name: side.evaluate() for name, side in self.sides.items()}
        a, b = self.names
        row = dict(step=self.step, tokens=self.tokens)
        for split, short in (("train", "train"), ("validation", "val")):
            for name in self.names:
                row[f"{name}_{short}"] = losses[name][split]
            row[f"rel_{short}"] = relative(losses[a][split], losses[b][split])
        since = [u["rel"] for u in self.updates if u["step"] > (self.evals[-1]["step"] if self.evals else 0)]
        row["max_rel_updates"] = max(since, default=0.0)
        self.evals.append(row)
        print_row(row, self.names)
        write_outputs(self.args, self.updates, self.evals, self.summary(), self.names)  # kept if cut short

    def run(self):
        args = self.args
        print_header(args, self.names)
        self.evaluate()
        while self.step < args.updates:
            self.update()
            if self.step % args.eval_every == 0 or self.step == args.updates:
                self.evaluate()
        return self.summary()

    def summary(self):
        args = self.args
        return dict(
            sides=list(self.names),
            max_rel_update_loss=max((u["rel"] for u in self.updates), default=0.0),
            max_rel_eval=max(max(e["rel_train"], e["rel_val"]) for e in self.evals),
            final_rel_val=self.evals[-1]["rel_val"],
            final_val={name: self.evals[-1][f"{name}_val"] for name in self.names},
            skipped={name: sum(bool(u[f"{name}_skipped"]) for u in self.updates) for name in self.names},
            update_tokens_per_second={name: self.tokens / s for name, s in self.seconds.items() if s > 0},
            tolerance=args.tolerance, final_tolerance=args.final_tolerance,
            update_tolerance=args.update_tolerance)


def verdict(summary):
    """(passed, message) for a run's summary."""
    failures = []
    if not summary["max_rel_eval"] <= summary["tolerance"]:
        failures.append(f"an eval differs by {summary['max_rel_eval']:.3e} > tolerance {summary['tolerance']:.3e}")
    if not summary["final_rel_val"] <= summary["final_tolerance"]:
        failures.append(f"final validation loss differs by {summary['final_rel_val']:.3e} > final tolerance "
                        f"{summary['final_tolerance']:.3e}")
    bound = summary["update_tolerance"]
    if bound is not None and not summary["max_rel_update_loss"] <= bound:
        failures.append(f"an update's training loss differs by {summary['max_rel_update_loss']:.3e} > update "
                        f"tolerance {bound:.3e}")
    if failures:
        return False, "PARITY FAILED: " + "; ".join(failures)
    return True, (f"PARITY OK: evals within {summary['max_rel_eval']:.3e}, final validation "
                  f"{summary['final_rel_val']:.3e}, single-batch updates within {summary['max_rel_update_loss']:.3e}"
                  + ("" if bound is not None else " (not checked)"))


def report(args, parity):
    """Run `parity`, print and write the verdict; the process's exit status."""
    summary = parity.run()
    passed, message = verdict(summary)
    summary.update(passed=passed, message=message)
    paths = write_outputs(args, parity.updates, parity.evals, summary, parity.names)
    speed, skipped = summary["update_tokens_per_second"], summary["skipped"]
    print("skipped updates: " + ", ".join(f"{n} {skipped[n]}" for n in parity.names) + " | training tokens/s: "
          + ", ".join(f"{n} {speed.get(n, 0):,.0f}" for n in parity.names))
    print(message)
    print("wrote " + ", ".join(paths))
    return 0 if passed else 1


def main(argv=None):
    args = parse_args(argv)
    with single_torch_thread(args.device == "cpu"):
        try:
            parity = Parity(args)
        except (DataError, CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return report(args, parity)


@contextlib.contextmanager
def single_torch_thread(enabled):
    """torch on one CPU thread while enabled. NumPy's BLAS and torch take turns here, and each
    one's idle threads spin on the cores the other needs: on 2 cores that doubles the run time."""
    import torch

    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
