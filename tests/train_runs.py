"""What the train.py tests share: a tiny CPU run's command line and its log."""
import json
import os


def tiny_argv(data, out, *extra):
    """train.py flags for a tiny-preset CPU run that saves every 4 updates (extra flags win)."""
    return ["--preset", "tiny", "--device", "cpu", "--data", data, "--out", str(out), "--batch-size", "4",
            "--block-size", "32", "--grad-accum", "2", "--warmup", "3", "--lr", "3e-3", "--min-lr", "3e-4",
            "--eval-every", "4", "--eval-batches", "2", "--no-progress", *extra]


def read_log(out):
    """Every record of a run's log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]
