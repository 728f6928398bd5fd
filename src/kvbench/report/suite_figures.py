"""A suite run's figures, from its point summaries only (never the engine)."""

from __future__ import annotations

from pathlib import Path

from kvbench.bench.summary import PointSummary, Speedup
from kvbench.report.figures import pyplot, save
from kvbench.report.tables import num


def write_figures(points: list[PointSummary], speedup_rows: list[Speedup], kv_ratio: dict[str, float],
                  accuracy: dict[str, dict[tuple[int, float], float]], out: Path) -> list[Path]:
    written = []
    lengths = {p.target_prompt_tokens for p in points if p.target_prompt_tokens is not None}
    if len(lengths) > 1:
        written.append(_latency_vs_prompt(points, out / "latency_vs_prompt.png"))
    written.append(_strategy_bars(points, out / "strategies.png"))
    if speedup_rows:
        written.append(_speedup(speedup_rows, lengths, out / "speedup.png"))
    if any("greedy_agreement" in p.quality for p in points) and kv_ratio:
        written.append(_pareto(points, kv_ratio, out / "pareto.png"))
    if accuracy:
        written.append(_accuracy_heatmaps(accuracy, out / "needle.png"))
    return written


def _finite(x: float) -> float:
    return x if x == x else 0.0  # NaN (a single sample has no spread) draws no error bar


def _by_strategy(points):
    groups: dict[str, list[PointSummary]] = {}
    for p in points:
        groups.setdefault(p.strategy, []).append(p)
    return groups


def _latency_vs_prompt(points, path):
    plt = pyplot()
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
    return save(fig, path)


def _strategy_bars(points, path):
    plt = pyplot()
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
    return save(fig, path)


def _speedup(rows, lengths, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    groups: dict[str, list[Speedup]] = {}
    for r in rows:
        groups.setdefault(r.strategy, []).append(r)
    if len(lengths) > 1:
        for strategy, rs in groups.items():
            rs = sorted((r for r in rs if r.shape[1]), key=lambda r: r.shape[1])
            ax.plot([r.shape[1] for r in rs], [r.e2e for r in rs], marker="o", label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.legend()
    else:
        ax.bar([f"{r.strategy}\n{r.shape[1:]}" for r in rows], [r.e2e for r in rows])
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel(f"end-to-end speedup vs {rows[0].baseline} (x)")
    ax.grid(alpha=0.3)
    return save(fig, path)


def _pareto(points, kv_ratio, path):
    """KV memory (vs dynamic) against greedy agreement; marker area follows decode speed."""
    plt = pyplot()
    contexts = sorted({p.target_prompt_tokens or 0 for p in points})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    names = sorted({p.strategy_name for p in points})
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fastest = max((p.stats["decode_tokens_per_s"].mean for p in points), default=1.0) or 1.0
    for ax, context in zip(axes[0], contexts):
        for p in points:
            if (p.target_prompt_tokens or 0) != context or p.point not in kv_ratio or "greedy_agreement" not in p.quality:
                continue
            speed = _finite(p.stats["decode_tokens_per_s"].mean)
            ax.scatter(kv_ratio[p.point], p.quality["greedy_agreement"].mean, s=30 + 300 * speed / fastest,
                       color=colors[p.strategy_name], alpha=0.7, edgecolor="black", linewidth=0.5)
            ax.annotate(p.strategy.removeprefix(p.strategy_name), (kv_ratio[p.point], p.quality["greedy_agreement"].mean),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"context {context or 'text'} tokens")
        ax.set_xlabel("KV cache bytes / dynamic")
        ax.set_ylabel("greedy agreement with dynamic")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[n], label=n) for n in names]
    axes[0][-1].legend(handles=handles, fontsize=7, title="marker size: decode tok/s", title_fontsize=7)
    return save(fig, path)


def _accuracy_heatmaps(accuracy, path):
    """Retrieval accuracy over context length (rows) x needle depth (columns), one panel per strategy."""
    plt = pyplot()
    labels = list(accuracy)
    cols = min(4, len(labels))
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.4 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.55, wspace=0.45)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        grid = accuracy[label]
        contexts = sorted({c for c, _ in grid})
        depths = sorted({d for _, d in grid})
        values = [[grid.get((c, d), float("nan")) for d in depths] for c in contexts]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(contexts)), contexts, fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
        ax.set_ylabel("context tokens", fontsize=8)
        ax.set_title(label, fontsize=8)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, num(v, 2), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)  # not save(): tight_layout would fight the colorbar's axes
    plt.close(fig)
    return path
