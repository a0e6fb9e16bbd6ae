"""Ctrl-C, SIGTERM and SIGHUP stop a training run at the next safe point, not where they land.

A signal can arrive anywhere: inside AdamW's update (m written, v not yet), after an update has
counted but before its evaluation, in the middle of a save. Stopping there would save a state
that no uninterrupted run ever had. Inside `with StopSignals() as stop:` the three signals only
set `stop.requested`; the training loop looks at it between updates, after the update's
evaluation and save, where every part of the state (weights, optimizer, loss scaler, batch
stream, log) belongs to the same update, saves there and exits. More signals while it finishes
are acknowledged and otherwise ignored; kill -9 still ends the process at once, and the last
checkpoint on disk stays whole (checkpoints are written to a temporary directory and renamed).

Signal handlers can only be installed by the main thread; elsewhere (a rank of an in-process
group in the tests) the block installs nothing and `requested` stays False.
"""
import signal
import sys
import threading

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class StopSignals:
    def __init__(self, message="stopping after this update: saving last/ (a kill -9 ends at once)"):
        self.message = message
        self.requested = None  # the first signal's name once one has arrived
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"\n{name}: {self.message}", file=sys.stderr, flush=True)
        else:
            print(f"\n{name}: already stopping, please wait", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
