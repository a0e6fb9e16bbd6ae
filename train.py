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
import shutil
import sys

import numpy as np

import nn
from data.errors import DataError
from data.loader import BatchLoader
from data.resolve import data_identity, resolve_data
from data.tokenizer import load_tokenizer
from models import ConfigError, Gemma3, Gemma3Config
from models.init_from import read_init_from
from models.flops import flops_per_token
from nn.arguments import OneLineParser
from nn.checkpoint import CheckpointError, load_checkpoint, write_file_atomic
from nn.module import StateDictError
from nn.run_dir import RunError, RunLock, RunLog, SilentLog, claim
from nn.trainer import DivergedError, Trainer, micro_batch_runner, saved_loader_state, stream_seed
from tinygrad3 import backend, distributed, kernels

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKENS_PER_UPDATE = 131_072  # the default update: 32 x 128 tokens x 32 accumulation steps
# Defaults that depend on whether the model starts from scratch or from a checkpoint (--init-from):
# fine-tuning takes a smaller, shorter learning rate, so the pretrained weights are not undone.
FROM_SCRATCH = dict(lr=1e-3, min_lr=1e-4, warmup=100, max_updates=5000, eval_every=100)
FINE_TUNING = dict(lr=5e-5, min_lr=5e-6, warmup=20, max_updates=500, eval_every=50)


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
    a("--preset", default=None, choices=Gemma3Config.PRESETS, help="model size (default gemma3_270m; not "
      "with --init-from, which brings its own)")
    a("--init-from", default=None, metavar="PATH", help="fine-tune: a Hugging Face Gemma 3 checkpoint directory "
      "(config.json, *.safetensors, tokenizer.json) or a train.py run directory gives the model config, the "
      "weights and the tokenizer; the optimizer starts fresh, and the fine-tuning defaults apply: "
      + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in FINE_TUNING.items()))
    a("--model-config", default=None, metavar="FILE.json", help="model fields over the preset's (or the "
      "checkpoint's): a JSON object of Gemma 3 text-config fields (models/config.py), e.g. {\"hidden_size\": 256}")
    a("--model", nargs="+", default=[], metavar="FIELD=VALUE", help="model fields over those, one by one, e.g. "
      "--model hidden_size=256 num_hidden_layers=6 (values are JSON: 6, 1e-6, true, [\"full_attention\"])")
    a("--tokenizer", default=None, metavar="SPEC", help="the tokenizer data are prepared with: gpt2 (default) "
      "or a Hugging Face tokenizer.json or its directory; the vocabulary follows it (padded to a multiple of 128)."
      " With --init-from, the checkpoint's")
    a("--data", default="tinystories", help="'tinystories' (prepared into data/tinystories on first use), "
      "'synthetic' (generated stories), a prepared directory, or a raw source for data.prepare")
    a("--out", default=None, help="run directory (default runs/<preset>, or runs/<name>-finetune with "
      "--init-from)")
    a("--device", default=None, help="cpu or cuda (default: cuda when a GPU is present)")
    a("--dtype", default=None, choices=["float16", "float32", "float64"], help="compute dtype (default "
      "float16 on cuda, float32 on cpu); masters and optimizer state are float32 (float64 for float64)")
    a("--block-size", type=int, default=128)
    a("--batch-size", type=int, default=32, help="micro-batch size")
    a("--grad-accum", type=int, default=None, help="micro-batches per update (default: about "
      f"{TOKENS_PER_UPDATE} tokens per update)")
    a("--max-updates", type=int, default=None, help="optimizer updates in the whole run (default 5000)")
    a("--lr", type=float, default=None, help="peak learning rate (default 1e-3; 1e-4 learned far slower in a "
      "side-by-side run on the GPU: bench/RESULTS.md)")
    a("--min-lr", type=float, default=None, help="learning rate at the end of the cosine (<= --lr; default 1e-4)")
    a("--warmup", type=int, default=None, help="linear warmup updates (default 100)")
    add_update_arguments(a)
    a("--min-loss-scale", type=float, default=1.0)
    a("--max-loss-scale", type=float, default=2.0 ** 24)
    a("--eval-every", type=int, default=None, help="updates between evaluations (default 100)")
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
    if args.init_from is not None and args.preset is not None:
        p.error(f"--preset {args.preset} and --init-from: the model comes from {args.init_from}; drop --preset "
                "(change single fields with --model FIELD=VALUE)")
    for name, value in (FINE_TUNING if args.init_from else FROM_SCRATCH).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.init_from is None:
        args.preset = args.preset or "gemma3_270m"
    name = args.preset or os.path.basename(os.path.normpath(args.init_from)) + "-finetune"
    args.out = args.out or os.path.join("runs", name)
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
    try:
        config, _, _, args.tokenizer = model_config(args)
    except (ConfigError, CheckpointError, DataError) as e:
        p.error(str(e))
    args.config = config.to_dict()  # what config.json and every checkpoint record, and resume compares
    context = config.max_position_embeddings
    if args.block_size > context:
        p.error(f"--block-size {args.block_size} is longer than the {args.preset or args.init_from} model's "
                f"context ({context} positions): use --block-size <= {context}")
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


