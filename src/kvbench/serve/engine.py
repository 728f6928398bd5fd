"""The engine loop: requests join and leave the running batch at every step, and each step is one
forward pass over the decode rows and prefill chunks of every scheduled request, packed without padding.

Each step records where its time went (schedule / prepare / forward / sample / update, every clock
reading after a device synchronisation) and the pool's exact state after it.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import time
from dataclasses import dataclass

import torch

from kvbench.device import clock
from kvbench.engine.generate import check_prompts
from kvbench.engine.sampling import Sampler
from kvbench.errors import KvbenchError
from kvbench.serve import per_seq, runner
from kvbench.serve.attention import check_servable
from kvbench.serve.config import EngineConfig
from kvbench.serve.kv import make_kv
from kvbench.serve.request import FinishReason, Request, RequestOutput, SamplingParams, Status, Timeline
from kvbench.serve.scheduler import Scheduler, StepPlan
from kvbench.serve.spill import make_spill
from kvbench.serve.swap import HostTier


@dataclass(frozen=True)
class StepStats:
    step: int
    t_s: float  # engine clock at the end of the step
    schedule_ms: float
    prepare_ms: float
    forward_ms: float
    sample_ms: float
    update_ms: float  # advancing requests, keying full blocks, finishing
    num_running: int
    num_waiting: int
    prefill_tokens: int  # prompt chunks and recomputation after preemption
    decode_tokens: int
    preempted: int  # by recompute or swap
    blocks_used: int
    blocks_cached: int
    blocks_free: int
    blocks_promised: int
    kv_bytes_used: int
    kv_bytes_reserved: int
    swapped_out: int  # requests
    swapped_in: int
    bytes_swapped: int  # out and in (host-to-host on a CPU: exact bytes, time not representative)

    @property
    def step_ms(self) -> float:
        return self.schedule_ms + self.prepare_ms + self.forward_ms + self.sample_ms + self.update_ms


class Engine:
    """`Engine(lm, config)`: add requests, call `step()` until `has_work()` is False (or `generate()`).

    `requests` holds every request until `forget` drops a finished one (a server forgets each once answered);
    `step_log` holds every step's `StepStats`, or the last `step_log_limit` of them (a long-running server)."""

    def __init__(self, lm, config: EngineConfig = EngineConfig(), step_log_limit: int | None = None):
        check_servable(lm)
        self.lm, self.config = lm, config
        self.kv = make_kv(lm, config)
        self.runner = per_seq if config.kv_backend == "per_seq" else runner
        self.host = HostTier(self.kv.store, config.swap_space) if config.preemption == "swap" else None
        self.spill = make_spill(config, self.kv)
        chunked = config.chunked_prefill and self.kv.chunked_prefill
        self.scheduler = Scheduler(dataclasses.replace(config, chunked_prefill=chunked), self.kv.pool,
                                   self.kv.max_model_len, self.host, self.spill)
        self.requests: dict[int, Request] = {}
        self.step_log: list[StepStats] | collections.deque[StepStats] = (
            [] if step_log_limit is None else collections.deque(maxlen=step_log_limit))
        self.num_steps = 0  # steps logged so far, whatever step_log keeps
        self._ids = itertools.count()
        self._arrivals: list[Request] = []  # added, not yet arrived (engine clock); sorted by arrival
        self._samplers: dict[int, Sampler] = {}
        self._eos = set(lm.eos_token_ids)

    def now(self) -> float:
        return clock(self.lm.device)

    def add_request(self, prompt_ids: list[int], sampling: SamplingParams = SamplingParams(),
                    arrival_s: float | None = None) -> int:
        """Queue a request; it joins the running batch at the first step at or after `arrival_s`
        (engine clock, `Engine.now()`; default now). Returns its id."""
        self.check_request(prompt_ids, sampling)
        request_id = next(self._ids)
        request = Request(request_id, list(prompt_ids), sampling,
                          Timeline(self.now() if arrival_s is None else arrival_s))
        self.requests[request_id] = request
        if not sampling.sampling.greedy:
            self._samplers[request_id] = Sampler(sampling.sampling, self.lm.device)
        bisect.insort(self._arrivals, request, key=lambda r: r.timeline.arrival_s)
        return request_id

    def check_request(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Refuse (KvbenchError) a request this engine can never serve: too long for the model or the pool,
        or one its per_seq strategy or paged policy cannot hold."""
        check_prompts(self.lm, [prompt_ids], sampling.max_tokens)
        self.scheduler.check_fits(len(prompt_ids), sampling.max_tokens)
        if self.runner is per_seq:
            self.kv.store.check(len(prompt_ids), sampling.max_tokens)
        elif self.kv.policy is not None:
            self.kv.policy.check(len(prompt_ids), sampling.max_tokens)

    def abort(self, request_id: int) -> None:
        request = self._request(request_id)
        if request.finished:
            return
        if request in self._arrivals:
            self._arrivals.remove(request)
        self.scheduler.remove(request)
        self._finish(request, FinishReason.ABORT, self.now())

    def forget(self, request_id: int) -> None:
        """Drop a finished request's `Request` (its sampler went when it finished); its id is never reused."""
        if not self._request(request_id).finished:
            raise KvbenchError(f"request {request_id} has not finished; abort it before forgetting it")
        del self.requests[request_id]

    def _request(self, request_id: int) -> Request:
        request = self.requests.get(request_id)
        if request is None:
            raise KvbenchError(f"no request {request_id}; ids come from add_request (and forget drops finished ones)")
        return request

    def has_work(self) -> bool:
        return bool(self._arrivals) or self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit what has arrived, run one forward, and return what each scheduled request produced."""
        t0 = self.now()
        while self._arrivals and self._arrivals[0].timeline.arrival_s <= t0:
            self.scheduler.add(self._arrivals.pop(0))
        plan = self.scheduler.schedule()
        if not plan.rows:
            return []
        t1 = self.now()
        inputs = self.runner.prepare(plan.rows, self.kv.pool, self.kv.store, self.lm.device)
        if self.kv.policy is not None:
            inputs = self.kv.policy.instrument(inputs)
        t2 = self.now()
        logits = self.runner.run_model(self.lm.model, inputs)
        t3 = self.now()
        tokens = runner.sample(logits, inputs.emitting, self._samplers)
        t4 = self.now()
        outputs = self._update(plan, inputs.emitting, tokens, t0, t4)
        if self.kv.policy is not None:  # evicts after the step's KV is committed (timed as update)
            self.kv.policy.after_step(plan.rows, inputs, self.kv)
        self._log(plan, inputs.emitting, (t0, t1, t2, t3, t4, self.now()))
        return outputs

    def generate(self, prompts: list[list[int]], sampling: SamplingParams = SamplingParams()) -> list[Request]:
        """Offline use: run `prompts` (all arriving now) to completion; the requests, in prompt order."""
        ids = [self.add_request(p, sampling) for p in prompts]
        self.run_until_idle()
        return [self.requests[i] for i in ids]

    def run_until_idle(self) -> None:
        while self.has_work():
            if not self.scheduler.has_work():  # only future arrivals: wait for the next one
                time.sleep(max(0.0, self._arrivals[0].timeline.arrival_s - self.now()))
            self.step()

    def _update(self, plan: StepPlan, emitting, tokens: list[int], start: float, t: float) -> list[RequestOutput]:
        """Advance the step's requests; `start`: when the step began (scheduling), `t`: when it sampled."""
        for row in plan.rows:
            request = row.request
            if request.timeline.first_scheduled_s is None:
                request.timeline.first_scheduled_s = start
            request.num_computed = row.start + row.n
            self.kv.pool.commit(request.request_id, request.tokens, row.entry, request.num_entries,
                                request.block_keys)
        outputs = []
        for row, token in zip(emitting, tokens):
            request = row.request
            request.output_ids.append(token)
            request.timeline.token_s.append(t)
            if request.timeline.first_token_s is None:
                request.timeline.first_token_s = t
            if token in self._eos and not request.params.ignore_eos:
                self.scheduler.remove(request)
                self._finish(request, FinishReason.STOP, t)
            elif len(request.output_ids) == request.params.max_tokens:
                self.scheduler.remove(request)
                self._finish(request, FinishReason.LENGTH, t)
            outputs.append(RequestOutput(request.request_id, [token], request.finished, request.finish_reason,
                                         len(request.output_ids), request.num_cached or 0))
        return outputs

    def _finish(self, request: Request, reason: FinishReason, t: float) -> None:
        request.status, request.finish_reason, request.timeline.end_s = Status.FINISHED, reason, t
        self._samplers.pop(request.request_id, None)

    def _log(self, plan: StepPlan, emitting, t: tuple[float, ...]) -> None:
        decode = sum(1 for r in emitting if r.n == 1 and r.start >= len(r.request.prompt_ids))
        usage = self.kv.pool.usage()
        ms = [(b - a) * 1e3 for a, b in zip(t, t[1:])]
        self.step_log.append(StepStats(
            self.num_steps, t[-1], *ms, len(self.scheduler.running), len(self.scheduler.waiting),
            plan.num_tokens - decode, decode, len(plan.preempted), usage.used, usage.cached, usage.free,
            usage.promised, usage.bytes_used, usage.bytes_reserved, len(plan.swapped_out), len(plan.swapped_in),
            plan.bytes_swapped))
        self.num_steps += 1
