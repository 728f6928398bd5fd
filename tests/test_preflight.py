import pytest

from kvbench.bench.preflight import estimate, human_bytes, parse_bytes
from kvbench.bench.spec import from_dict
from kvbench.errors import KvbenchError


def test_parse_bytes():
    assert parse_bytes("8GB") == 8_000_000_000
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(KvbenchError, match="cannot read memory size"):
        parse_bytes("lots")


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 2**30) == "3.00 GiB"


def test_estimate_picks_the_largest_point(tiny):
    spec = from_dict({"name": "x", "strategies": ["dynamic"], "prompt_tokens": [16, 256], "batch_sizes": [1, 4],
                      "output_tokens": [8]})
    e = estimate(tiny, spec.points(), {p: p.prompt_tokens for p in spec.points()})
    assert (e.point.prompt_tokens, e.point.batch_size) == (256, 4)
    assert e.kv == 4 * (256 + 8) * tiny.kv_bytes_per_token
    assert e.weights == tiny.weight_bytes
