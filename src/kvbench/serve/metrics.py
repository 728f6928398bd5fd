"""The server's Prometheus metrics, under vLLM's names (so `kvbench load` and dashboards read kvbench's
engine as they read vLLM) plus `kvbench:` extras.

One `CollectorRegistry` per server (no global state). The engine thread updates the metrics after each
step and when a request finishes; `/metrics` renders them. Latency histograms use vLLM's buckets and the
engine's clock: time to first token, inter-token latency and end to end from the request's arrival at
the server, queue time from arrival to the first step that scheduled it. Prompt and prefix-cache
token counters count a request when it finishes (the hits: its prefix-cache hit tokens at first admission,
in all and by tier: the pool, or a spill's ram / disk).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvbench.serve.request import Request

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)

        def make(kind, name, doc, **kw):
            return kind(name, doc, names, registry=self.registry, **kw).labels(**labels)

        self.running = make(Gauge, "vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = make(Gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = make(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage: used blocks / all blocks, in bytes (1 = 100%).")
        self.queries = make(Counter, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.hits = make(Counter, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.tier_hits = Counter("kvbench:prefix_cache_hits_by_tier", "Prompt tokens found in the prefix cache, by "
                                 "tier: the pool, or the spill's ram / disk.", names + ["tier"], registry=self.registry)
        self.preemptions = make(Counter, "vllm:num_preemptions", "Preemptions (requests sent back to wait).")
        self.prompt_tokens = make(Counter, "vllm:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = make(Counter, "vllm:generation_tokens", "Generated tokens.")
        self.ttft = make(Histogram, "vllm:time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS)
        self.itl = make(Histogram, "vllm:inter_token_latency_seconds", "Inter-token latency.", buckets=ITL_BUCKETS)
        self.e2e = make(Histogram, "vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                        buckets=REQUEST_BUCKETS)
        self.queue = make(Histogram, "vllm:request_queue_time_seconds", "Time from arrival to first scheduling.",
                          buckets=REQUEST_BUCKETS)
        self.success = Counter("vllm:request_success", "Finished requests by reason.", names + ["finished_reason"],
                               registry=self.registry)
        self.labels = labels
        self.kv_bytes_used = make(Gauge, "kvbench:kv_cache_bytes_used", "Bytes of KV held for computed tokens.")
        self.kv_bytes_reserved = make(Gauge, "kvbench:kv_cache_bytes_reserved", "Bytes of KV blocks in use or promised.")
        self.kv_blocks = make(Gauge, "kvbench:kv_cache_blocks_total", "Blocks in the KV pool.")
        self.steps = make(Counter, "kvbench:engine_steps", "Engine steps (one forward each).")
        self.step_seconds = make(Counter, "kvbench:engine_step_seconds", "Seconds spent in engine steps.")

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_step(self, step_ms: float, generated: int, preempted: int) -> None:
        self.steps.inc()
        self.step_seconds.inc(step_ms / 1e3)
        self.generation_tokens.inc(generated)
        self.preemptions.inc(preempted)

    def on_state(self, running: int, waiting: int, usage) -> None:
        """The gauges, from the scheduler's queues and the pool's `PoolUsage`."""
        self.running.set(running)
        self.waiting.set(waiting)
        # in bytes, so quantized blocks (kvbench.serve.quant_blocks) count with what they hold: used / total
        # blocks for a pool of one kind of block
        self.kv_usage.set((usage.used * usage.block_bytes + usage.bytes_quantized) / (usage.total * usage.block_bytes))
        self.kv_bytes_used.set(usage.bytes_used)
        self.kv_bytes_reserved.set(usage.bytes_reserved)
        self.kv_blocks.set(usage.total)

    def on_finished(self, request: Request, reason: str | None = None) -> None:
        """Count a finished request (`reason`: as the API finished it, where the engine's differs)."""
        t = request.timeline
        self.success.labels(**self.labels, finished_reason=reason or request.finish_reason.value).inc()
        if request.num_cached is not None:  # it was admitted, so its prompt was looked up
            self.queries.inc(len(request.prompt_ids))
            self.hits.inc(request.num_cached)
            for tier, tokens in (request.num_cached_by_tier or {}).items():
                self.tier_hits.labels(**self.labels, tier=tier).inc(tokens)
            self.prompt_tokens.inc(len(request.prompt_ids))
        if t.first_scheduled_s is not None:
            self.queue.observe(t.first_scheduled_s - t.arrival_s)
        if t.first_token_s is not None:
            self.ttft.observe(t.first_token_s - t.arrival_s)
            self.e2e.observe(t.end_s - t.arrival_s)
        for a, b in zip(t.token_s, t.token_s[1:]):
            self.itl.observe(b - a)
