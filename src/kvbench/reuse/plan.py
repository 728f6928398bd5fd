"""Which parts of a prompt the store already holds.

Exact hits first: the longest run of chain keys from the prompt's start. Then, in `chunk` mode,
every window of the rest whose tokens equal a stored block (rolling fingerprint, confirmed by
content key), taken greedily left to right without overlap. The prompt's last token is never
taken from the cache: its logits start generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbench.reuse.blocks import Namespace, chain_keys, content_key, window_fingerprints
from kvbench.reuse.store import TieredStore


@dataclass(frozen=True)
class Hit:
    start: int  # first prompt position it covers
    length: int  # tokens taken from the block (its first `length`)
    key: str  # chain key of the stored block
    exact: bool  # a chain hit: same prefix, so the K/V equal a fresh prefill's


def plan(tokens: list[int], store: TieredStore, ns: Namespace, chunk: bool) -> list[Hit]:
    bs, hits = ns.block_size, []
    for i, key in enumerate(chain_keys(tokens, ns)):
        if key not in store:
            break
        hits.append(Hit(i * bs, bs, key, exact=True))
    if chunk and store.by_fingerprint:
        hits += _content_hits(tokens, len(hits) * bs, store, ns)
    return _spare_last_token(hits, len(tokens))


def _content_hits(tokens: list[int], offset: int, store: TieredStore, ns: Namespace) -> list[Hit]:
    bs, rest = ns.block_size, tokens[offset:]
    known = np.fromiter(store.by_fingerprint, dtype=np.uint64, count=len(store.by_fingerprint))
    candidates = np.flatnonzero(np.isin(window_fingerprints(rest, bs), known))
    hits, free_from = [], 0
    for c in candidates.tolist():  # loops over matching windows only, not over tokens
        if c < free_from:
            continue
        content = content_key(rest[c:c + bs], ns)
        key = store.by_content.get(content)
        if key is None:
            continue
        if key not in store:
            store.forget_missing(content)
            continue
        hits.append(Hit(offset + c, bs, key, exact=False))
        free_from = c + bs
    return hits


def _spare_last_token(hits: list[Hit], prompt_len: int) -> list[Hit]:
    if hits and hits[-1].start + hits[-1].length == prompt_len:
        last = hits.pop()
        if last.length > 1:
            hits.append(Hit(last.start, last.length - 1, last.key, last.exact))
    return hits