def model_config(args):
    """(Gemma3Config, Tokenizer, InitFrom or None, tokenizer spec) as the flags describe them: the
    preset's config or the checkpoint's, then --model-config's fields, then --model's; a preset's
    vocabulary follows --tokenizer. The vocabulary is padded to a multiple of 128 (the extra ids
    are masked out)."""
    source = read_init_from(args.init_from) if args.init_from else None
    config = source.config if source is not None else Gemma3Config.preset(args.preset)
    spec = args.tokenizer or "gpt2"
    if source is not None:
        if args.tokenizer is not None and source.tokenizer is not None and args.tokenizer != source.tokenizer:
            raise ConfigError(f"--tokenizer: --init-from {args.init_from} brings its own tokenizer "
                              f"({source.tokenizer}); drop --tokenizer")
        spec = args.tokenizer or source.tokenizer
        if spec is None:
            raise ConfigError(f"--init-from {args.init_from} has no tokenizer.json: pass --tokenizer SPEC, the "
                              "tokenizer the checkpoint was trained with")
    file_fields = read_json_object(args.model_config, "--model-config") if args.model_config else {}
    flag_fields = field_values(args.model)
    config = config.override(file_fields, "--model-config").override(flag_fields, "--model")
    tokenizer = load_tokenizer(spec)
    if source is None and "vocab_size" not in {**file_fields, **flag_fields} and not tokenizer.is_gpt2():
        config = config.override({"vocab_size": tokenizer.vocab_size}, "--tokenizer")
    # A tokenizer may name more ids than a checkpoint has rows (Gemma 3's image token): the loader
    # refuses data whose ids the model lacks.
    return config.with_padded_vocab(), tokenizer, source, str(spec)


def read_json_object(path, flag):
    """The JSON object in file `path`, or a one-line ConfigError naming `flag`."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: cannot read a JSON object ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} {path}: expected a JSON object of model fields, got {type(value).__name__}")
    return value


def field_values(pairs):
    """--model's FIELD=VALUE words as a dict; VALUE is read as JSON where it parses, else as text."""
    fields = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--model: expected FIELD=VALUE, got {pair!r} (e.g. --model hidden_size=256)")
        try:
            fields[name] = json.loads(text)
        except ValueError:
            fields[name] = text
    return fields


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


