"""Teacher forcing through a strategy's cache: the next-token distributions it yields for a fixed continuation.

The prompt goes through prefill, then the continuation one token at a time (the decode path, where
eviction and quantization act), so the distributions reflect what the strategy would see while
generating those same tokens.
"""

from __future__ import annotations

import torch

from kvbench.engine.generate import check_prompts
from kvbench.models import LoadedModel
from kvbench.strategies.base import CacheStrategy


@torch.inference_mode()
def teacher_forced_logprobs(
    lm: LoadedModel, strategy: CacheStrategy, prompt: list[int], continuation: list[int]
) -> torch.Tensor:
    """Log-probabilities [len(continuation), vocab] (float32, on CPU) of the token after each prefix.

    Row i is the distribution over the token at continuation[i], given prompt + continuation[:i].
    """
    check_prompts(lm, [prompt], max(1, len(continuation)))
    device, model = lm.device, lm.model
    cache = strategy.make_cache(lm, 1, len(prompt), len(continuation))
    uses_cache = strategy.capabilities.uses_cache
    ids = torch.tensor([prompt], device=device)
    rows = []
    with strategy.attach(lm, cache):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=uses_cache, logits_to_keep=1).logits[:, -1]
        rows.append(logits)
        for position, token in enumerate(continuation[:-1], start=len(prompt)):
            step = torch.tensor([[token]], device=device)
            if uses_cache:
                out = model(input_ids=step, position_ids=torch.tensor([[position]], device=device),
                            past_key_values=cache, use_cache=True)
            else:
                ids = torch.cat([ids, step], dim=-1)
                out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
            rows.append(out.logits[:, -1])
    return torch.cat(rows).float().log_softmax(dim=-1).cpu()
