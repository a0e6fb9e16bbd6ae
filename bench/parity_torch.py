"""The PyTorch side of the parity check: Hugging Face's Gemma3ForCausalLM trained by torch.

It is built from our Trainer: the same Gemma3Config (eager attention, no padding row), our
initial master weights copied in under their shared Hugging Face names, the same batches (its
own loaders, started from the Trainer's loader states), the same AdamW decay groups, learning
rate, clipping and gradient accumulation. fp16 uses torch's own recipe: float32 weights,
torch.autocast(float16) and a GradScaler, clipping after `unscale_`.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from data.loader import BatchLoader
from tinygrad3 import backend


class TorchReference:
    """`update(lr)` and `evaluate()` with the same contract as nn.trainer.Trainer's."""

    def __init__(self, trainer, dtype=None):
        """dtype: the trainer's --dtype unless given ("float16" means autocast + GradScaler)."""
        args, config = trainer.args, trainer.model.config
        self.args, self.config = args, config
        self.device = torch.device(args.device)
        dtype = dtype or args.dtype
        self.amp = dtype == "float16"
        self.dtype = torch.float32 if self.amp else getattr(torch, dtype)
        hf_config = transformers.Gemma3TextConfig(**config.to_hf(), pad_token_id=None,
                                                  attn_implementation="eager")
        with torch.device(self.device):
            self.model = transformers.Gemma3ForCausalLM(hf_config).to(self.dtype)
        self._load_masters(trainer.optimizer)

        params = dict(self.model.named_parameters())
        groups = [([params[n] for n in trainer.optimizer.decayed_names()], args.weight_decay),
                  ([params[n] for n in trainer.optimizer.undecayed_names()], 0.0)]
        # The plain per-tensor implementation: the textbook update, the same on CPU and GPU.
        self.optimizer = torch.optim.AdamW([{"params": p, "weight_decay": wd} for p, wd in groups if p],
                                           lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                                           foreach=False)
        self.params = list(params.values())
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=args.loss_scale, growth_factor=2.0,
                                           backoff_factor=0.5, growth_interval=args.scale_growth_interval,
                                           enabled=self.amp)

        with open(os.path.join(args.out, "config.json")) as f:
            data_dir = json.load(f)["data"]  # the prepared directory the run trains on

        def loader(state):
            batches = BatchLoader(data_dir, args.batch_size, args.block_size, device="cpu",
                                  seed=args.seed, model_vocab_size=config.vocab_size)
            batches.load_state_dict(state)
            return batches

        self.loader = loader(trainer.loader.state_dict())
        self.eval_start = trainer.eval_start
        self.eval_loader = loader(self.eval_start)
        self._masks = {}

    def _load_masters(self, optimizer):
        """Our initial masters (float32 values, widened for float64) into the HF parameters."""
        names = optimizer.decayed_names() + optimizer.undecayed_names()
        state = {n: torch.from_numpy(np.array(backend.to_numpy(optimizer.master_of(n)))) for n in names}
        if self.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.model.load_state_dict(state, strict=True)
        trainable = {n for n, _ in self.model.named_parameters()}
        if trainable != set(names):
            raise RuntimeError(f"parameter names differ: ours only {sorted(set(names) - trainable)}, "
                               f"torch only {sorted(trainable - set(names))}")

    def _vocab_mask(self, dtype):
        """The same padding mask as Gemma3.vocab_mask: dtype's most negative value for ids >= unpadded."""
        real, size = self.config.unpadded_vocab_size, self.config.vocab_size
        if real is None or real == size:
            return None
        if dtype not in self._masks:
            mask = torch.zeros(size, dtype=dtype, device=self.device)
            mask[real:] = torch.finfo(dtype).min
            self._masks[dtype] = mask
        return self._masks[dtype]

    def _loss(self, loader, split):
        """Mean cross-entropy of the next batch; y is already shifted (y[:, t] follows x[:, t])."""
        x, y = (torch.from_numpy(a).to(self.device) for a in loader.next_batch(split))
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.model(input_ids=x, use_cache=False).logits
        mask = self._vocab_mask(logits.dtype)
        if mask is not None:
            logits = logits + mask
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as our loss: >= float32
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def update(self, lr):
        """One optimizer update over grad_accum micro-batches at learning rate `lr`."""
        args = self.args
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            loss = self._loss(self.loader, "train")
            self.scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale = self.scaler.get_scale() if self.amp else 1.0
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, args.clip if args.clip > 0 else math.inf))
        if self.amp:
            self.scaler.step(self.optimizer)  # skips the step when unscale_ found inf/NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            skipped = not math.isfinite(grad_norm)  # ours skips such a step too
            if not skipped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return dict(loss=float(loss_sum) / args.grad_accum, lr=lr, scale=scale, skipped=skipped,
                    grad_norm=grad_norm if math.isfinite(grad_norm) else None)

    def evaluate(self):
        """Mean loss over the same fixed batches per split as Trainer.evaluate."""
        self.model.eval()
        self.eval_loader.load_state_dict(self.eval_start)
        losses = {}
        with torch.no_grad():
            for split in ("train", "validation"):
                losses[split] = sum(self._loss(self.eval_loader, split).item()
                                    for _ in range(self.args.eval_batches)) / self.args.eval_batches
        self.model.train()
        return losses
