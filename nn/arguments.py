"""Checks of numeric arguments shared by the optimizer, the loss scaler and the schedule:
one clear ValueError/TypeError naming the argument, instead of a failure deep inside; and the
command-line parser of train.py and generate.py, whose errors are one line."""
import argparse
import math
import operator


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...` (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def non_negative_float(name, value):
    """value as a float, which must be finite and >= 0."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def positive_float(name, value):
    """value as a float, which must be finite and > 0."""
    value = non_negative_float(name, value)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got 0")
    return value


def integer_at_least(name, value, minimum):
    """value as an int (anything operator.index accepts, so not 2.0), which must be >= minimum."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
