"""Move cached keys to new positions: RoPE is a rotation, so a key cached at position p becomes the
key at position q by one more rotation of q - p, with the model's own rotary frequencies.

Models whose positions cannot be moved this way (absolute or learned position embeddings, ALiBi,
RoPE variants whose frequencies depend on the sequence length) are refused with a clear error.
"""

from __future__ import annotations

import torch

from kvbench.errors import KvbenchError

_LENGTH_DEPENDENT = {"dynamic", "longrope"}  # frequencies change with the sequence length


class Rerotator:
    """Re-rotates keys of shape [..., tokens, head_dim] by a whole number of positions."""

    def __init__(self, model: torch.nn.Module):
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        inv_freq = getattr(rotary, "inv_freq", None)
        name = type(model).__name__
        if inv_freq is None:
            raise KvbenchError(
                f"{name} has no rotary position embedding, so cached keys cannot be moved to new positions; "
                "use reuse mode 'prefix' (exact prefix hits need no re-positioning)"
            )
        if getattr(rotary, "rope_type", "default") in _LENGTH_DEPENDENT:
            raise KvbenchError(
                f"{name} uses {rotary.rope_type!r} RoPE, whose frequencies depend on the sequence length; "
                "cached keys cannot be moved exactly: use reuse mode 'prefix'"
            )
        self.inv_freq = inv_freq.detach().to(torch.float64)
        self.rotary_dim = 2 * self.inv_freq.numel()

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """`keys` rotated by `delta` positions (a new tensor; `delta == 0` returns `keys` itself)."""
        if delta == 0:
            return keys
        angles = delta * self.inv_freq  # float64: exact for any position a context window holds
        cos = torch.cat([angles.cos(), angles.cos()]).to(device=keys.device, dtype=torch.float32)
        sin = torch.cat([angles.sin(), angles.sin()]).to(device=keys.device, dtype=torch.float32)
        rot, rest = keys[..., :self.rotary_dim].float(), keys[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        moved = (rot * cos + rotated_half * sin).to(keys.dtype)
        return moved if rest.shape[-1] == 0 else torch.cat([moved, rest], dim=-1)


def check_rerotation(model: torch.nn.Module, rerotator: Rerotator, tokens: int = 8, shift: int = 37) -> None:
    """Refuse a model whose keys `Rerotator` does not move exactly (interleaved RoPE, per-layer rotary
    embeddings...): layer 0's keys of the same tokens at two positions, one moved onto the other."""
    from transformers import DynamicCache

    from kvbench.engine.model_runner import forward

    ids = torch.arange(16, 16 + tokens, device=model.device)[None]
    keys = []
    for offset in (3, 3 + shift):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            forward(model, ids, cache=cache, positions=torch.arange(offset, offset + tokens, device=model.device)[None])
        keys.append(cache.layers[0].keys.float())
    moved = rerotator.shift(keys[0], shift)
    error = (moved - keys[1]).abs().max() / keys[1].abs().max().clamp(min=1e-6)
    if not error < 1e-2:
        raise KvbenchError(
            f"{type(model).__name__}'s position encoding is not the rotation kvbench re-applies (relative error "
            f"{float(error):.3g} after moving keys {shift} positions); use reuse mode 'prefix'"
        )
