"""Tokens/s of `data.prepare` on a generated text file (a benchmark, not a test).

    python bench/prepare_throughput.py --mb 50 --num-proc 1 2

Writes ~`--mb` MB of synthetic stories, then times a full `prepare` run (reading the text
into Arrow, tokenizing with `--num-proc` processes, writing the .bin files) for each process
count. A single-process `encode_ordinary_batch` over the same stories gives the raw
tokenizer speed for reference.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.prepare import prepare  # noqa: E402
from data.synthetic import generate_stories, write_text  # noqa: E402
from data.tokenizer import gpt2  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the generated text file")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[2])
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    sample = generate_stories(1000, seed=1)
    bytes_per_story = sum(len(s.encode()) + len("\n<|endoftext|>\n") for s in sample) / len(sample)
    n_stories = int(args.mb * 1e6 / bytes_per_story)
    start = time.perf_counter()
    source = write_text(work / "stories.txt", n_stories, seed=0)
    size = os.path.getsize(source)
    print(f"generated {n_stories:,} stories, {size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")

    stories = generate_stories(20000, seed=0)
    start = time.perf_counter()
    tokens = sum(map(len, gpt2().encode_ordinary_batch(stories, num_threads=1)))
    raw = tokens / (time.perf_counter() - start)
    print(f"raw tiktoken encode_ordinary_batch, 1 thread: {raw:,.0f} tokens/s")

    for procs in args.num_proc:
        out = work / f"out-{procs}"
        start = time.perf_counter()
        meta = prepare(source, out, num_proc=procs, force=True, quiet=True, val_fraction=0.01)
        seconds = time.perf_counter() - start
        total = sum(split["tokens"] for split in meta["splits"].values())
        print(f"prepare --num-proc {procs}: {total:,} tokens in {seconds:.1f} s = "
              f"{total / seconds:,.0f} tokens/s ({size / 1e6 / seconds:.1f} MB/s)")
        shutil.rmtree(out)
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
