"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class KvbenchError(Exception):
    """A mistake in input or environment that the user can fix; the message says how."""
