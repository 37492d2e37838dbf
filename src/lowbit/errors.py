"""The one exception type for bad user input.

The CLI turns a ``LowbitError`` into a single line on stderr and exit code 2, with no traceback.
Everything else is a bug and keeps its traceback.
"""


class LowbitError(ValueError):
    """A problem with what the user asked for, phrased as what was wrong and what to do."""
