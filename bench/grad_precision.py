"""Where does fp16 rounding enter the gradient? Ours and PyTorch's autocast against a float32 reference.

    python bench/grad_precision.py --preset gemma3_270m --data data/prepared/shared-sample --device cuda \\
        --batch-size 16 --block-size 128 --grad-accum 2 --lr 1e-3 --warmup 30 --at 0 25 100 --out runs/grad

A float32 Hugging Face model (TF32 off) is trained with torch's AdamW on the run's batches; at each
update count in --at its weights are copied into every side, and every side computes the gradient
of the same micro-batches' mean loss, times the loss scale (--loss-scale) and divided by it again:

    torch-eager, torch-sdpa   HF Gemma3ForCausalLM under torch.autocast(float16), float32 weights
    ours, ours-fast           our model in mixed precision (fp16 GEMMs), reference path and fast path
    ours-all-fp16             our model with every parameter fp16, norm weights and embedding too
                              (the recipe before they were kept float32), reference path

For each parameter group (all q_proj weights, all input norms, ...) the first table shows
||g - g_ref|| / ||g_ref|| against the float32 gradient, the second how far each side lies from
torch-eager's fp16 gradient. Two PyTorch kernels that differ only in rounding give the scale of
harmless error; a group where ours is far above both is where our fp16 path loses information
that autocast keeps.
"""
import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from bench.parity import train_argv  # noqa: E402
from models import Gemma3  # noqa: E402
from nn.optim import MASTER_DTYPE  # noqa: E402
from tinygrad3 import backend  # noqa: E402
from tinygrad3.kernels import fast  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="tiny", choices=train.Gemma3Config.PRESETS)
    a("--data", default="synthetic")
    a("--device", default="cuda", choices=["cpu", "cuda"])
    a("--batch-size", type=int, default=16)
    a("--block-size", type=int, default=128)
    a("--grad-accum", type=int, default=2, help="micro-batches in each gradient")
    a("--lr", type=float, default=1e-3)
    a("--min-lr", type=float, default=1e-4)
    a("--warmup", type=int, default=30)
    a("--updates", type=int, default=300, help="length of the schedule the reference trains along")
    train.add_update_arguments(a)
    a("--seed", type=int, default=0)
    a("--at", type=int, nargs="+", default=[0, 25, 100], help="update counts at which gradients are compared")
    a("--out", default="runs/grad-precision")
    args = p.parse_args(argv)
    args.dtype, args.eval_every, args.eval_batches = "float16", 1, 1
    return args


def group_of(name):
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj'; 'model.norm.weight' -> 'final norm'."""
    if name == "model.norm.weight":
        return "final norm"
    match = re.search(r"(embed_tokens|lm_head|[a-z_]+_proj|[a-z_]+norm)", name)
    return match.group(1) if match else name


class FixedBatches:
    """The same micro-batches, replayed: `next_batch` in the loader's contract, as NumPy arrays."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self, split):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def torch_gradient(side, batches, scale):
    """The mean loss's gradient over `batches`, through the loss scale, in float64 NumPy."""
    side.model.zero_grad(set_to_none=True)
    loader = FixedBatches(batches)
    for _ in batches:
        (side._loss(loader, "train") * (scale / len(batches))).backward()
    return {n: p.grad.double().cpu().numpy() / scale for n, p in side.model.named_parameters()}


def all_fp16_model(trainer, weights):
    """Our model with every parameter cast to fp16, keep_float32 or not."""
    model = Gemma3(trainer.model.config).to(device=trainer.args.device)
    for name, p in model.named_parameters():
        p.data = backend.to_device(weights[name].astype(np.float16), trainer.args.device)
    return model


