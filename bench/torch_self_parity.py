"""Control for the fp16 parity runs: PyTorch against itself, eager against SDPA attention.

Two PyTorch runs from the same weights on the same batches that differ only in the attention
kernel (the same maths, rounded differently) show how far rounding alone moves a training run.
If they drift apart as much as ours and PyTorch's do, that drift is the sensitivity of the
training regime, not a difference between the two implementations.

    python bench/torch_self_parity.py --preset gemma3_270m --data data/prepared/shared-sample \\
        --device cuda --dtype float16 --batch-size 16 --grad-accum 2 --updates 300 --eval-every 25 \\
        --eval-batches 10 --lr 1e-3 --min-lr 1e-4 --warmup 30 --tolerance 0.02 --final-tolerance 0.01 \\
        --out runs/torch-self

It takes parity.py's flags and runs the same loop (bench/parity.py's Parity) with the sides
"eager" and "sdpa": the same table, parity.csv/json/png and verdict, so its numbers read
exactly like a parity run's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from bench.parity import Parity, parse_args, report, single_torch_thread, train_argv  # noqa: E402


def main(argv=None):
    args = parse_args(argv)
    from bench.parity_torch import TorchReference  # imports torch and transformers
    with single_torch_thread(args.device == "cpu"):
        trainer = train.Trainer(train.parse_args(train_argv(args)))  # the weights, batches and schedule
        eager, sdpa = TorchReference(trainer), TorchReference(trainer)
        sdpa.model.set_attn_implementation("sdpa")
        return report(args, Parity(args, trainer, {"eager": eager, "sdpa": sdpa}))


if __name__ == "__main__":
    sys.exit(main())
