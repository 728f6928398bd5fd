"""Replay request 79 of the knee run in-process: which tokens did it generate, and what text do they decode to?"""
from dataclasses import replace
from kvbench.models import EMBEDDED, load_model
from kvbench.serve import Engine, EngineConfig, SamplingParams
from kvbench.workloads import WorkloadSpec, build_requests
from kvbench.workloads.tokenizer import load_tokenizer

spec = WorkloadSpec(kind="random", seed=3289472636, prompt_tokens=128, output_tokens=32)
text = build_requests(spec, 200, load_tokenizer(EMBEDDED), form="text")[79].prompt
lm = load_model(EMBEDDED, dtype="float32")
ids = lm.encode(text, chat=False)
(req,) = Engine(lm, EngineConfig(max_num_seqs=16)).generate([ids], SamplingParams(max_tokens=32, ignore_eos=True))
print("prompt tokens", len(ids), "eos ids", lm.eos_token_ids)
print("output ids", req.output_ids)
print("decoded (skip special):", repr(lm.tokenizer.decode(req.output_ids, skip_special_tokens=True)))
print("decoded (raw):", repr(lm.tokenizer.decode(req.output_ids)))
