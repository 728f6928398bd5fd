import math

import numpy as np
import pytest

from kvbench.load.arrivals import Arrivals, parse_rate
from kvbench.errors import KvbenchError


def test_schedule_is_seeded_and_starts_at_zero():
    a = Arrivals(rate=10.0, seed=3).schedule(50)
    assert a == Arrivals(rate=10.0, seed=3).schedule(50)
    assert a != Arrivals(rate=10.0, seed=4).schedule(50)
    assert a[0] == 0.0 and all(y > x for x, y in zip(a, a[1:]))


def test_mean_rate_matches_the_request_rate():
    times = Arrivals(rate=40.0, seed=0).schedule(20_001)
    assert np.mean(np.diff(times)) == pytest.approx(1 / 40.0, rel=0.03)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_burstiness_sets_the_spread_of_gaps(burstiness):
    gaps = np.diff(Arrivals(rate=5.0, burstiness=burstiness, seed=1).schedule(20_001))
    cv2 = np.var(gaps) / np.mean(gaps) ** 2  # gamma: squared coefficient of variation = 1 / shape
    assert cv2 == pytest.approx(1 / burstiness, rel=0.08)
    assert np.mean(gaps) == pytest.approx(0.2, rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert Arrivals(rate=math.inf).schedule(4) == [0.0] * 4
    assert Arrivals().schedule(0) == []


def test_duration_schedule_stays_inside_the_window():
    times = Arrivals(rate=50.0, seed=2).schedule_for(3.0)
    assert times[0] == 0.0 and max(times) < 3.0
    assert 100 < len(times) < 200  # 150 expected; a Poisson count this far off is a bug, not bad luck
    with pytest.raises(KvbenchError, match="needs a finite --request-rate"):
        Arrivals(rate=math.inf).schedule_for(3.0)


@pytest.mark.parametrize("text", ["0", "-1", "nan", "fast"])
def test_bad_rates_are_refused(text):
    with pytest.raises(KvbenchError, match="request rate"):
        parse_rate(text)


def test_rate_parsing():
    assert parse_rate("inf") == math.inf and parse_rate("2.5") == 2.5
    with pytest.raises(KvbenchError, match="burstiness"):
        Arrivals(rate=1.0, burstiness=0)
