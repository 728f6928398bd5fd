"""What every report shares: the header (run.json's provenance and environment), notes and warnings,
failed requests, the kind's sections, the figures, and one atomic write of report.md (and any other
file the kind derives from the records, such as a load run's summary.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvbench.bench.records import atomic_write_text
from kvbench.report.run import Run
from kvbench.report.tables import table


@dataclass(frozen=True)
class Section:
    title: str
    lines: tuple[str, ...]  # a table, bullets or a figure
    intro: str = ""  # a paragraph above the lines: definitions of the columns


@dataclass(frozen=True)
class Body:
    """What a kind contributes to its report."""

    headline: str  # one line for the terminal
    facts: tuple[str, ...] = ()  # header bullets: the workload, how many requests or trials
    warnings: tuple[str, ...] = ()
    sections: tuple[Section, ...] = ()
    figures: tuple[Path, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (name, text) written next to report.md


def failures_section(failures: dict[str, dict[str, int]], group: str) -> tuple[Section, ...]:
    """Failed requests by reason, per group (a request rate); no section when nothing failed."""
    rows = [(label, reason, str(n)) for label, by_reason in failures.items()
            for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))]
    return (Section("Failed requests", tuple(table((group, "reason", "count"), rows))),) if rows else ()


def render(run: Run, body: Body) -> str:
    lines = [f"# kvbench report: {run.name}", ""]
    description = " ".join((run.spec.get("description") or "").split())
    if description:
        lines += [description, ""]
    if run.partial:
        lines += ["**PARTIAL: the run was interrupted; the tables cover what was measured before.**", ""]
    lines += [f"- kind: {run.kind}"]
    lines += [f"- {fact}" for fact in body.facts]
    lines += _provenance(run.info)
    lines += [f"- note: {note}" for note in run.info.get("notes", [])]
    lines += [f"- **warning**: {w}" for w in (*_untested(run.info), *body.warnings)]
    for section in body.sections:
        lines += ["", f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        lines += section.lines
    if body.figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{f.stem}](figures/{f.name})" for f in body.figures]
    return "\n".join(lines) + "\n"


def write(run: Run, body: Body) -> Path:
    for name, text in body.files:
        atomic_write_text(run.out / name, text)
    path = run.out / "report.md"
    atomic_write_text(path, render(run, body))
    return path


def _provenance(info: dict) -> list[str]:
    """Models, device, versions and commit, as far as run.json records them (a load run: the client's)."""
    env = info.get("environment", {})
    lines = [f"- model: `{name}` ({m.get('dtype', '?')}, fingerprint `{m.get('fingerprint', '?')}`)"
             for name, m in (info.get("models") or {}).items()]
    if "device" in env:
        lines.append(f"- device: {env['device']} ({env.get('device_name', '?')}), "
                     f"{env.get('torch_threads', '?')} torch threads")
    elif "cpu" in env:
        lines.append(f"- client: {env['cpu']} ({env.get('cpu_count', '?')} CPUs)")
    versions = [f"{name} {env[name]}" for name in ("python", "torch", "transformers", "kvbench") if env.get(name)]
    if versions:
        lines.append(f"- versions: {', '.join(versions)}, commit `{env.get('git_commit')}`")
    parts = info.get("parts") or []
    if len(parts) > 1:
        lines.append(f"- measured in {len(parts)} parts (resumed): " + ", ".join(str(p.get("written")) for p in parts))
    return lines


def _untested(info: dict) -> list[str]:
    return list(info.get("environment", {}).get("untested_versions") or [])
