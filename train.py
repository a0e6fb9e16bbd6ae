"""Train Gemma 3 on TinyStories with tinygrad3.

    python train.py                                              # the real job: 270M preset, CUDA, fp16,
                                                                 # fused kernels + CUDA graphs
    python train.py --reference                                  # the readable reference path
    python train.py --preset tiny --device cpu --data synthetic  # learns on a CPU in minutes
    python train.py --resume                                     # continue runs/<preset> from `last`
    mpirun -n 8 python train.py --distributed                    # data-parallel over 8 GPUs (NCCL)
    python train.py --recompute                                  # re-run layers in backward: less memory

One optimizer update = --grad-accum micro-batches of --batch-size x --block-size tokens. In fp16
mode the model computes in fp16, the optimizer keeps float32 masters, and a dynamic loss scaler
guards against overflow (update order: unscale -> inf check/skip -> clip -> AdamW). The run
directory holds config.json, log.jsonl (every update and eval), loss.png, best.safetensors
(lowest validation loss; loads with load_state_dict) and last/ (everything needed to resume).

With --distributed (automatic when mpirun starts several ranks) every rank trains a replica on its
own batches and the gradients are summed over ranks by NCCL, bucket by bucket during backward; one
update then covers world_size x grad_accum micro-batches. Only rank 0 writes the run directory.

Ctrl-C, SIGTERM and SIGHUP stop the run after the current update (and its eval and save), with
`last` saved there: --resume then continues exactly. A directory that holds a run is refused
unless --resume or --overwrite; one process at a time writes it (a lock file).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

import nn
from data.errors import DataError
from data.loader import BatchLoader
from data.resolve import data_identity, resolve_data
from models import ConfigError, Gemma3, Gemma3Config
from models.flops import flops_per_token
from nn.arguments import OneLineParser
from nn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_weights, write_file_atomic
from nn.module import StateDictError
from nn.run_dir import RunError, RunLock, RunLog, SilentLog, claim
from nn.stop_signals import StopSignals
from tinygrad3 import backend, distributed, kernels, no_grad

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKENS_PER_UPDATE = 131_072  # the default update: 32 x 128 tokens x 32 accumulation steps


def add_update_arguments(a):
    """The flags of the update rule (schedule, AdamW, clipping, loss scale); bench/parity.py shares them."""
    a("--schedule", default="cosine", choices=["cosine", "constant"])
    a("--weight-decay", type=float, default=0.1)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--eps", type=float, default=1e-8)
    a("--clip", type=float, default=1.0, help="global gradient-norm clip (0 disables)")
    a("--loss-scale", type=float, default=2.0 ** 16, help="initial dynamic loss scale (fp16)")
    a("--scale-growth-interval", type=int, default=2000, help="clean updates before the scale doubles")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="gemma3_270m", choices=Gemma3Config.PRESETS, help="model size")
    a("--data", default="tinystories", help="'tinystories' (prepared into data/tinystories on first use), "
      "'synthetic' (generated stories), a prepared directory, or a raw source for data.prepare")
    a("--out", default=None, help="run directory (default runs/<preset>)")
    a("--device", default=None, help="cpu or cuda (default: cuda when a GPU is present)")
    a("--dtype", default=None, choices=["float16", "float32", "float64"], help="compute dtype (default "
      "float16 on cuda, float32 on cpu); masters and optimizer state are float32 (float64 for float64)")
    a("--block-size", type=int, default=128)
    a("--batch-size", type=int, default=32, help="micro-batch size")
    a("--grad-accum", type=int, default=None, help="micro-batches per update (default: about "
      f"{TOKENS_PER_UPDATE} tokens per update)")
    a("--max-updates", type=int, default=5000, help="optimizer updates in the whole run")
    a("--lr", type=float, default=1e-3, help="peak learning rate (1e-4 learned far slower in a side-by-side "
      "run on the GPU: bench/RESULTS.md)")
    a("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine (<= --lr)")
    a("--warmup", type=int, default=100, help="linear warmup updates")
    add_update_arguments(a)
    a("--min-loss-scale", type=float, default=1.0)
    a("--max-loss-scale", type=float, default=2.0 ** 24)
    a("--eval-every", type=int, default=100, help="updates between evaluations")
    a("--eval-batches", type=int, default=20, help="fixed batches per split in each evaluation")
    a("--seed", type=int, default=0)
    a("--peak-tflops", type=float, default=750.0, help="GPU fp16 matrix peak used for MFU")
    a("--resume", action="store_true", help="continue from <out>/last")
    a("--no-progress", action="store_true", help="no tqdm bar (logs still go to log.jsonl)")
    a("--distributed", action="store_true", help="data-parallel over the ranks mpirun starts, one GPU "
      "each, gradients summed by NCCL (by MPI on --device cpu); automatic when mpirun starts several ranks")
    a("--bucket-mb", type=float, default=25.0, help="gradient all-reduce bucket size (--distributed "
      "without CUDA graphs)")
    a("--reference", action="store_true", help="the readable reference path (plain array code, no fused "
      "kernels, no CUDA graphs); the default on CUDA with float16 is the fast path with CUDA graphs")
    a("--no-cuda-graphs", action="store_true", help="the fused kernels without CUDA graphs")
    a("--cuda-graphs", action="store_true", help="insist on CUDA graphs: an error, not a fallback, when this "
      "configuration cannot use them")
    a("--allow-kernel-change", action="store_true", help="--resume even though the kernel path (reference, "
      "fast, fast + CUDA graphs) differs from the one the run was saved with (the numerics change)")
    a("--recompute", action="store_true", help="activation recomputation: keep only each decoder layer's "
      "input and re-run the layer during backward (about one more forward per micro-batch, far less "
      "activation memory; the same gradients)")
    a("--overwrite", action="store_true", help="replace the run already in --out (its log, weights and "
      "checkpoints are deleted first); without it, a directory holding a run is refused")
    a("--max-skipped-updates", type=int, default=20, help="stop with an error after this many updates in a "
      "row with inf/NaN gradients once no recovery is possible (float32, or the loss scale at its minimum)")
    args = p.parse_args(argv)
    args.distributed = args.distributed or distributed.launched_world_size() > 1
    args.out = args.out or os.path.join("runs", args.preset)
    try:
        args.device = backend.check_device(args.device or backend.default_device())
    except (ValueError, RuntimeError) as e:
        p.error(f"--device: {e}")
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    if args.grad_accum is None:
        args.grad_accum = max(1, round(TOKENS_PER_UPDATE / (args.batch_size * args.block_size)))
    check_arguments(p, args)
    return args


def check_arguments(p, args):
    """Nonsense settings refused up front, by flag name (p.error prints one line, exits 2)."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("block_size", "batch_size", "grad_accum", "max_updates", "eval_every", "eval_batches",
                 "scale_growth_interval", "max_skipped_updates"):
        if getattr(args, name) < 1:
            p.error(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    numbers = {name: getattr(args, name) for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps",
               "clip", "loss_scale", "min_loss_scale", "max_loss_scale", "peak_tflops", "bucket_mb")}
    for name, value in numbers.items():
        if not math.isfinite(value):
            p.error(f"{flag(name)} must be a finite number, got {value}")
    for name in ("lr", "eps", "loss_scale", "min_loss_scale", "peak_tflops", "bucket_mb"):
        if not numbers[name] > 0:
            p.error(f"{flag(name)} must be > 0, got {numbers[name]:g}")
    for name in ("min_lr", "weight_decay", "clip"):
        if numbers[name] < 0:
            p.error(f"{flag(name)} must be >= 0, got {numbers[name]:g}" + (" (0 disables clipping)"
                                                                            if name == "clip" else ""))
    for name in ("beta1", "beta2"):
        if not 0 <= numbers[name] < 1:
            p.error(f"{flag(name)} must be in [0, 1), got {numbers[name]:g}")
    if args.min_lr > args.lr:
        p.error(f"--min-lr ({args.min_lr:g}) is above --lr ({args.lr:g}): the cosine would climb instead of "
                "decay; use --min-lr <= --lr")
    if args.warmup < 0 or args.warmup > args.max_updates:
        p.error(f"--warmup ({args.warmup}) must be between 0 and --max-updates ({args.max_updates})")
    if not args.min_loss_scale <= args.loss_scale <= args.max_loss_scale:
        p.error(f"need --min-loss-scale <= --loss-scale <= --max-loss-scale, got {args.min_loss_scale:g}, "
                f"{args.loss_scale:g}, {args.max_loss_scale:g}")
    context = Gemma3Config.preset(args.preset).max_position_embeddings
    if args.block_size > context:
        p.error(f"--block-size {args.block_size} is longer than the {args.preset} model's context "
                f"({context} positions): use --block-size <= {context}")
    if args.reference and (args.no_cuda_graphs or args.cuda_graphs):
        p.error("--reference runs no kernels and no CUDA graphs: drop --no-cuda-graphs / --cuda-graphs")
    if args.no_cuda_graphs and args.cuda_graphs:
        p.error("--cuda-graphs and --no-cuda-graphs exclude each other: pass one of them")
    try:
        families, graphs, args.path = kernel_path(args)
    except ValueError as e:
        p.error(str(e))
    if args.cuda_graphs and not graphs:
        p.error(f"--cuda-graphs: this configuration runs the {args.path}; graphs need --device cuda, "
                "--dtype float16 and every kernel family")
    args.kernels = {"families": list(families), "cuda_graphs": graphs}


