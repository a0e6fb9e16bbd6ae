"""The one error type of the data package."""


class DataError(ValueError):
    """Bad data input or a bad prepared dataset; the message names the problem and the fix."""
