"""One workload library for every run kind: in-process suites, the reuse suites and `kvbench load`.
A `WorkloadSpec` names a workload; `build_requests` turns it into `Request`s carrying token ids
(in-process) or messages (a server), with the metadata kinds record (turn, shared prefix, needle
answers). Imports without torch: the load client installs without it.

Families, one module each: `synthetic` (alias `random`), `text`, `needle`, `prefix_repetition`,
`multi_turn`, `reuse` (`reuse:<name>`), `conversations` (a .jsonl path) and `sharegpt` (`sharegpt-lengths`).
"""

from kvbench.workloads.build import build_requests
from kvbench.workloads.request import Request
from kvbench.workloads.spec import DEFAULT_PROMPTS, KINDS, WorkloadSpec
from kvbench.workloads.tokenizer import Tokenizer, for_model

__all__ = ["DEFAULT_PROMPTS", "KINDS", "Request", "Tokenizer", "WorkloadSpec", "build_requests", "for_model"]
