"""When each request is sent: an open-loop schedule fixed before the run starts.

Gaps between sends are gamma distributed with shape `burstiness` and mean 1/rate, as in vLLM's
serving benchmark: burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular. A rate of
`inf` sends every request at t=0. Sends follow the schedule whatever the server does, so a slow
server cannot slow the offered load (no coordinated omission).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvbench.errors import KvbenchError


@dataclass(frozen=True)
class Arrivals:
    rate: float = math.inf  # requests/s
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if math.isnan(self.rate) or self.rate <= 0:
            raise KvbenchError(f"request rate must be > 0 (or inf), got {self.rate}")
        if not math.isfinite(self.burstiness) or self.burstiness <= 0:
            raise KvbenchError(f"burstiness must be a finite number > 0, got {self.burstiness}")

    def schedule(self, count: int) -> list[float]:
        """Send times in seconds from the start of the run; the first request goes at 0."""
        if count <= 0:
            return []
        if math.isinf(self.rate):
            return [0.0] * count
        gaps = self._gaps(count - 1)
        return [0.0] + np.cumsum(gaps).tolist()

    def schedule_for(self, duration_s: float) -> list[float]:
        """Every send time before `duration_s`; needs a finite rate."""
        if math.isinf(self.rate):
            raise KvbenchError("--duration needs a finite --request-rate; with rate inf give --num-requests")
        if not 0 < duration_s < math.inf:
            raise KvbenchError(f"duration must be a finite number > 0 seconds, got {duration_s}")
        times = [0.0]
        rng = np.random.default_rng(self.seed)
        while True:  # draws in blocks; ends because every gap is > 0 with probability 1
            gaps = self._gaps(max(16, int(self.rate * duration_s)), rng)
            for t in times[-1] + np.cumsum(gaps):
                if t >= duration_s:
                    return times
                times.append(float(t))

    def _gaps(self, count: int, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng or np.random.default_rng(self.seed)
        theta = 1.0 / (self.rate * self.burstiness)  # scale: mean = shape * scale = 1/rate
        return rng.gamma(shape=self.burstiness, scale=theta, size=count)


def parse_rate(text: str) -> float:
    """A request rate from the command line: a positive number or `inf`."""
    try:
        rate = float(text)
    except ValueError:
        raise KvbenchError(f"cannot read request rate {text!r}; give a number of requests/s or inf") from None
    Arrivals(rate=rate)  # validates
    return rate
