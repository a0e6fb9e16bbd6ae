"""Does `python train.py` with no flags run as fast as the best flag combination? One GPU, one call.

    python bench/default_speed.py --data ../shared/data --max-updates 40 --warmup 5 --json default_speed.json
    python bench/default_speed.py --data synthetic --max-updates 4 --combos default,--no-cuda-graphs \
        --train-args "--preset tiny --device cpu --batch-size 2 --block-size 16 --grad-accum 1"   # CPU smoke

Runs train.py as a user would (a fresh process each, no TINYGRAD3_FAST in the environment unless the
combination sets it), each into its own run directory, and reads the tokens/s every update logged in
log.jsonl. Reported per combination: the median over the updates after the first two (the first
compiles the kernels, the second captures the CUDA graphs) and the mean over all of them. The
default passes when its median is at least --bound (95%) of the best combination's. The reference
path is far slower, so it runs --reference-updates updates only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMBOS = {  # name -> (flags, environment)
    "default": ((), {}),
    "--no-cuda-graphs": (("--no-cuda-graphs",), {}),
    "TINYGRAD3_FAST=1 --cuda-graphs": (("--cuda-graphs",), {"TINYGRAD3_FAST": "1"}),
    "--reference": (("--reference",), {}),
}


def run(name, flags, env, args):
    out = os.path.join(args.runs, name.replace(" ", "_").replace("=", "-").strip("-") or "default")
    updates = args.reference_updates if name == "--reference" else args.max_updates
    cmd = [sys.executable, "train.py", "--data", args.data, "--max-updates", str(updates), "--warmup",
           str(min(args.warmup, updates)), "--out", out, "--overwrite", "--no-progress", *args.train_args.split(),
           *flags]
    environment = {k: v for k, v in os.environ.items() if k != "TINYGRAD3_FAST"}
    environment.update(env)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - start
    path_line = next((line for line in done.stdout.splitlines() if line.startswith("kernels: ")), "")
    if done.returncode != 0:
        return dict(name=name, command=" ".join(cmd), error=done.stderr.strip()[-600:], wall_s=wall)
    with open(os.path.join(out, "log.jsonl")) as f:
        rates = [r["tok_s"] for r in map(json.loads, f) if r["kind"] == "update"]
    steady = rates[2:] or rates
    return dict(name=name, command=" ".join(cmd), env=env, path=path_line[len("kernels: "):], updates=len(rates),
                median_tok_s=statistics.median(steady), mean_tok_s=statistics.fmean(rates), wall_s=wall)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--max-updates", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reference-updates", type=int, default=4)
    p.add_argument("--combos", default=",".join(COMBOS), help="comma-separated, from: " + ", ".join(COMBOS))
    p.add_argument("--runs", default="runs/default_speed", help="parent of the run directories")
    p.add_argument("--bound", type=float, default=0.95)
    p.add_argument("--train-args", default="", help="more train.py flags for every combination (a CPU smoke "
                   "test: '--preset tiny --device cpu ...')")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = []
    for name in args.combos.split(","):
        flags, env = COMBOS[name]
        results.append(run(name, flags, env, args))
        print(json.dumps(results[-1]), flush=True)
    good = [r for r in results if "error" not in r]
    best = max(good, key=lambda r: r["median_tok_s"]) if good else None
    default = next((r for r in good if r["name"] == "default"), None)
    print("\n| combination | path | updates | median tok/s | mean tok/s | / best |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error'][-120:]} | | | | |")
            continue
        print(f"| {r['name']} | {r['path']} | {r['updates']} | {r['median_tok_s']:,.0f} | {r['mean_tok_s']:,.0f} "
              f"| {r['median_tok_s'] / best['median_tok_s']:.3f} |")
    ratio = default["median_tok_s"] / best["median_tok_s"] if default and best else 0.0
    verdict = "PASS" if ratio >= args.bound else "FAIL"
    print(f"\n{verdict}: the default runs at {ratio:.1%} of the best combination ({best['name'] if best else '-'}); "
          f"bound {args.bound:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, ratio=ratio, bound=args.bound, verdict=verdict,
                           date=time.strftime("%Y-%m-%d")), f, indent=1)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
