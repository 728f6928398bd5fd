"""The generation loop: prefill, then decode one token per step, with a timestamp per step.

Every clock reading follows a device synchronisation (`kvbench.device.clock`), so a timestamp
means "this token was available on the host". Metrics (TTFT, ITL, TPOT...) are computed later
from these raw timestamps by `kvbench.bench.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvbench.device import clock
from kvbench.engine import model_runner
from kvbench.engine.memory import PhaseMemory
from kvbench.engine.sampling import Sampler, SamplingConfig
from kvbench.errors import KvbenchError
from kvbench.models import LoadedModel
from kvbench.strategies.base import CacheStrategy


class PrefillSource(Protocol):
    """Prefill from somewhere other than the model alone (cross-request reuse, `kvbench.reuse.ReuseCache`).

    `prefill` fills `cache` for `tokens` (inside the timed region) and returns the last position's logits
    [1, vocab] and what it did (kept as `GenerationResult.reuse`); `after_request` runs after the
    request (untimed), e.g. to store the prompt's blocks."""

    def prefill(self, cache: Any, tokens: list[int]) -> tuple[torch.Tensor, Any]: ...

    def after_request(self, cache: Any, tokens: list[int], outcome: Any) -> None: ...


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise KvbenchError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    """Raw output of one generation over a batch of prompts.

    `step_times_s[i]` is when step i's tokens (one per row) were on the host, in seconds after
    `start_s`; step 0 is the first token, produced by prefill.
    """

    tokens: list[list[int]]  # generated ids per row, EOS included, padding after EOS excluded
    prompt_lengths: list[int]
    step_times_s: list[float]
    kv_cache_bytes: int
    peak_mem_bytes: dict[str, int]  # phase -> bytes
    mem_kind: str
    notes: list[str] = field(default_factory=list)
    reuse: Any = None  # what the PrefillSource reported (kvbench.reuse.RequestReuse), when one was given

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    @property
    def output_tokens(self) -> int:
        """Tokens generated per row for the longest row (= decode steps + 1)."""
        return len(self.step_times_s)


def check_prompts(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise KvbenchError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > lm.context_window:
        raise KvbenchError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context window of "
            f"{lm.name} ({lm.context_window} tokens); shorten the prompt or lower max_new_tokens"
        )
    vocab = lm.config.vocab_size
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise KvbenchError(f"prompt token ids must be in [0, {vocab}) for {lm.name}")


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] ids and attention mask, padded on the left so every row ends at the same column."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(
    lm: LoadedModel, strategy: CacheStrategy, prompts: list[list[int]], config: GenerationConfig,
    reuse: PrefillSource | None = None,
) -> GenerationResult:
    """Generate up to `config.max_new_tokens` tokens for each prompt with the strategy's cache.

    With `reuse` (a PrefillSource such as a reuse cache), prefill takes what it holds of the prompt and
    computes only the rest (inside the timed region: lookup and loading count towards TTFT); its
    `after_request` runs after the timed region (a reuse cache stores the prompt's blocks there).
    """
    check_prompts(lm, prompts, config.max_new_tokens)
    if reuse is not None and (len(prompts) > 1 or strategy.name != "dynamic"):
        raise KvbenchError("cross-request reuse runs one prompt at a time with the `dynamic` strategy")
    device, model = lm.device, lm.model
    eos = torch.tensor(lm.eos_token_ids if config.stop_at_eos else [], dtype=torch.long, device=device)
    pad_id = lm.eos_token_ids[0] if lm.eos_token_ids else 0
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = bool((mask == 0).any())
    batch = len(prompts)
    strategy.check_batch(batch)
    cache = strategy.make_cache(lm, batch, ids.shape[1], config.max_new_tokens)
    uses_cache = strategy.capabilities.uses_cache
    sampler = Sampler(config.sampling, device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    step_times: list[float] = []

    def forward(step_ids, step_positions):
        return model_runner.forward(model, step_ids, cache=cache if uses_cache else None, positions=step_positions,
                                    attention_mask=mask if padded else None)[:, -1]

    with strategy.attach(lm, cache), PhaseMemory(device) as memory:
        memory.phase("prefill")
        start = clock(device)
        if reuse is None:
            next_tokens = sampler(forward(ids, positions))
        else:
            logits, reused = reuse.prefill(cache, prompts[0])
            next_tokens = sampler(logits)
        last_position = positions[:, -1:]
        while True:
            next_tokens = torch.where(finished, pad_id, next_tokens)
            generated.append(next_tokens)
            finished |= torch.isin(next_tokens, eos)
            step_times.append(clock(device) - start)
            if len(step_times) == 1:
                memory.phase("decode")
            if len(generated) == config.max_new_tokens or bool(finished.all()):
                break
            step_ids, last_position = next_tokens[:, None], last_position + 1
            if padded:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            if uses_cache:
                logits = forward(step_ids, last_position)
            else:  # full recompute: the whole sequence goes through the model again
                ids = torch.cat([ids, step_ids], dim=-1)
                positions = torch.cat([positions, last_position], dim=-1)
                logits = forward(ids, positions)
            next_tokens = sampler(logits)

    strategy.check_engaged(cache)
    if reuse is not None:
        reuse.after_request(cache, prompts[0], reused)
    return GenerationResult(
        tokens=_trim(torch.stack(generated, dim=1).tolist(), set(eos.tolist())),
        prompt_lengths=[len(p) for p in prompts],
        step_times_s=step_times,
        kv_cache_bytes=strategy.kv_bytes(cache),
        peak_mem_bytes=dict(memory.peaks),
        mem_kind=memory.kind,
        notes=strategy.notes(device),
        reuse=reused if reuse is not None else None,
    )


def _trim(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    """Cut each row after its first EOS (later columns are padding for rows that stopped early)."""
    out = []
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out