def check_same_run(state, args, config, data_identity, last_dir):
    """Refuse to resume `state` (a saved `last`) with settings that would not continue the same run."""
    saved = state["config"]
    if saved != config.to_dict():
        diff = sorted(k for k in saved if saved[k] != config.to_dict().get(k))
        raise CheckpointError(f"{last_dir} was saved from a different model config (differs in "
                              f"{', '.join(diff)}); resume with the run's model flags (--preset, --init-from, "
                              "--model-config, --model, --tokenizer) or start a new --out")
    for key in ("block_size", "batch_size", "grad_accum", "seed", "dtype"):
        if key in state["args"] and state["args"][key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{last_dir} was trained with {flag} {state['args'][key]}; resuming with "
                                  f"{getattr(args, key)} would not continue the same run: pass {flag} "
                                  f"{state['args'][key]}, or start a new --out")
    saved_kernels = state.get("kernels")
    if saved_kernels is not None and saved_kernels != args.kernels:
        if not args.allow_kernel_change:
            raise CheckpointError(f"{last_dir} was trained on {describe_kernels(saved_kernels)}; this run would "
                                  f"use {describe_kernels(args.kernels)}, which changes the numerics: resume "
                                  "with the run's flags (--reference, --no-cuda-graphs), or pass "
                                  "--allow-kernel-change")
        print(f"note: the kernel path changes from {describe_kernels(saved_kernels)} to "
              f"{describe_kernels(args.kernels)} (--allow-kernel-change)")
    if "data" in state and state["data"] != data_identity:
        raise CheckpointError(f"{last_dir} was trained on other data (--data {state['args']['data']}) than "
                              f"--data {args.data} holds: resume with the run's --data, or start a new --out")


def save_tokenizer(tokenizer, directory):
    """The run's copy of its tokenizer (generate.py and models.export read it), replaced whole."""
    temporary = directory + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save(temporary)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)


def main_first(comm, fn):
    """fn() on rank 0, then on the other ranks (rank 0 may create files the others then find)."""
    is_main = comm is None or comm.is_main
    result = fn() if is_main else None
    if comm is not None:
        comm.barrier()
    return result if is_main else fn()


