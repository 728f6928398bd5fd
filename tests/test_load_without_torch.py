"""`kvbench load` installs and runs without torch: the CLI end to end in an interpreter that cannot see torch.

The subprocess runs with `-S` on a copy of this venv's site-packages (links to every entry) that leaves out
the files of the torch distribution, so torch is not installed there as far as Python and importlib.metadata
can tell, while transformers (the `load` extra's tokenizer library) is.
"""

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import kvbench
from kvbench.bench.records import read_records
from kvbench.load.fake import FakeServer

SRC = Path(kvbench.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torch_free_site(tmp_path_factory) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    torch_tops = {Path(str(f)).parts[0] for f in importlib.metadata.distribution("torch").files}
    shadow = tmp_path_factory.mktemp("site-without-torch")
    for entry in site.iterdir():
        if entry.name not in torch_tops:
            (shadow / entry.name).symlink_to(entry)
    return shadow


def without_torch(site: Path, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": f"{SRC}:{site}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def cli(argv: list[str]) -> str:
    """Run the CLI; print its exit code and whether torch is importable or was imported."""
    return ("import importlib.util, json, sys\n"
            "from kvbench.cli import main\n"
            f"rc = main({argv!r})\n"
            "print(json.dumps({'rc': rc, 'torch_found': importlib.util.find_spec('torch') is not None, "
            "'torch_imported': 'torch' in sys.modules}))\n")


def outcome(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tiny_tokenizer(path: Path) -> Path:
    """A word-level tokenizer saved as a transformers tokenizer dir (what `--tokenizer DIR` reads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(63)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=4096).save_pretrained(path)
    return path


def test_load_runs_end_to_end_through_the_cli_without_torch(torch_free_site, tmp_path):
    tokenizer, out = tiny_tokenizer(tmp_path / "tok"), tmp_path / "out"
    with FakeServer() as url:
        proc = without_torch(torch_free_site, cli(
            ["load", "--url", url, "--workload", "random", "--tokenizer", str(tokenizer), "--prompt-tokens", "8",
             "--output-tokens", "3", "--num-requests", "5", "--request-rates", "200,inf", "--out", str(out),
             "--no-progress"]))
    assert outcome(proc) == {"rc": 0, "torch_found": False, "torch_imported": False}, proc.stderr
    assert "PyTorch was not found" not in proc.stderr
    records = read_records(out / "results.jsonl")
    assert sorted((r["request_rate"], r["index"]) for r in records) == [(rate, i) for rate in ("200", "inf")
                                                                         for i in range(5)]
    assert all(r["status"] == "ok" and r["output_tokens"] == 3 for r in records)
    assert (out / "report.md").read_text().strip() and json.loads((out / "run.json").read_text())["complete"] is True

    report = without_torch(torch_free_site, cli(["report", str(out)]))
    assert outcome(report)["rc"] == 0 and not outcome(report)["torch_imported"], report.stderr


def test_a_load_spec_file_runs_through_kvbench_run_without_torch(torch_free_site, tmp_path):
    """`kvbench run FILE.yaml` with `kind: load` goes through the one runner, which imports no torch."""
    spec, out = tmp_path / "http.yaml", tmp_path / "out"
    with FakeServer() as url:
        spec.write_text(json.dumps({"name": "http", "kind": "load", "url": url, "workload": {"kind": str(jsonl(tmp_path))},
                                    "request_rates": ["inf"]}))
        proc = without_torch(torch_free_site, cli(["run", str(spec), "--out", str(out), "--no-progress"]))
    assert outcome(proc) == {"rc": 0, "torch_found": False, "torch_imported": False}, proc.stderr
    assert [r["status"] for r in read_records(out / "results.jsonl")] == ["ok"]


SUITES = SRC.parent / "suites"  # the subprocess sees src/ only, not the installed package's kvbench.suites


@pytest.mark.parametrize("argv", [["run", str(SUITES / "cache-vs-nocache.yaml"), "--quick"], ["generate", "hi"], ["env"]])
def test_a_command_that_runs_models_names_the_extra_to_install(torch_free_site, argv):
    proc = without_torch(torch_free_site, cli(argv))
    assert outcome(proc)["rc"] == 2
    assert proc.stderr.strip() == (f"kvbench: error: kvbench {argv[0]} needs torch, which is not installed; install "
                                   "it with pip install 'kvbench[engine]'")


def test_load_does_not_import_torch_where_it_is_installed(tmp_path):
    with FakeServer() as url:
        proc = subprocess.run([sys.executable, "-c", cli(["load", "--url", url, "--num-requests", "2",
                                                          "--workload", str(jsonl(tmp_path)), "--out",
                                                          str(tmp_path / "out"), "--no-progress"])],
                              capture_output=True, text=True, timeout=120)
    assert outcome(proc) == {"rc": 0, "torch_found": True, "torch_imported": False}, proc.stderr


def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"}]}) + "\n")
    return path