def kernel_path(args):
    """(kernel families, CUDA graphs on, one line saying which path runs and why): the one place
    where a run's kernels are chosen. The fastest correct configuration unless a flag says otherwise;
    an unsupported combination falls back to fewer kernels with the reason, never to an error."""
    if args.device != "cuda":
        return (), False, "reference path (cpu)"
    if args.reference:
        return (), False, "reference path (--reference)"
    if args.dtype != "float16":
        return (), False, f"reference path (the fused kernels take float16, not --dtype {args.dtype})"
    chosen = kernels.environment_families()
    families = kernels.FAMILIES if chosen is None else tuple(f for f in kernels.FAMILIES if f in chosen)
    if not families:
        return (), False, "reference path (TINYGRAD3_FAST=0)"
    if args.no_cuda_graphs:
        return families, False, "fast path (no graphs: --no-cuda-graphs)"
    if families != kernels.FAMILIES:  # a family left out calls cuBLAS through CuPy, which capture refuses
        return families, False, "fast path (no graphs: TINYGRAD3_FAST selects only some kernel families)"
    return families, True, "fast path + CUDA graphs"


def describe_kernels(record):
    """A saved `kernels` field in words."""
    if not record["families"]:
        return "the reference path"
    every = sorted(record["families"]) == sorted(kernels.FAMILIES)
    return ("the fast path" + ("" if every else f" ({', '.join(record['families'])})")
            + (" + CUDA graphs" if record["cuda_graphs"] else " without CUDA graphs"))


