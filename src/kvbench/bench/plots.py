"""Figures from point summaries (matplotlib, headless). Reads summaries only, never the engine."""

from __future__ import annotations

from pathlib import Path

from kvbench.bench.summary import PointSummary, Speedup


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(points: list[PointSummary], speedup_rows: list[Speedup], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    lengths = {p.target_prompt_tokens for p in points if p.target_prompt_tokens is not None}
    if len(lengths) > 1:
        written.append(_latency_vs_prompt(points, out / "latency_vs_prompt.png"))
    written.append(_strategy_bars(points, out / "strategies.png"))
    if speedup_rows:
        written.append(_speedup(speedup_rows, lengths, out / "speedup.png"))
    return written


def _finite(x: float) -> float:
    return x if x == x else 0.0  # NaN (a single sample has no spread) draws no error bar


def _by_strategy(points):
    groups: dict[str, list[PointSummary]] = {}
    for p in points:
        groups.setdefault(p.strategy, []).append(p)
    return groups


def _latency_vs_prompt(points, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for strategy, ps in _by_strategy(points).items():
        ps = sorted((p for p in ps if p.target_prompt_tokens), key=lambda p: p.target_prompt_tokens)
        x = [p.target_prompt_tokens for p in ps]
        for ax, field in zip(axes, ("e2e_ms", "ttft_ms")):
            ax.errorbar(x, [p.stats[field].mean for p in ps], yerr=[_finite(p.stats[field].std) for p in ps],
                        marker="o", capsize=3, label=strategy)
    for ax, title in zip(axes, ("end-to-end latency", "time to first token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms (mean ± std)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _strategy_bars(points, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    labels = [p.point for p in points]
    panels = (
        ("e2e_ms", "end-to-end ms (mean ± std)", lambda p: p.stats["e2e_ms"].mean, lambda p: p.stats["e2e_ms"].std),
        ("decode_tokens_per_s", "decode tokens/s (mean ± std)",
         lambda p: p.stats["decode_tokens_per_s"].mean, lambda p: p.stats["decode_tokens_per_s"].std),
        ("kv", "KV cache MiB", lambda p: p.kv_cache_bytes / 2**20, lambda p: 0),
        ("mem", "peak memory MiB", lambda p: p.peak_mem_bytes / 2**20, lambda p: 0),
    )
    for ax, (_, title, value, err) in zip(axes, panels):
        ax.bar(range(len(points)), [value(p) for p in points], yerr=[_finite(err(p)) for p in points], capsize=3)
        ax.set_xticks(range(len(points)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _speedup(rows, lengths, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    groups: dict[str, list[Speedup]] = {}
    for r in rows:
        groups.setdefault(r.strategy, []).append(r)
    if len(lengths) > 1:
        for strategy, rs in groups.items():
            rs = sorted((r for r in rs if r.shape[0]), key=lambda r: r.shape[0])
            ax.plot([r.shape[0] for r in rs], [r.e2e for r in rs], marker="o", label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.legend()
    else:
        ax.bar([f"{r.strategy}\n{r.shape}" for r in rows], [r.e2e for r in rows])
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel(f"end-to-end speedup vs {rows[0].baseline} (x)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
