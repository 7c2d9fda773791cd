"""User-facing error type: anything a user can cause is an AvindexError, shown as one line."""


class AvindexError(Exception):
    """An error caused by input or settings a user can fix; the CLI prints it on one line."""
