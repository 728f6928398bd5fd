import pytest
import torch

from kvbench.bench import suite_session
from kvbench.bench.preflight import ModelShape, estimate, human_bytes, parse_bytes, read_shape
from kvbench.bench.runner import RunOptions, run
from kvbench.bench.spec import spec_from_dict
from kvbench.cli import main
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
    spec = spec_from_dict({"name": "x", "strategies": ["dynamic"], "prompt_tokens": [16, 256], "batch_sizes": [1, 4],
                      "output_tokens": [8]})
    e = estimate(ModelShape.of(tiny), spec.points(), {p: p.prompt_tokens for p in spec.points()})
    assert (e.point.prompt_tokens, e.point.batch_size) == (256, 4)
    assert e.kv == 4 * (256 + 8) * tiny.kv_bytes_per_token
    assert e.weights == tiny.weight_bytes


def test_a_shape_read_from_the_config_counts_what_loading_holds(tiny):
    shape = read_shape("synthetic:tiny", torch.float32)
    assert shape.weight_bytes == tiny.weight_bytes and shape.kv_bytes_per_token == tiny.kv_bytes_per_token
    assert read_shape("synthetic:tiny", torch.bfloat16).weight_bytes == tiny.weight_bytes // 2


@pytest.mark.slow
def test_the_embedded_model_s_shape_is_read_from_its_converted_config(embedded):
    shape = read_shape("smollm2-135m", torch.float32)
    assert shape.weight_bytes == embedded.weight_bytes and shape.context_window == embedded.context_window


def _no_loading(monkeypatch) -> list[str]:
    loaded = []

    def load_model(name, *args):
        loaded.append(name)
        raise AssertionError(f"{name} was loaded before the sweep was refused")

    monkeypatch.setattr(suite_session, "load_model", load_model)
    return loaded


def test_a_sweep_is_refused_for_its_largest_model_before_any_weights_load(monkeypatch, tmp_path):
    """A multi-model sweep used to measure the models that fit before refusing a later one."""
    loaded = _no_loading(monkeypatch)
    spec = spec_from_dict({"name": "x", "models": ["synthetic:tiny", "synthetic:1b"], "device": "cpu",
                      "workload": {"kind": "synthetic"}, "prompt_tokens": [16], "output_tokens": [4], "trials": 1})
    with pytest.raises(KvbenchError, match=r"refusing to run: the largest point \(synthetic:1b/dynamic/p16/o4/b1\)"):
        run(spec, RunOptions(out=tmp_path / "out", progress=False, memory_limit=10**9))
    assert loaded == [] and not (tmp_path / "out" / "results.jsonl").exists()


def test_a_sweep_over_the_memory_limit_is_refused_from_the_command_line_without_loading(monkeypatch, tmp_path, capsys):
    loaded = _no_loading(monkeypatch)
    argv = ["run", "strategy-sweep", "--quick", "--model", "synthetic:1b", "--device", "cpu", "--memory-limit", "1GB",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbench: error: refusing to run: the largest point") and "weights 4.60 GiB" in err
    assert loaded == []
