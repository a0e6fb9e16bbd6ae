"""A training run's directory: who may write it, what it already holds, and its log.

A directory that holds any run output (config.json, log.jsonl, best.safetensors, loss.png,
last/, last.old/, last.damaged/) is a run. A new run is refused there unless it resumes it (--resume) or
replaces it (--overwrite, which deletes those outputs first): nothing overwrites another run's
best weights or appends to its log by accident. `RunLock` keeps two processes from writing
one directory at once (an advisory `flock` on `<out>/.lock`, released by the kernel when the
process ends, kill -9 included).

`RunLog` is log.jsonl: one JSON object per line, appended. A process killed in the middle of
a write leaves a torn last line; reading skips it (it belongs to an update after the last
checkpoint, which a resume redoes), and the rewrite on resume goes through a temporary file
and a rename, so a crash during it keeps the whole old log.
"""
import errno
import fcntl
import json
import os
import shutil

from .checkpoint import remove_stale_temporaries, write_file_atomic

RUN_OUTPUTS = ("config.json", "log.jsonl", "best.safetensors", "loss.png", "last", "last.old", "last.damaged",
               "tokenizer")
LOCK_NAME = ".lock"


class RunError(ValueError):
    """A run directory that this run may not use; the message names the flag and the fix."""


class RunLock:
    """Exclusive use of a run directory for the life of this object (or of a `with` block)."""

    def __init__(self, out):
        check_is_directory(out)
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, LOCK_NAME)
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise RunError(f"another train.py (pid {holder}) is writing to --out {out}: wait for it to "
                           "end, or choose another --out") from None
        self._file.truncate(0)
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self):
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def check_is_directory(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} is a file, not a directory: choose another --out")


def claim(out, resume, overwrite):
    """Make `out` ready for this run: refuse another run's directory, delete a replaced run's
    outputs (--overwrite), and remove temporaries an interrupted save left behind."""
    check_is_directory(out)
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    os.makedirs(out, exist_ok=True)
    present = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(out, name))]
    if resume:
        if not any(name in present for name in ("last", "last.old")):
            raise RunError(f"--resume: {out} holds no checkpoint (no last/): start a new run there with "
                           "--overwrite, or choose another --out")
    elif present and not overwrite:
        raise RunError(f"--out {out} already holds a run ({', '.join(present)}): pass --resume to continue "
                       "it, --overwrite to replace it, or choose another --out")
    elif present:
        for name in present:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return remove_stale_temporaries(out)


class RunLog:
    """log.jsonl (one JSON object per update or eval) and loss.png, refreshed at every eval."""

    def __init__(self, out):
        self.path = os.path.join(out, "log.jsonl")
        self.plot_path = os.path.join(out, "loss.png")

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self):
        """Every record; a torn last line (a write cut off by a kill) is left out."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = f.read().split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines):  # the last line, with no newline after it: a torn write
                    break
                raise RunError(f"{self.path} line {number} is not JSON: the log is damaged; repair or "
                               "delete that line, then --resume") from None
        return records

    def truncate_after(self, step):
        """On resume, drop records of updates after the checkpoint (they will be redone)."""
        if os.path.exists(self.path):
            kept = [r for r in self.records() if r.get("step", 0) <= step]
            write_file_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        records = self.records()
        train = [(r["tokens"], r["loss"]) for r in records if r["kind"] == "update" and r["loss"] is not None]
        evals = [r for r in records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if train:
            ax.plot(*zip(*train), lw=0.7, alpha=0.5, label="train (per update)")
        for split, style in (("train", "o-"), ("validation", "s-")):
            points = [(r["tokens"], r[split]) for r in evals]
            if points:
                ax.plot(*zip(*points), style, ms=3, label=f"{split} (eval)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, self.plot_path)


class SilentLog(RunLog):
    """The log of ranks other than 0: the same calls, nothing written."""

    def write(self, record):
        pass

    def truncate_after(self, step):
        pass

    def plot(self):
        pass
