"""The reference Function classes behind tinygrad3.functional, one small module per op.

Plain NumPy/CuPy array code with the derivation of every backward; the fast path's Functions
(tinygrad3/kernels/<op>.py) subclass them, and tinygrad3/functional.py picks one or the other.

Use them through `tinygrad3.functional` (imported as F); the classes are public so tests
and readers can call a backward directly.
"""
