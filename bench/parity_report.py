"""The parity run's outputs: the printed table, parity.csv, parity.json and parity.png."""
import csv
import json
import os
import platform

LABELS = {"ours": "tinygrad3", "torch": "PyTorch (HF Gemma3ForCausalLM)",
          "eager": "PyTorch, eager attention", "sdpa": "PyTorch, SDPA attention",
          "fp16": "PyTorch, fp16 autocast", "fp32": "PyTorch, float32"}


def columns(names):
    a, b = names
    return ("step", "tokens", f"{a}_train", f"{b}_train", "rel_train", f"{a}_val", f"{b}_val", "rel_val",
            "max_rel_updates")


def print_header(args, names):
    a, b = names
    print(f"parity ({a} vs {b}): {args.preset} on {args.data}, {args.device} {args.dtype}, {args.updates} updates "
          f"of {args.grad_accum} x {args.batch_size} x {args.block_size} tokens, tolerance {args.tolerance:g}")
    print(f"{'step':>6} {'tokens':>10} | {'train ' + a:>11} {b:>11} {'rel':>9} | {'val ' + a:>11} "
          f"{b:>11} {'rel':>9} | {'max rel updates':>15}")


def print_row(row, names):
    a, b = names
    print(f"{row['step']:>6} {row['tokens']:>10,} | {row[a + '_train']:>11.7f} {row[b + '_train']:>11.7f} "
          f"{row['rel_train']:>9.2e} | {row[a + '_val']:>11.7f} {row[b + '_val']:>11.7f} {row['rel_val']:>9.2e} "
          f"| {row['max_rel_updates']:>15.2e}", flush=True)


def write_outputs(args, updates, evals, summary, names):
    """Write parity.csv, parity.json and parity.png into args.out; returns their paths."""
    import torch
    import transformers

    os.makedirs(args.out, exist_ok=True)
    csv_path, json_path, png_path = (os.path.join(args.out, f"parity.{ext}") for ext in ("csv", "json", "png"))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(names))
        writer.writeheader()
        writer.writerows({k: row[k] for k in columns(names)} for row in evals)
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    transformers=transformers.__version__)
    with open(json_path, "w") as f:
        json.dump(dict(args=vars(args), versions=versions, summary=summary, evals=evals, updates=updates),
                  f, indent=1)
    plot(updates, evals, args, png_path, names)
    return [csv_path, json_path, png_path]


def plot(updates, evals, args, path, names):
    """Top: both runs' loss curves; bottom: their relative difference, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(2, 1))
    tokens = [u["tokens"] for u in updates]
    eval_tokens = [e["tokens"] for e in evals]
    for side, color, style, marker in zip(names, ("C0", "C3"), ("-", "--"), ("o", "x")):
        name = LABELS.get(side, side)
        top.plot(tokens, [u[f"{side}_loss"] for u in updates], style, color=color, lw=0.8, alpha=0.6,
                 label=f"{name}: train (per update)")
        top.plot(eval_tokens, [e[f"{side}_val"] for e in evals], marker, ls=style,
                 color=color, ms=5, label=f"{name}: validation (eval)")
    top.set_ylabel("cross-entropy loss")
    top.set_title(f"{args.preset}, {args.device} {args.dtype}")
    top.legend(fontsize=8)
    tiny = 1e-17  # zero differences on a log scale
    bottom.semilogy(tokens, [max(u["rel"], tiny) for u in updates], color="C2", lw=0.8, label="train (per update)")
    bottom.semilogy(eval_tokens, [max(e["rel_val"], tiny) for e in evals], "s", color="C1", ms=4,
                    label="validation (eval)")
    bottom.axhline(args.tolerance, color="k", ls=":", lw=1, label=f"tolerance {args.tolerance:g}")
    bottom.set_xlabel("tokens")
    bottom.set_ylabel(f"|{names[0]} - {names[1]}| / |{names[1]}|")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
