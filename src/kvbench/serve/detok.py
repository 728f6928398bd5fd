"""Incremental detokenization and stop strings: the text each new token adds, without decoding the whole
output at every token.

`Detokenizer` keeps vLLM's two offsets into the tokens: text is decoded from `prefix_offset` (a few
tokens back, so a tokenizer that drops or merges a leading space decodes the new token in context) and
the new token's text is what the window decodes to beyond `read_offset`. A window that ends inside a
multi-byte character (U+FFFD at the end) emits nothing until the character is complete; `flush` releases what
is still held back when the output ends. Each step decodes a handful of tokens, whatever the output's length.
"""

from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class Detokenizer:
    """`push(token_id)` -> the text it adds (may be ""). A tokenizer of None (a synthetic model) writes each
    token as its id, space-separated, as `LoadedModel.decode` does."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._first = True

    def push(self, token_id: int) -> str:
        if self.tokenizer is None:
            text = str(token_id) if self._first else f" {token_id}"
            self._first = False
            return text
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet (a special token, or a character still incomplete)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > 64:  # keep the window short: drop what no decode will read again
            del self.ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return after[len(before):]

    def flush(self) -> str:
        """The text still held back when the output ends: a character that never completed, or a U+FFFD the
        model generated itself (a token of its own in SmolLM2's vocabulary), which `push` cannot tell apart."""
        if self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StopStrings:
    """Cuts the output at the first of `stops`. `feed(text)` -> (text safe to send, stopped). Text that
    could be the start of a stop string is held back until it cannot be; `flush()` releases it at the end."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = len(self.pending) - self._held()
        out, self.pending = self.pending[:keep], self.pending[keep:]
        return out, False

    def _held(self) -> int:
        """The length of the longest end of the pending text that begins a stop string."""
        for n in range(min(self.hold, len(self.pending)), 0, -1):
            if any(s.startswith(self.pending[-n:]) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
