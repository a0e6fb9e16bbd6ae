"""The training loop: updates, evaluations, saves, stopping; one rank of it with a communicator.

    trainer = Trainer(args, model=..., optimizer=..., scaler=..., schedule=..., loader=..., ...)
    status = trainer.run()   # 0 done, 130 stopped by a signal (after saving `last`)

The Trainer receives its pieces built (train.py's `setup` builds them in the order they depend
on each other) and knows nothing of which model or data they are: the model enters only through
`loss_fn(x, y, w)`, the data through the loaders' `next_batch(split)` and `state_dict()`.

One update = grad_accum micro-batches through the runner (nn/micro_batch.py: eager, data-parallel
or CUDA-graphed), then one AdamW step: unscale, inf check (skip), clip, update.
"""
import math
import os
import time

import numpy as np

from tinygrad3 import backend, distributed, no_grad

from .checkpoint import save_checkpoint, save_weights
from .graphed_step import GraphedMicroBatch
from .micro_batch import DataParallelMicroBatch, EagerMicroBatch
from .stop_signals import StopSignals


class DivergedError(RuntimeError):
    """Training cannot go on: every update is skipped and nothing can change that."""


def micro_batch_runner(loss_fn, optimizer, params, comm=None, graphs=False,
                       bucket_bytes=distributed.DEFAULT_BUCKET_BYTES):
    """The runner for a configuration: CUDA graphs (with or without ranks), data-parallel eager
    micro-batches (comm given; `params` in forward order, as the buckets fill), or plain eager ones."""
    if graphs:  # graphs add gradients into the optimizer's flat buffer: no .grad for DP's buckets
        return GraphedMicroBatch(loss_fn, optimizer, comm=comm)
    if comm is not None:
        return DataParallelMicroBatch(loss_fn, distributed.DataParallel(params, comm, bucket_bytes=bucket_bytes))
    return EagerMicroBatch(loss_fn, optimizer)


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


class Trainer:
    """One training run; with `comm` (a tinygrad3.distributed communicator), one rank of it.

    args: train.py's settings (grad_accum, clip, eval_every, eval_batches, max_updates, out, ...).
    loss_fn(x, y, w): a micro-batch's loss Tensor (w: the loss weight backward will use, or None
        in evaluation). runner: its micro-batch runner. progress: where a resumed run stands
        (step, tokens, best_val, skipped_in_a_row), None for a fresh run. record: what every save
        records besides the progress (model config, settings, data and kernel identity).
    """

    def __init__(self, args, *, model, optimizer, scaler, schedule, loader, eval_loader, loss_fn, runner, log,
                 tokens_per_update, flops_per_update, record, progress=None, comm=None):
        self.args, self.comm = args, comm
        self.rank, self.world_size = (comm.rank, comm.world_size) if comm is not None else (0, 1)
        self.is_main = self.rank == 0
        self.model, self.optimizer, self.scaler, self.schedule = model, optimizer, scaler, schedule
        self.loader, self.eval_loader = loader, eval_loader
        self.eval_start = eval_loader.state_dict()  # every eval replays these same batches
        self.loss_fn, self.runner, self.log, self.record = loss_fn, runner, log, record
        self.tokens_per_update, self.flops_per_update = tokens_per_update, flops_per_update
        self.last_dir = os.path.join(args.out, "last")
        progress = progress or {}
        self.step, self.tokens = progress.get("step", 0), progress.get("tokens", 0)
        self.best_val = progress.get("best_val", math.inf)
        self.skipped_in_a_row = progress.get("skipped_in_a_row", 0)  # updates skipped for inf/NaN gradients
        self.stop_agreed = False  # set by agree_on_step: some rank was asked to stop
        self.signals = None       # StopSignals while run() runs

    # ----- one update ------------------------------------------------------------------------
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
            loss_sum += self.runner(x, y, loss_weight, last=i == args.grad_accum - 1)
        self.runner.finish()  # with ranks: every rank now holds the same summed gradients
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
                        total += self.loss_fn(x, y, None).item()
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
                     skipped_in_a_row=self.skipped_in_a_row, scaler=self.scaler.state_dict(),
                     world_size=self.world_size, loaders=loaders, **self.record)
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

    def say(self, message, **kwargs):
        if self.is_main:
            print(message, **kwargs)
