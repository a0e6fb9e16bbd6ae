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
Exit status 1 when an update's train loss or an eval loss differs by more than --tolerance, or
the final validation loss by more than --final-tolerance; 2 on a setup error.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    a("--tolerance", type=float, default=1e-6, help="largest relative difference allowed in any update's "
      "train loss and any eval loss")
    a("--final-tolerance", type=float, default=None, help="largest relative difference of the final "
      "validation loss (default: --tolerance)")
    a("--out", default=None, help="output directory (default runs/parity-<preset>-<dtype>)")
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
    return argv


def relative(ours, theirs):
    """|ours - theirs| / |theirs|; inf when either is not a finite number."""
    if ours is None or theirs is None or not (math.isfinite(ours) and math.isfinite(theirs)):
        return math.inf
    return abs(ours - theirs) / abs(theirs) if theirs else abs(ours)


class Parity:
    """Both runs side by side: one update each, in turn, and evals of both at the same steps."""

    def __init__(self, args):
        from bench.parity_torch import TorchReference  # imports torch and transformers

        self.args = args
        self.ours = train.Trainer(train.parse_args(train_argv(args)))
        self.torch = TorchReference(self.ours)
        self.updates, self.evals = [], []
        self.seconds = {"ours": 0.0, "torch": 0.0}

    def timed(self, side, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        self.seconds[side] += time.perf_counter() - start
        return result

    def update(self):
        step = self.ours.step
        lr = self.ours.schedule(step)
        ours = self.timed("ours", self.ours.update)
        theirs = self.timed("torch", self.torch.update, lr)
        if ours["lr"] != lr:
            raise RuntimeError(f"update {step + 1}: our trainer used lr {ours['lr']}, expected {lr}")
        if self.ours.loader.state_dict()["rng"] != self.torch.loader.state_dict()["rng"]:
            raise RuntimeError(f"update {step + 1}: the two sides' batch streams are out of step")
        record = dict(step=self.ours.step, tokens=self.ours.tokens, lr=lr, rel=relative(ours["loss"], theirs["loss"]))
        for key in ("loss", "grad_norm", "scale", "skipped"):
            record[f"ours_{key}"], record[f"torch_{key}"] = ours[key], theirs[key]
        self.updates.append(record)

    def evaluate(self):
        ours, theirs = self.ours.evaluate(), self.torch.evaluate()
        row = dict(step=self.ours.step, tokens=self.ours.tokens)
        for split, short in (("train", "train"), ("validation", "val")):
            row[f"ours_{short}"], row[f"torch_{short}"] = ours[split], theirs[split]
            row[f"rel_{short}"] = relative(ours[split], theirs[split])
        since = [u["rel"] for u in self.updates if u["step"] > (self.evals[-1]["step"] if self.evals else 0)]
        row["max_rel_updates"] = max(since, default=0.0)
        self.evals.append(row)
        print_row(row)
        write_outputs(self.args, self.updates, self.evals, self.summary())  # kept if the run is cut short

    def run(self):
        args = self.args
        print_header(args)
        self.evaluate()
        while self.ours.step < args.updates:
            self.update()
            if self.ours.step % args.eval_every == 0 or self.ours.step == args.updates:
                self.evaluate()
        return self.summary()

    def summary(self):
        args = self.args
        tokens = self.ours.tokens
        return dict(
            max_rel_update_loss=max((u["rel"] for u in self.updates), default=0.0),
            max_rel_eval=max(max(e["rel_train"], e["rel_val"]) for e in self.evals),
            final_rel_val=self.evals[-1]["rel_val"],
            skipped={side: sum(bool(u[f"{side}_skipped"]) for u in self.updates) for side in ("ours", "torch")},
            update_tokens_per_second={side: tokens / s for side, s in self.seconds.items() if s > 0},
            tolerance=args.tolerance, final_tolerance=args.final_tolerance)


def verdict(summary):
    """(passed, message) for a run's summary."""
    worst = max(summary["max_rel_update_loss"], summary["max_rel_eval"])
    failures = []
    if not worst <= summary["tolerance"]:
        failures.append(f"largest relative difference {worst:.3e} > tolerance {summary['tolerance']:.3e}")
    if not summary["final_rel_val"] <= summary["final_tolerance"]:
        failures.append(f"final validation loss differs by {summary['final_rel_val']:.3e} > final tolerance "
                        f"{summary['final_tolerance']:.3e}")
    if failures:
        return False, "PARITY FAILED: " + "; ".join(failures)
    return True, (f"PARITY OK: largest relative difference {worst:.3e} (updates {summary['max_rel_update_loss']:.3e},"
                  f" evals {summary['max_rel_eval']:.3e}), final validation {summary['final_rel_val']:.3e}")


def main(argv=None):
    args = parse_args(argv)
    with single_torch_thread(args.device == "cpu"):
        try:
            parity = Parity(args)
        except (DataError, CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        summary = parity.run()
    passed, message = verdict(summary)
    summary.update(passed=passed, message=message)
    paths = write_outputs(args, parity.updates, parity.evals, summary)
    speed = summary["update_tokens_per_second"]
    print(f"skipped updates: ours {summary['skipped']['ours']}, torch {summary['skipped']['torch']} | training "
          f"tokens/s: ours {speed.get('ours', 0):,.0f}, torch {speed.get('torch', 0):,.0f}")
    print(message)
    print("wrote " + ", ".join(paths))
    return 0 if passed else 1


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
