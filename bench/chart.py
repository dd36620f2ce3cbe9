"""The PNG chart of a run: throughput and CPU relative to nginx tuned, p99 latency, peak
RSS, per scenario and target."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .figures import Cell, Results
from .targets import REFERENCE

COLORS = {
    "direct": "#9e9e9e",
    "nginx-tuned": "#2e7d32",
    "nginx-docker": "#81c784",
    "model-proxy": "#1565c0",
    "model-proxy-compiled": "#6a1b9a",
}


def chart(results: Results, cells: dict[str, dict[str, Cell]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in results.scenarios if s.name in cells]
    targets = list(results.meta["targets"])
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    fig.suptitle(
        f"model-proxy side by side with nginx — {results.meta['date']} "
        f"({results.meta['reps']} x {results.meta['duration_s']:g} s, medians)"
    )

    def bars(
        ax: Any,
        shown: list[str],
        value: Callable[[str, str], float | None],
        clip: float | None = None,
    ) -> None:
        """Grouped bars; with `clip`, taller bars are cut there and carry their value."""
        width = 0.8 / max(len(shown), 1)
        for i, target in enumerate(shown):
            xs: list[float] = []
            ys: list[float] = []
            for slot, name in enumerate(names):
                y = value(name, target)
                if y is not None:
                    xs.append(slot + (i - (len(shown) - 1) / 2) * width)
                    ys.append(y)
            shown_ys = [min(y, clip) for y in ys] if clip else ys
            ax.bar(xs, shown_ys, width, label=target, color=COLORS.get(target))
            for x, y in zip(xs, ys, strict=True):
                if clip and y > clip:
                    ax.text(x, clip, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
        if clip:
            ax.set_ylim(0, clip * 1.12)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    def cell(name: str, target: str) -> Cell | None:
        found = cells.get(name, {}).get(target)
        return found if found is not None and found.runs > found.failed else None

    def relative(field: Callable[[Cell], float | None]) -> Callable[[str, str], float | None]:
        def value(name: str, target: str) -> float | None:
            ours, ref = cell(name, target), cell(name, REFERENCE)
            if ours is None or ref is None:
                return None
            a, b = field(ours), field(ref)
            return a / b if a is not None and b else None

        return value

    proxies = [t for t in targets if t != "direct"]
    ax = axes[0][0]
    bars(ax, targets, relative(lambda c: c.rate), clip=2.0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title("throughput relative to nginx tuned (higher is better)")

    ax = axes[0][1]
    bars(ax, proxies, relative(lambda c: c.cpu_us), clip=6.0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.5, color="red", linewidth=0.8, linestyle="--", label="target: 1.5x")
    ax.set_title("the proxy's CPU per unit of work relative to nginx tuned (lower is better)")

    ax = axes[1][0]
    bars(ax, targets, lambda n, t: c.p99_ms if (c := cell(n, t)) else None)
    ax.set_yscale("log")
    ax.set_title("p99 latency, ms (SSE: each event's delay), log scale")

    ax = axes[1][1]
    bars(ax, proxies, lambda n, t: c.peak_rss_mib if (c := cell(n, t)) else None)
    ax.set_title("peak RSS during the run, MiB")

    for ax in axes.flat:
        ax.legend(fontsize=8, loc="upper left", ncols=5, framealpha=0.9)
        low, high = ax.get_ylim()
        if ax.get_yscale() == "log":
            ax.set_ylim(low, high * 4)  # room for the legend above the bars
        else:
            ax.set_ylim(low, high * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
