"""Serving: many requests through one model at once (continuous batching over a paged KV pool).

`Engine(lm, EngineConfig(...))` takes requests with `add_request`, and every `step()` runs one forward
pass that packs the decode rows and prefill chunks of all scheduled requests into one `[1, T]` row.
The KV lives in kvbench's own pool, reached by an attention function registered in transformers'
attention interface, so unmodified HF models serve without a transformers cache.
"""

from kvbench.serve.config import EngineConfig
from kvbench.serve.engine import Engine
from kvbench.serve.request import FinishReason, Request, RequestOutput, SamplingParams, Status

__all__ = ["Engine", "EngineConfig", "FinishReason", "Request", "RequestOutput", "SamplingParams", "Status"]
