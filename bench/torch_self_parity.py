"""Controls for the fp16 parity runs: PyTorch against itself.

Two PyTorch runs from the same weights on the same batches show how far rounding alone moves a
training run. --control sdpa (default): eager against SDPA attention, both fp16 autocast (the same
maths, rounded differently in one kernel). --control float32: fp16 autocast against plain float32
(TF32 off), i.e. how far fp16 rounding as a whole moves PyTorch's own curve. If ours and PyTorch's
drift apart no more than that, the drift is the sensitivity of the training regime to rounding,
not a difference between the two implementations.

    python bench/torch_self_parity.py --preset gemma3_270m --data data/prepared/shared-sample \\
        --device cuda --dtype float16 --batch-size 16 --grad-accum 2 --updates 300 --eval-every 25 \\
        --eval-batches 10 --lr 1e-3 --min-lr 1e-4 --warmup 30 --tolerance 0.02 --final-tolerance 0.01 \\
        --out runs/torch-self

It takes parity.py's flags (and --control) and runs the same loop (bench/parity.py's Parity)
with the sides "eager" and "sdpa", or "fp16" and "fp32": the same table, parity.csv/json/png and
verdict, so its numbers read exactly like a parity run's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from bench.parity import Parity, build_parser, parse_args, report, single_torch_thread, train_argv  # noqa: E402


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--control", default="sdpa", choices=["sdpa", "float32"],
                        help="what the fp16 eager run is compared with (see above)")
    args = parse_args(argv, parser)
    if args.control == "float32" and args.dtype != "float16":
        parser.error("--control float32 compares fp16 autocast with float32: use --dtype float16")
    import torch
    from bench.parity_torch import TorchReference  # imports torch and transformers
    with single_torch_thread(args.device == "cpu"):
        trainer = train.setup(train.parse_args(train_argv(args)))  # the weights, batches and schedule
        first = TorchReference(trainer)
        if args.control == "sdpa":
            second = TorchReference(trainer)
            second.model.set_attn_implementation("sdpa")
            sides = {"eager": first, "sdpa": second}
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            sides = {"fp16": first, "fp32": TorchReference(trainer, dtype="float32")}  # no autocast, no scaler
        return report(args, Parity(args, trainer, sides))


if __name__ == "__main__":
    sys.exit(main())