def our_gradient(model, device, batches, scale, fast_path):
    """The mean loss's gradient, summed over the micro-batches as training sums them: in float32
    buffers (the optimizer's flat buffer in train.py), not in a float16 weight's `.grad`."""
    model.zero_grad()
    xp = backend.array_module(device)
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad_buffer = xp.zeros(p.shape, MASTER_DTYPE[np.dtype(p.dtype)])  # AdamW's buffer dtype
    try:
        with fast(fast_path):
            for x, y in batches:
                _, loss = model(xp.asarray(x), xp.asarray(y))
                (loss * (scale / len(batches))).backward()
        return {n: backend.to_numpy(p.grad_buffer).astype(np.float64) / scale for n, p in params.items()}
    finally:
        for p in params.values():
            p.grad_buffer = None


def compare(grads, reference):
    """group -> ||g - ref|| / ||ref|| over the group's parameters, plus 'all', and the non-finite count."""
    errors, norms = {}, {}
    for name, ref in reference.items():
        for group in (group_of(name), "all"):
            g = grads[name]
            errors[group] = errors.get(group, 0.0) + float(np.sum((g - ref) ** 2))
            norms[group] = norms.get(group, 0.0) + float(np.sum(ref ** 2))
    nonfinite = sum(int((~np.isfinite(g)).sum()) for g in grads.values())
    return {group: (errors[group] / norms[group]) ** 0.5 if norms[group] else 0.0 for group in norms}, nonfinite


def main(argv=None):
    args = parse_args(argv)
    import torch
    from bench.parity_torch import TorchReference

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    trainer = train.setup(train.parse_args(train_argv(args)))
    sides = {"torch-eager": TorchReference(trainer), "torch-sdpa": TorchReference(trainer)}
    sides["torch-sdpa"].model.set_attn_implementation("sdpa")
    reference = TorchReference(trainer, dtype="float32")  # the same weights and batches, float32 throughout

    results, done = [], 0
    for at in sorted(args.at):
        while done < at:
            reference.update(trainer.schedule(done))
            done += 1
        weights = {n: p.detach().float().cpu().numpy() for n, p in reference.model.named_parameters()}
        for side in sides.values():
            side.model.load_state_dict({n: torch.from_numpy(w) for n, w in weights.items()})
        trainer.optimizer.set_masters(weights)
        batches = [tuple(backend.to_numpy(a) for a in trainer.loader.next_batch("train"))
                   for _ in range(args.grad_accum)]
        ref = torch_gradient(reference, batches, 1.0)
        grads = {name: torch_gradient(side, batches, args.loss_scale) for name, side in sides.items()}
        grads["ours"] = our_gradient(trainer.model, args.device, batches, args.loss_scale, False)
        if args.device == "cuda":
            grads["ours-fast"] = our_gradient(trainer.model, args.device, batches, args.loss_scale, True)
        grads["ours-all-fp16"] = our_gradient(all_fp16_model(trainer, weights), args.device, batches,
                                              args.loss_scale, False)
        table = {name: compare(g, ref) for name, g in grads.items()}
        apart = {name: compare(g, grads["torch-eager"]) for name, g in grads.items() if name != "torch-eager"}
        results.append(dict(at=at, errors={n: e for n, (e, _) in table.items()},
                            from_torch_eager={n: e for n, (e, _) in apart.items()},
                            nonfinite={n: c for n, (_, c) in table.items()}))
        print_table(f"after {at} float32 updates: ||g - g_fp32|| / ||g_fp32|| per parameter group", table)
        print_table(f"after {at} float32 updates: ||g - g_eager|| / ||g_eager|| (apart from torch-eager's fp16)",
                    apart)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grad_precision.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=1)
    return 0


def print_table(title, table):
    names = list(table)
    groups = list(next(iter(table.values()))[0])
    print(f"\n{title}")
    width = [max(11, len(n)) + 2 for n in names]
    print(f"{'group':<26}" + "".join(f"{n:>{w}}" for n, w in zip(names, width)))
    for group in groups:
        print(f"{group:<26}" + "".join(f"{table[n][0][group]:>{w}.2e}" for n, w in zip(names, width)))
    print(f"{'non-finite entries':<26}" + "".join(f"{table[n][1]:>{w}d}" for n, w in zip(names, width)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
