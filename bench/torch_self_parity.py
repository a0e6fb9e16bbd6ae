"""Control for the fp16 parity runs: PyTorch against itself, eager against SDPA attention.

Two PyTorch runs from the same weights on the same batches that differ only in the attention
kernel (the same maths, rounded differently) show how far rounding alone moves a training run at
a given learning rate. If they drift apart as much as ours and PyTorch's do, that drift is the
sensitivity of the training regime, not a difference between the two implementations.

    python bench/torch_self_parity.py --preset gemma3_270m --data data/prepared/shared-sample \
        --device cuda --dtype float16 --batch-size 16 --grad-accum 2 --updates 60 --lr 1e-3 \
        --min-lr 1e-4 --warmup 30 --out runs/torch-self

It takes parity.py's flags (the schedule's length is --updates) and prints, every 5 updates,
both runs' train losses, gradient norms and their relative difference.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from bench.parity import parse_args, relative, train_argv  # noqa: E402


def main(argv=None):
    args = parse_args(argv)
    from bench.parity_torch import TorchReference  # imports torch and transformers
    trainer = train.Trainer(train.parse_args(train_argv(args)))  # the weights, batches and schedule
    eager, sdpa = TorchReference(trainer), TorchReference(trainer)
    sdpa.model.set_attn_implementation("sdpa")
    worst = 0.0
    print(" step | loss eager    loss sdpa     rel       | grad norm eager  sdpa")
    for step in range(args.updates):
        lr = trainer.schedule(step)
        a, b = eager.update(lr), sdpa.update(lr)
        rel = relative(b["loss"], a["loss"])
        worst = max(worst, rel)
        if (step + 1) % 5 == 0 or step == 0:
            print(f"{step + 1:5d} | {a['loss']:.6f}  {b['loss']:.6f}  {rel:.2e} | "
                  f"{a['grad_norm'] or float('nan'):.4f}  {b['grad_norm'] or float('nan'):.4f}", flush=True)
    print(f"largest relative difference of the train losses, eager vs sdpa: {worst:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
