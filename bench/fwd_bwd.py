"""One forward+backward of a Gemma 3 preset on the GPU in fp16: wall time, peak memory, finiteness.

    python bench/fwd_bwd.py --preset gemma3_270m --batch 8 --block 512
    python bench/fwd_bwd.py --recompute      # each decoder layer re-run in backward (less memory)
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import Gemma3, Gemma3Config  # noqa: E402
from tinygrad3 import backend  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="gemma3_270m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recompute", action="store_true", help="activation recomputation of every decoder layer")
    args = p.parse_args()
    cp = backend.array_module("cuda")
    config = Gemma3Config.preset(args.preset)
    model = Gemma3(config, recompute=args.recompute).to(device="cuda", dtype=np.float16)
    rng = np.random.default_rng(0)
    pool = cp.get_default_memory_pool()
    times, peak = [], 0
    for i in range(args.repeats + 1):
        ids = cp.asarray(rng.integers(0, config.unpadded_vocab_size or config.vocab_size, (args.batch, args.block + 1)))
        cp.cuda.Device().synchronize()
        start = time.perf_counter()
        _, loss = model(ids[:, :-1], ids[:, 1:])
        (loss * 1024.0).backward()
        grads_finite = all(bool(cp.isfinite(p.grad).all()) for p in model.parameters())
        cp.cuda.Device().synchronize()
        if i:  # the first pass compiles kernels and fills the memory pool
            times.append(time.perf_counter() - start)
        peak = max(peak, pool.total_bytes())
        print(f"pass {i}: loss {loss.item():.4f}, finite grads {grads_finite}, "
              f"{time.perf_counter() - start:.3f} s", flush=True)
        assert np.isfinite(loss.item()) and grads_finite
        model.zero_grad()
    tokens = args.batch * args.block
    print(f"{args.preset} fp16 fwd+bwd {args.batch}x{args.block}: median {np.median(times) * 1e3:.1f} ms "
          f"({tokens / np.median(times):,.0f} tokens/s), pool peak {peak / 2**30:.2f} GiB, "
          f"{model.num_parameters() / 1e6:.1f}M parameters{', recompute' if args.recompute else ''}")


if __name__ == "__main__":
    main()
