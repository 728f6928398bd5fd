"""The one knob of every eviction strategy: a fraction of the tokens seen, or an absolute token count."""

from __future__ import annotations

import math

from kvbench.errors import KvbenchError


def validate_budget(budget: float | int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise KvbenchError(f"budget must be a fraction in (0, 1] or a whole number of tokens, got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise KvbenchError(
            f"budget {budget} as a fraction must be in (0, 1]; write a whole number (e.g. 512) for a token count"
        )
    if isinstance(budget, int) and budget < 1:
        raise KvbenchError(f"budget must be at least 1 token, got {budget}")


def capacity(budget: float | int, seen_tokens: int) -> int:
    """Tokens a cache may hold after `seen_tokens` have gone through it.

    A fraction keeps that share of everything seen so far (prompt and generated tokens), so 1.0 never
    evicts; a token count is a fixed ceiling.
    """
    if isinstance(budget, float):
        return math.ceil(budget * seen_tokens)
    return budget
