"""The Function classes behind tinygrad3.functional, one small module per family of ops.

Use them through `tinygrad3.functional` (imported as F); the classes are public so tests
and readers can call a backward directly.
"""