def setup(args, comm=None):
    """Build a run's Trainer. The order matters, so each step is named: the model is made and
    loaded in float32, its float32 weights are kept before the cast to the compute dtype, and
    the optimizer's masters come from those (not from the rounded copy); saved optimizer state
    goes on top, and with ranks everyone then takes rank 0's bits."""
    rank, world_size = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    is_main = rank == 0
    last_dir = os.path.join(args.out, "last")
    config, tokenizer, source, _ = model_config(args)

    # 1. The run directory: refuse another run's outputs (unless --resume / --overwrite); it keeps the tokenizer.
    if is_main:
        claim(args.out, args.resume, args.overwrite)
        save_tokenizer(tokenizer, os.path.join(args.out, "tokenizer"))
    # 2. Data, prepared with the model's tokenizer (rank 0 prepares it once; data prepared with another
    # tokenizer is refused); the training stream of this rank and the fixed eval batches.
    data_dir = main_first(comm, lambda: resolve_data(args.data, ROOT, tokenizer=tokenizer))
    identity = data_identity(data_dir)  # the tokens trained on, for resume

    def train_loader(seed):
        return BatchLoader(data_dir, args.batch_size, args.block_size, device=args.device, seed=seed,
                           model_vocab_size=config.vocab_size)

    loader, eval_loader = train_loader(stream_seed(args.seed, rank)), train_loader(args.seed + 1)
    # 3. The float32 model, on the chosen kernel path.
    kernels.set_fast(bool(args.kernels["families"]), args.kernels["families"] or kernels.FAMILIES)
    model = Gemma3(config, seed=args.seed, recompute=args.recompute)
    # 4. Load: a resumed run's weights (rank 0 first: falling back to an intact last.old renames files),
    # or the weights to fine-tune (--init-from).
    state = optim_arrays = None
    if source is not None and not args.resume:
        model.load_state_dict(source.weights(config))
    if args.resume:
        required = {"state.json": ("step", "tokens", "best_val", "optimizer", "scaler", "config", "args"),
                    "optimizer.safetensors": ("master", "m", "v")}  # the model's names: once the config agrees
        model_state, optim_arrays, state = main_first(comm, lambda: load_checkpoint(last_dir, required))
        check_same_run(state, args, config, identity, last_dir)
        model.load_state_dict(model_state)
    # 5. Snapshot the float32 weights, 6. cast the model to the device and compute dtype.
    float32_weights = model.state_dict()
    model.to(device=args.device, dtype=np.dtype(args.dtype))
    # 7. The optimizer, 8. its float32 masters from the snapshot (they keep what an fp16 cast rounds off).
    optimizer = nn.AdamW(model.named_parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                         weight_decay=args.weight_decay)
    optimizer.set_masters(float32_weights)
    scaler = nn.LossScaler(init_scale=args.loss_scale, growth_interval=args.scale_growth_interval,
                           min_scale=args.min_loss_scale, max_scale=args.max_loss_scale,
                           enabled=args.dtype == "float16")
    log = RunLog(args.out) if is_main else SilentLog(args.out)
    # 9. Saved optimizer state: moments, loss scale, progress, this rank's place in its batch stream.
    progress = None
    if state is not None:
        optimizer.load_state_dict(dict(state["optimizer"], **optim_arrays))
        scaler.load_state_dict(state["scaler"])
        progress = {key: state.get(key, 0) for key in ("step", "tokens", "best_val", "skipped_in_a_row")}
        position = saved_loader_state(state, rank, world_size)
        if position is not None:
            loader.load_state_dict(position)
        else:
            loader = train_loader(stream_seed(args.seed, rank, state["step"]))
        log.truncate_after(state["step"])
    # 10. Broadcast: every rank starts from rank 0's masters and moments.
    if comm is not None:
        distributed.broadcast_optimizer(comm, optimizer)

    def loss_fn(x, y, loss_weight):
        # loss_weight: what backward will multiply the loss by, so the head makes its gradients in the
        # forward (docs/fast_path.md, "The head"); None in evaluation.
        return model(x, y, return_logits=False, loss_grad=loss_weight)[1]

    runner = micro_batch_runner(loss_fn, optimizer, model.parameters(), comm=comm,
                                graphs=args.kernels["cuda_graphs"], bucket_bytes=int(args.bucket_mb * 2 ** 20))
    if is_main:
        run_config = {"args": vars(args), "world_size": world_size, "model": config.to_dict(), "data": data_dir,
                      "data_identity": identity, "kernels": args.kernels, "tokenizer": tokenizer.identity()}
        write_file_atomic(os.path.join(args.out, "config.json"), json.dumps(run_config, indent=1))
    # One update: world_size ranks x grad_accum micro-batches x batch_size x block_size tokens.
    tokens_per_update = world_size * args.batch_size * args.block_size * args.grad_accum
    if is_main:
        print(f"model: {config.num_hidden_layers} layers, {model.num_parameters() / 1e6:.1f}M parameters | "
              f"{tokens_per_update} tokens per update = {world_size} ranks x {args.grad_accum} micro-batches x "
              f"{args.batch_size} x {args.block_size} | data {data_dir}")
    return Trainer(args, model=model, optimizer=optimizer, scaler=scaler, log=log, loss_fn=loss_fn, runner=runner,
                   schedule=nn.LRSchedule(args.lr, args.warmup, args.max_updates, min_lr=args.min_lr,
                                          kind=args.schedule),
                   loader=loader, eval_loader=eval_loader, comm=comm, progress=progress,
                   tokens_per_update=tokens_per_update,
                   flops_per_update=flops_per_token(config, args.block_size) * tokens_per_update,
                   record=dict(config=config.to_dict(), args=vars(args), data=identity, kernels=args.kernels))


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
                if key not in ("path", "kernels", "config"):
                    print(f"  --{key.replace('_', '-')}: {value}")
            print(f"kernels: {args.path}")
        trainer = setup(args, comm)
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
