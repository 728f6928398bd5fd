import pytest

from kvbench.cli import build_parser, main
from kvbench.engine import GenerationConfig, SamplingConfig


def test_generate_defaults_equal_dataclass_defaults():
    args = build_parser().parse_args(["generate", "hi"])
    gen, sampling = GenerationConfig(), SamplingConfig()
    assert args.max_new_tokens == gen.max_new_tokens
    assert (args.temperature, args.top_k, args.top_p, args.seed) == (
        sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)


def test_run_flags_default_to_the_suite():
    args = build_parser().parse_args(["run", "prompt-sweep"])
    assert args.trials is args.warmup is args.model is args.strategies is args.device is None


def test_list_shows_models_strategies_and_suites(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "synthetic:tiny", "no_cache", "offloaded", "prompt-sweep", "decode-micro"):
        assert name in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "nope"], "unknown spec 'nope'; valid:"),
        (["run", "prompt-sweep", "--strategies", "fast"], "unknown strategy 'fast'; valid:"),
        (["generate", "hi", "--strategy", "fast"], "unknown strategy 'fast'; valid:"),
        (["generate", "hi", "--model", "synthetic:huge"], "unknown synthetic preset 'huge'; valid: tiny"),
        (["generate", "hi", "--model", "synthetic:tiny"], "has no tokenizer"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be > 0"),
        (["run", "prompt-sweep", "--memory-limit", "lots"], "cannot read memory size"),
        (["report", "/nonexistent/dir"], "run a suite first"),
    ],
)
def test_user_mistakes_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_dry_run_lists_points(capsys):
    assert main(["run", "prompt-sweep", "--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 points" in out and "dynamic/p512/o8/b1" in out


def test_run_and_report_end_to_end(tiny_suite, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_suite), "--out", str(out), "--trials", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "4 points; best end-to-end speedup" in printed
    assert (out / "report.md").exists()
    assert main(["report", str(out)]) == 0


def test_set_overrides_any_key_of_any_kind_and_unknown_keys_list_the_valid_ones(capsys):
    assert main(["run", "http-rate-sweep", "--dry-run", "--set", "url=http://10.0.0.1:9000/v1",
                 "--set", "request_rates=[2, inf]"]) == 0
    assert capsys.readouterr().out.splitlines() == ["http-rate-sweep (load): 2 points x 1 trials on http://10.0.0.1:9000/v1",
                                                    "  2", "  inf"]
    assert main(["run", "prompt-sweep", "--dry-run", "--quick", "--set", "prompt_tokens=[8]"]) == 0
    assert "/p8/" in capsys.readouterr().out
    assert main(["run", "reuse", "--dry-run", "--set", "colour=red"]) == 2
    assert "unknown reuse key(s) colour; valid: blend_fraction" in capsys.readouterr().err
    assert main(["run", "reuse", "--dry-run", "--set", "colour"]) == 2
    assert "cannot read --set 'colour'; write --set KEY=VALUE" in capsys.readouterr().err
