"""Teacher forcing through a strategy's cache: the next-token distributions it yields for a fixed continuation.

The prompt goes through prefill, then the continuation one token at a time (the decode path, where
eviction and quantization act), so the distributions reflect what the strategy would see while
generating those same tokens.
"""

from __future__ import annotations

import torch

from kvbench.engine.generate import PrefillSource, check_prompts
from kvbench.engine.model_runner import forward
from kvbench.models import LoadedModel
from kvbench.strategies.base import CacheStrategy


@torch.inference_mode()
def teacher_forced_logprobs(
    lm: LoadedModel, strategy: CacheStrategy, prompt: list[int], continuation: list[int],
    source: PrefillSource | None = None,
) -> torch.Tensor:
    """Log-probabilities [len(continuation), vocab] (float32, on CPU) of the token after each prefix.

    Row i is the distribution over the token at continuation[i], given prompt + continuation[:i].
    With `source` (a reuse cache), the prompt is prefilled from it as a generation would be; nothing is stored.
    """
    check_prompts(lm, [prompt], max(1, len(continuation)))
    device, model = lm.device, lm.model
    cache = strategy.make_cache(lm, 1, len(prompt), len(continuation))
    uses_cache = strategy.capabilities.uses_cache
    ids = torch.tensor([prompt], device=device)
    rows = []
    with strategy.attach(lm, cache):
        if source is None:
            rows.append(forward(model, ids, cache=cache if uses_cache else None)[:, -1])
        else:
            rows.append(source.prefill(cache, prompt)[0])
        for position, token in enumerate(continuation[:-1], start=len(prompt)):
            step = torch.tensor([[token]], device=device)
            if uses_cache:
                logits = forward(model, step, cache=cache, positions=torch.tensor([[position]], device=device))
            else:
                ids = torch.cat([ids, step], dim=-1)
                logits = forward(model, ids)
            rows.append(logits[:, -1])
    strategy.check_engaged(cache)
    return torch.cat(rows).float().log_softmax(dim=-1).cpu()
