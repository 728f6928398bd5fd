"""Tokenizers as workloads see them: a protocol any Hugging Face tokenizer meets, an in-process model's
tokenizer behind it, and the served model's tokenizer for `kvbench load`. transformers is imported
only inside `load_tokenizer`, so this package imports without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from kvbench.models import LoadedModel
    from kvbench.workloads.request import Request

_UNKNOWN_LENGTH = 10**9  # transformers' model_max_length when a tokenizer does not know its model's context


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class ModelTokenizer:
    """An in-process model's tokenizer with the model's own vocabulary size; a model without one (the
    synthetic models) takes token workloads only, and any text fails with one line."""

    model: str
    vocab_size: int
    tokenizer: Any = None

    def _tokenizer(self):
        if self.tokenizer is None:
            raise KvbenchError(f"model {self.model!r} has no tokenizer, so it cannot take text prompts; "
                               "use a synthetic token workload or a real model")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer().encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], **kwargs):
        return self._tokenizer().apply_chat_template(messages, **kwargs)


def for_model(lm: LoadedModel) -> ModelTokenizer:
    return ModelTokenizer(lm.name, lm.config.vocab_size, lm.tokenizer)


def load_tokenizer(spec: str) -> Tokenizer:
    """The served model's tokenizer: `smollm2-135m` (embedded), a local model dir, or a cached hub id."""
    from transformers import AutoConfig, AutoTokenizer

    from kvbench.models import EMBEDDED, ensure_embedded

    source = str(ensure_embedded()) if spec == EMBEDDED else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise KvbenchError(f"cannot load tokenizer {spec!r}: {exc}; give --tokenizer a local model dir or "
                           f"{EMBEDDED!r}") from None
    if context_window(tokenizer) is None:  # many tokenizers leave it to the model's config
        try:
            tokenizer.model_max_length = AutoConfig.from_pretrained(source).max_position_embeddings
        except (OSError, ValueError, AttributeError):
            pass
    return tokenizer


def context_window(tok: Tokenizer) -> int | None:
    """The tokens prompt and output may span together, when the tokenizer (or its model's config) says."""
    n = getattr(tok, "model_max_length", None)
    return n if isinstance(n, int) and n < _UNKNOWN_LENGTH else None


def fitting_requests(requests: list[Request], tok: Tokenizer, window: int) -> int:
    """How many leading requests fit the context window, prompt and max_tokens together."""
    return next((i for i, r in enumerate(requests)
                 if len(tok.encode(r.prompt, add_special_tokens=False)) + r.max_tokens > window), len(requests))
