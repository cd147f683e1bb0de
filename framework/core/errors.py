"""The one exception type for a request that cannot be done as asked (a missing checkpoint, a size the model cannot
make, a required file not given): ``kinetoscope`` prints its message alone, with no traceback, and exits 2."""

from __future__ import annotations


class UsageError(ValueError):
    """What the user asked for cannot be done; the message says what, where (file, key, plugin) and how to fix it."""
