"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class KvbenchError(Exception):
    """A mistake in input or environment that the user can fix; the message says how."""


class NotEngaged(KvbenchError):
    """A strategy's mechanism (eviction, quantization, fetch, offload) did not act where it must have: the
    measurement would describe another strategy, so it is refused instead of recorded."""