def stream_seed(seed, rank=0, step=0):
    """The seed of rank `rank`'s training batches in a run (re)started at update `step`.

    Rank 0 of a fresh run uses --seed itself, so a single rank draws exactly the batches of a run
    without --distributed; every other (rank, step) gets its own stream, hashed from all three.
    """
    if rank == 0 and step == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def saved_loader_state(state, rank, world_size):
    """This rank's position in its batch stream from a checkpoint, or None to start a fresh one.

    A run resumed with the world size it was saved with continues every rank's stream exactly.
    After a change of world size (or from a save that could not gather every rank's position)
    there is no such position: each rank then starts stream_seed(seed, rank, step).
    """
    if state.get("world_size", 1) != world_size:
        return None
    loaders = state["loaders"] if "loaders" in state else [state["loader"]]  # older checkpoints
    return None if loaders is None else loaders[rank]


class DivergedError(RuntimeError):
    """Training cannot go on: every update is skipped and nothing can change that."""


class Trainer:
    """One training run; with `comm` (a tinygrad3.distributed communicator), one rank of it."""

    def __init__(self, args, comm=None):
        self.args, self.comm = args, comm
        self.rank, self.world_size = (comm.rank, comm.world_size) if comm is not None else (0, 1)
        self.is_main = self.rank == 0
        self.config = Gemma3Config.preset(args.preset)
        self.last_dir = os.path.join(args.out, "last")
        if self.is_main:
            claim(args.out, args.resume, args.overwrite)  # refuses another run's directory
        self.data_dir = self.main_first(lambda: resolve_data(args.data, ROOT))  # rank 0 prepares, once
        self.data_identity = data_identity(self.data_dir)  # the tokens trained on, for resume
        self.loader = self.train_loader(stream_seed(args.seed, self.rank))
        # Every rank draws the same fixed eval batches and evaluates its share of them.
        self.eval_loader = BatchLoader(self.data_dir, args.batch_size, args.block_size, device=args.device,
                                       seed=args.seed + 1, model_vocab_size=self.config.vocab_size)
        self.eval_start = self.eval_loader.state_dict()  # every eval replays these same batches

        kernels.set_fast(bool(args.kernels["families"]), args.kernels["families"] or kernels.FAMILIES)
        self.model = Gemma3(self.config, seed=args.seed, recompute=args.recompute)
        state = None
        if args.resume:
            required = {"state.json": ("step", "tokens", "best_val", "optimizer", "scaler", "config", "args"),
                        "optimizer.safetensors": ("master", "m", "v"),
                        "model.safetensors": tuple(self.model.state_dict())}
            # rank 0 first: falling back to an intact last.old renames directories
            model_state, optim_arrays, state = self.main_first(lambda: load_checkpoint(self.last_dir, required))
            self.check_same_run(state)
            self.model.load_state_dict(model_state)
        float32_weights = self.model.state_dict()
        self.model.to(device=args.device, dtype=np.dtype(args.dtype))
        self.optimizer = nn.AdamW(self.model.named_parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                  eps=args.eps, weight_decay=args.weight_decay)
        self.optimizer.set_masters(float32_weights)  # the masters keep what an fp16 cast would round off
        self.scaler = nn.LossScaler(init_scale=args.loss_scale, growth_interval=args.scale_growth_interval,
                                    min_scale=args.min_loss_scale, max_scale=args.max_loss_scale,
                                    enabled=args.dtype == "float16")
        self.schedule = nn.LRSchedule(args.lr, args.warmup, args.max_updates, min_lr=args.min_lr,
                                      kind=args.schedule)
        self.step, self.tokens, self.best_val = 0, 0, math.inf
        self.skipped_in_a_row = 0  # consecutive updates skipped for inf/NaN gradients
        self.stop_agreed = False   # set by agree_on_step: some rank was asked to stop
        self.log = RunLog(args.out) if self.is_main else SilentLog(args.out)
        if state is not None:
            self.optimizer.load_state_dict(dict(state["optimizer"], **optim_arrays))
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.tokens, self.best_val = state["step"], state["tokens"], state["best_val"]
            self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
            position = saved_loader_state(state, self.rank, self.world_size)
            if position is not None:
                self.loader.load_state_dict(position)
            else:
                self.loader = self.train_loader(stream_seed(args.seed, self.rank, self.step))
            self.log.truncate_after(self.step)
        self.signals = None  # StopSignals while run() runs
        self.graphed = None
        if args.kernels["cuda_graphs"]:
            self.graphed = nn.GraphedMicroBatch(self.micro_loss, self.optimizer)
        self.dp = None
        if comm is not None:
            if self.graphed is None:  # graphs add gradients into the optimizer's flat buffer: no .grad
                self.dp = distributed.DataParallel(self.model.parameters(), comm,
                                                   bucket_bytes=int(args.bucket_mb * 2 ** 20))
            distributed.broadcast_optimizer(comm, self.optimizer)  # every rank starts from rank 0's bits
        if self.is_main:
            config = {"args": vars(args), "world_size": self.world_size, "model": self.config.to_dict(),
                      "data": self.data_dir, "data_identity": self.data_identity, "kernels": args.kernels}
            write_file_atomic(os.path.join(args.out, "config.json"), json.dumps(config, indent=1))
        # One update: world_size ranks x grad_accum micro-batches x batch_size x block_size tokens.
        self.tokens_per_update = self.world_size * args.batch_size * args.block_size * args.grad_accum
        self.flops_per_update = flops_per_token(self.config, args.block_size) * self.tokens_per_update

    def main_first(self, fn):
        """fn() on rank 0, then on the other ranks (rank 0 may create files the others then find)."""
        result = fn() if self.is_main else None
        if self.comm is not None:
            self.comm.barrier()
        return result if self.is_main else fn()

    def train_loader(self, seed):
        return BatchLoader(self.data_dir, self.args.batch_size, self.args.block_size, device=self.args.device,
                           seed=seed, model_vocab_size=self.config.vocab_size)

    def say(self, message, **kwargs):
        if self.is_main:
            print(message, **kwargs)

    def check_same_run(self, state):
        saved = state["config"]
        if saved != self.config.to_dict():
            diff = sorted(k for k in saved if saved[k] != self.config.to_dict().get(k))
            raise CheckpointError(f"{self.last_dir} was saved from a different model config (differs in "
                                  f"{', '.join(diff)}); resume with the same --preset or start a new --out")
        for key in ("block_size", "batch_size", "grad_accum", "seed", "dtype"):
            if key in state["args"] and state["args"][key] != getattr(self.args, key):
                raise CheckpointError(f"{self.last_dir} was trained with --{key.replace('_', '-')} "
                                      f"{state['args'][key]}; resuming with {getattr(self.args, key)} would "
                                      f"not continue the same run: pass --{key.replace('_', '-')} "
                                      f"{state['args'][key]}, or start a new --out")
        saved_kernels = state.get("kernels")
        if saved_kernels is not None and saved_kernels != self.args.kernels:
            if not self.args.allow_kernel_change:
                raise CheckpointError(f"{self.last_dir} was trained on {describe_kernels(saved_kernels)}; this "
                                      f"run would use {describe_kernels(self.args.kernels)}, which changes the "
                                      "numerics: resume with the run's flags (--reference, --no-cuda-graphs), or "
                                      "pass --allow-kernel-change")
            print(f"note: the kernel path changes from {describe_kernels(saved_kernels)} to "
                  f"{describe_kernels(self.args.kernels)} (--allow-kernel-change)")
        if "data" in state and state["data"] != self.data_identity:
            raise CheckpointError(f"{self.last_dir} was trained on other data (--data {state['args']['data']}) "
                                  f"than --data {self.args.data} holds: resume with the run's --data, or start "
                                  "a new --out")

    # ----- one update ------------------------------------------------------------------------
    def micro_loss(self, x, y, loss_weight):
        """One micro-batch's loss; loss_weight is what backward will multiply it by (a number, or
        the CUDA graph's GPU scalar), so the model's head makes its gradients in the forward."""
        return self.model(x, y, return_logits=False, loss_grad=loss_weight)[1]

    def update(self):
        """Forward/backward over grad_accum micro-batches, then one optimizer step."""
        args, xp = self.args, backend.array_module(self.args.device)
        # Each micro-loss is divided by grad_accum * world_size (so the update sees the mean over
        # all ranks' micro-batches once the ranks' gradients are summed) and multiplied by the loss
        # scale (so small fp16 gradients do not flush to zero).
        loss_weight = self.scaler.scale / (args.grad_accum * self.world_size)
        loss_sum = xp.zeros((), np.float64)  # wide enough for float64 losses too
        for i in range(args.grad_accum):
            x, y = self.loader.next_batch("train")
            if self.graphed is not None:
                loss_sum += self.graphed(x, y, loss_weight)
                continue
            loss = self.micro_loss(x, y, loss_weight)
            # On the last micro-batch, each bucket's all-reduce starts once backward completes it.
            last = self.dp is not None and i == args.grad_accum - 1
            (loss * loss_weight).backward(leaf_hook=self.dp.leaf_hook if last else None)
            loss_sum += loss.data
        if self.dp is not None:
            self.dp.finish()  # every rank now holds the same summed gradients
        elif self.comm is not None:
            distributed.allreduce_grad_buffer(self.comm, self.optimizer)  # graphs: the flat buffer, one call
        lr = self.schedule(self.step)
        result = self.optimizer.step(lr=lr, inv_scale=self.scaler.inv_scale,
                                     clip_norm=args.clip if args.clip > 0 else None)
        mean_loss = float(loss_sum) / args.grad_accum
        if self.comm is not None:
            mean_loss = self.agree_on_step(mean_loss, result.found_inf, self.stop_requested())
        scale = self.scaler.scale
        self.scaler.update(result.found_inf)
        self.optimizer.zero_grad()
        self.step += 1
        self.tokens += self.tokens_per_update
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if result.found_inf else 0
        return dict(loss=mean_loss, lr=lr, scale=scale, skipped=result.found_inf,
                    grad_norm=result.grad_norm if math.isfinite(result.grad_norm) else None)

    def agree_on_step(self, loss, found_inf, stop=False):
        """The loss averaged over ranks, a check that every rank made the same skip decision, and
        whether any rank was asked to stop (`stop`: a signal arrived here), so all stop together.

        They cannot differ: after the all-reduce every rank holds the same summed gradients, and an
        inf/NaN from any one rank survives the sum, so every rank's AdamW sees it, skips, and every
        scaler halves its scale (the clip factor, from the same norm, agrees too). One small
        all-reduce, which the loss average needs anyway, verifies that instead of trusting it.
        """
        loss_sum, skipped, stops = self.comm.allreduce_scalars([loss, float(found_inf), float(stop)])
        if skipped not in (0, self.world_size):
            raise RuntimeError(f"ranks disagree on skipping update {self.step + 1}: {skipped:g} of "
                               f"{self.world_size} found inf/NaN gradients (their gradients differ)")
        self.stop_agreed = stops > 0  # every rank stops after the same update
        return loss_sum / self.world_size

    def evaluate(self):
        """Mean loss over the same fixed eval_batches batches per split, whatever the world size.

        Every rank draws all of them (the stream stays the one a single process sees) and
        evaluates batches rank, rank + world_size, ...; the ranks' sums are then added up.
        """
        self.model.eval()
        totals = []
        self.eval_loader.load_state_dict(self.eval_start)
        with no_grad():
            for split in ("train", "validation"):
                total = 0.0
                for i in range(self.args.eval_batches):
                    x, y = self.eval_loader.next_batch(split)
                    if i % self.world_size == self.rank:
                        total += self.model(x, y, return_logits=False)[1].item()
                totals.append(total)
        self.model.train()
        if self.comm is not None:
            totals = self.comm.allreduce_scalars(totals)
        return {split: total / self.args.eval_batches for split, total in zip(("train", "validation"), totals)}

    # ----- checkpoints -------------------------------------------------------------------------
    def master_weights(self):
        """The float32 master weights under the model's parameter names."""
        return {name: backend.to_numpy(self.optimizer.master_of(name)).astype(np.float32)
                for name in self.optimizer.decayed_names() + self.optimizer.undecayed_names()}

    def save_last(self, loader_state, gather=True):
        """Rank 0 writes `last`. Model, optimizer and scaler are the same on every rank; the batch
        streams are not, so their positions are gathered from all ranks (gather=False: no
        collective, for an interrupt, where other ranks may be anywhere; a resume then starts fresh
        streams, see saved_loader_state)."""
        loaders = [loader_state]
        if self.world_size > 1:
            loaders = self.comm.allgather_object(loader_state) if gather else None
        if not self.is_main:
            return
        optim = self.optimizer.state_dict()
        arrays = {k: optim.pop(k) for k in ("master", "m", "v")}
        state = dict(step=self.step, tokens=self.tokens, best_val=self.best_val, optimizer=optim,
                     skipped_in_a_row=self.skipped_in_a_row,
                     scaler=self.scaler.state_dict(), world_size=self.world_size, loaders=loaders,
                     config=self.config.to_dict(), args=vars(self.args), data=self.data_identity,
                     kernels=self.args.kernels)
        save_checkpoint(self.last_dir, self.master_weights(), arrays, state)

    # ----- the loop -----------------------------------------------------------------------------
    def stop_requested(self):
        return self.signals is not None and self.signals.requested is not None

    def run(self):
        """Train to --max-updates; 0 when done, 130 when stopped by a signal (after saving `last`)."""
        # inf/NaN are expected (fp16 overflow, a diverging run) and handled by skipping the update
        with StopSignals() as self.signals, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                return self._run()
            except KeyboardInterrupt:  # only where no handler could be installed (not the main thread)
                self.say(f"\ninterrupted inside an update: nothing saved; {self.last_dir} holds the last save")
                return 130
            finally:
                self.signals = None

    def _run(self):
        args = self.args
        self.say(f"model: {self.config.num_hidden_layers} layers, {self.model.num_parameters() / 1e6:.1f}M "
                 f"parameters | {self.tokens_per_update} tokens per update = {self.world_size} ranks x "
                 f"{args.grad_accum} micro-batches x {args.batch_size} x {args.block_size} | data {self.data_dir}")
        bar = None
        if not args.no_progress and self.is_main:
            from tqdm import tqdm
            bar = tqdm(total=args.max_updates, initial=self.step, unit="update", dynamic_ncols=True)
        try:
            while self.step < args.max_updates:
                start = time.perf_counter()
                record = self.update()
                seconds = time.perf_counter() - start
                tok_s = self.tokens_per_update / seconds
                record.update(kind="update", step=self.step, tokens=self.tokens, seconds=seconds, tok_s=tok_s)
                if args.device == "cuda":
                    record["mfu"] = self.flops_per_update / seconds / (args.peak_tflops * 1e12 * self.world_size)
                self.log.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    scale=f"{record['scale']:.0f}", tok_s=f"{tok_s:,.0f}",
                                    **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                saved = self.step % args.eval_every == 0 or self.step == args.max_updates
                if saved:
                    self.eval_and_save()
                self.check_progress()
                # A signal only sets a flag; here, between updates, the state is whole.
                if self.stop_agreed if self.comm is not None else self.stop_requested():
                    if not saved:
                        self.save_last(self.loader.state_dict())
                    self.say(f"\nstopped: saved {self.last_dir} at update {self.step}; continue with --resume")
                    return 130
        finally:
            if bar is not None:
                bar.close()
        self.say(f"done: {self.step} updates, best validation loss {self.best_val:.4f}; outputs in {args.out}")
        return 0

    def check_progress(self):
        """Stop a run that cannot recover: --max-skipped-updates updates in a row with inf/NaN
        gradients while the loss scale cannot be lowered any further (or there is none: float32)."""
        at_floor = not self.scaler.enabled or self.scaler.scale <= self.scaler.min_scale
        if self.skipped_in_a_row >= self.args.max_skipped_updates and at_floor:
            where = "at the minimum loss scale " if self.scaler.enabled else ""
            raise DivergedError(f"the run diverged: {self.skipped_in_a_row} updates in a row had inf/NaN "
                                f"gradients {where}(update {self.step}); lower --lr ({self.args.lr:g}), or "
                                f"--resume from the last save ({self.last_dir})")

    def eval_and_save(self):
        losses = self.evaluate()
        self.log.write(dict(kind="eval", step=self.step, tokens=self.tokens, **losses))
        if losses["validation"] < self.best_val:
            self.best_val = losses["validation"]  # the same on every rank: the losses are reduced
            if self.is_main:
                save_weights(self.master_weights(), os.path.join(self.args.out, "best.safetensors"))
        self.save_last(self.loader.state_dict())
        self.log.plot()
        message = (f"update {self.step}: train {losses['train']:.4f} | validation {losses['validation']:.4f} "
                   f"| best {self.best_val:.4f}")
        self.say(("\n" if not self.args.no_progress else "") + message, flush=True)


