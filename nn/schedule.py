"""Learning-rate schedule: linear warmup, then cosine decay to a floor (or a constant).

The schedule is indexed by OPTIMIZER step, not by micro-batch: with gradient accumulation
the trainer calls it once per `AdamW.step`, so the schedule is the same whatever the number
of micro-batches per update.
"""
import math

from .arguments import integer_at_least, non_negative_float

KINDS = ("cosine", "constant")


class LRSchedule:
    """lr(step) for optimizer step `step` = 0, 1, 2, ...

    With W = warmup_steps, T = total_steps, P = peak_lr, M = min_lr:

        step < W:         lr = P * (step + 1) / W           (P/W at step 0, P at step W-1)
        W <= step < T:    progress = (step - W) / (T - W)    (0 at the first decay step)
                          lr = M + (P - M) * (1 + cos(pi * progress)) / 2
        step >= T:        lr = M

    kind="constant" keeps the warmup and then holds P forever. min_lr defaults to P / 10.
    """

    def __init__(self, peak_lr, warmup_steps, total_steps, min_lr=None, kind="cosine"):
        self.peak_lr = non_negative_float("peak_lr", peak_lr)
        if self.peak_lr == 0:
            raise ValueError("peak_lr must be > 0")
        self.min_lr = self.peak_lr / 10 if min_lr is None else non_negative_float("min_lr", min_lr)
        if self.min_lr > self.peak_lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) is above peak_lr ({self.peak_lr:g}): "
                             "the cosine would climb instead of decay; use min_lr <= peak_lr")
        self.warmup_steps = integer_at_least("warmup_steps", warmup_steps, 0)
        self.total_steps = integer_at_least("total_steps", total_steps, 0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is larger than total_steps "
                             f"({self.total_steps})")
        if kind not in KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}: use one of {', '.join(KINDS)}")
        self.kind = kind

    def __call__(self, step):
        step = integer_at_least("step", step, 0)
        if step < self.warmup_steps:
            # Start at P/W rather than 0: an update with lr 0 would waste a whole optimizer step.
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        if step >= self.total_steps:
            return self.min_lr
        # Half a cosine period maps progress 0..1 onto the factor 1..0: flat near the peak,
        # steepest in the middle, flat again as it lands on min_lr.
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self):
        return (f"LRSchedule(peak_lr={self.peak_lr:g}, warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}, min_lr={self.min_lr:g}, kind={self.kind!r})")
