"""Starting or resuming a run in OUT, for the suite runner and the reuse runner alike.

A resumed run appends to the records already there, so it must measure the same thing: the same
sweep, the same kvbench (version and commit), the same torch and transformers, the same device and
the same model weights. Anything else is refused, not recorded: a report over records from two
codebases or two sets of weights would average numbers that do not measure the same thing, and no
report reads records part by part. run.json keeps every part (when it ran, on what), so resuming
never overwrites an earlier part's environment with the latest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvbench.bench.records import RESULTS, read_records, read_run_info, repair, run_kind
from kvbench.bench.spec import RunSpec, spec_from_dict
from kvbench.errors import KvbenchError

COMPARED = {"kvbench": "kvbench version", "git_commit": "kvbench commit", "torch": "torch", "transformers": "transformers",
            "device_name": "device"}


@dataclass(frozen=True)
class Existing:
    records: list[dict]  # measured by earlier parts (after --repair)
    info: dict  # OUT's run.json as the earlier parts left it ({} for a new run)


def start(out: Path, kind: str, resume: bool, repair_first: bool, spec: RunSpec, environment: dict) -> Existing:
    """What OUT already holds; refuses existing results without --resume, a resume into another `kind` of run
    ("suite", "reuse", "traffic", "load"), and a resume that would measure something else (module docstring)."""
    results = out / RESULTS
    if repair_first and results.exists():
        print(f"kvbench: dropped {repair(results)} corrupt or repeated line(s) from {results}")
    if not results.exists() or results.stat().st_size == 0:
        return Existing([], {})
    if not resume:
        raise KvbenchError(f"{out} already holds results; pass --resume to continue that run, or choose another --out")
    found = run_kind(out)
    if found != kind:
        raise KvbenchError(f"{out} holds a {found} run, not a {kind} run; resume only the run that wrote it, "
                           "or choose another --out")
    records = read_records(results)
    info = read_run_info(out)
    differences = []
    if info.get("spec_digest") not in (None, spec.digest()) and not _same_spec(info.get("spec"), spec):
        differences.append("sweep (the spec or the flags changed)")
    before = info.get("environment", {})
    differences += [f"{label} ({before[key]}, now {environment.get(key)})" for key, label in COMPARED.items()
                    if key in before and before[key] != environment.get(key)]
    if differences:
        raise KvbenchError(f"{out} holds results of a different {'; '.join(differences)}; resume with the same ones, "
                           "or choose another --out")
    return Existing(records, info)


def _same_spec(earlier: dict | None, spec: RunSpec) -> bool:
    """Whether the spec an earlier part stored, read by this kvbench, measures what `spec` does (the stored
    digest may come from an older digest formula or from fields an older kvbench did not have)."""
    try:
        return earlier is not None and spec_from_dict(earlier).digest() == spec.digest()
    except KvbenchError:
        return False


def check_model(out: Path, existing: Existing, name: str, fingerprint: str) -> None:
    """Refuse to add records of `name` measured with other weights than the earlier parts'."""
    before = existing.info.get("models", {}).get(name, {}).get("fingerprint")
    if before is not None and before != fingerprint:
        raise KvbenchError(f"{out} holds results of {name} with other weights (fingerprint {before}, now "
                           f"{fingerprint}); resume with the same weights, or choose another --out")


def parts(existing: Existing, info: dict) -> list[dict]:
    """run.json's `parts`: the earlier parts' (a run.json from before parts were kept counts as one), then this one."""
    earlier = existing.info.get("parts")
    if earlier is None:
        earlier = [{"written": existing.info.get("written"), "environment": existing.info["environment"]}] \
            if "environment" in existing.info else []
    return [*earlier, {"written": info["written"], "environment": info["environment"]}]