def make_communicator(args):
    """This process's rank of the data-parallel group: NCCL over mpirun's ranks, one GPU each
    (on --device cpu, MPI reduces the arrays itself)."""
    if args.device == "cuda":
        return distributed.NcclCommunicator(distributed.mpi_world())
    mpi = distributed.mpi_world()
    if mpi is None:
        raise RunError("--distributed on --device cpu needs mpi4py (pip install mpi4py) and an mpirun")
    return distributed.MpiCommunicator(mpi)


# What a user can cause and fix (bad settings, data, files, disk): one line. Anything else is a bug
# of ours and keeps its traceback.
USER_ERRORS = (DataError, CheckpointError, RunError, ConfigError, StateDictError, OSError)


def main(argv=None):
    """Exit status: 0 done, 2 bad settings or files (before training), 1 a save that failed
    (disk full, non-finite weights), 3 a diverged run, 130 stopped by a signal (resumable)."""
    args = parse_args(argv)
    comm = lock = None
    several = False
    try:
        if args.distributed:
            comm = make_communicator(args)  # before anything else touches the GPU: it picks this rank's
            several = comm.world_size > 1
        if comm is None or comm.is_main:
            lock = RunLock(args.out)  # held until this process ends
            print("train.py settings (defaults included):")
            for key, value in vars(args).items():
                if key not in ("path", "kernels"):
                    print(f"  --{key.replace('_', '-')}: {value}")
            print(f"kernels: {args.path}")
        trainer = Trainer(args, comm)
    except USER_ERRORS as e:
        return fail(comm, several, describe_error(e), 2)
    except KeyboardInterrupt:
        return fail(comm, several, "interrupted before the first update: nothing was saved", 130)
    try:
        return trainer.run()
    except DivergedError as e:
        return fail(comm, several, str(e), 3)
    except (CheckpointError, OSError) as e:
        return fail(comm, several, f"{describe_error(e)}; {trainer.last_dir} holds the last good save "
                    "(--resume continues from it)", 1)
    finally:
        if lock is not None:
            lock.release()


def describe_error(e):
    """One line for an error: OSErrors as 'cannot write FILE: reason'."""
    if isinstance(e, OSError) and e.strerror:
        return f"cannot access {e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def fail(comm, several, message, status):
    print(f"{f'rank {comm.rank}: ' if several else ''}error: {message}", file=sys.stderr)
    if several:
        comm.abort(status)  # the other ranks may be waiting for this one in a collective
    return status


if __name__ == "__main__":
    sys.exit(main())
