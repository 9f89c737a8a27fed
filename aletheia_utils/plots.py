"""Every figure of the course is one call here (introduced in 01_curate). Each returns its Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt


def _fig(width: float = 7, height: float = 3.5):
    return plt.subplots(figsize=(width, height), layout="constrained")


def funnel(table: Sequence[Mapping]):
    """Rows remaining after each curation step (from `Funnel.table()`)."""
    fig, ax = _fig(7, 0.35 * len(table) + 1)
    steps = [r["step"] for r in table][::-1]
    remaining = [r["remaining"] for r in table][::-1]
    bars = ax.barh(steps, remaining, color="tab:blue")
    for bar, r in zip(bars, table[::-1], strict=True):
        label = f"{r['remaining']}" + (f"  (−{r['removed']})" if r["removed"] else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.set_xlabel("rows remaining")
    ax.set_title("Curation funnel")
    ax.set_xlim(0, max(remaining) * 1.25)
    return fig


def length_histograms(before: Sequence[int], after: Sequence[int], unit: str = "answer tokens"):
    """Distribution of lengths before and after curation, on shared bins."""
    fig, ax = _fig()
    hi = max([*before, *after, 1])
    bins = [i * hi / 40 for i in range(41)]
    ax.hist(before, bins=bins, alpha=0.5, label=f"before ({len(before)} rows)")
    ax.hist(after, bins=bins, alpha=0.7, label=f"after ({len(after)} rows)")
    ax.set_xlabel(unit)
    ax.set_ylabel("rows")
    ax.legend()
    ax.set_title("Lengths before and after curation")
    return fig


def score_histogram(scores: Sequence[float], threshold: float, flagged: Sequence[bool], label: str):
    """A filter's score per row, the rows it flagged, and its threshold."""
    fig, ax = _fig()
    kept = [s for s, f in zip(scores, flagged, strict=True) if not f]
    gone = [s for s, f in zip(scores, flagged, strict=True) if f]
    lo, hi = min(scores), max(scores)
    bins = [lo + i * (hi - lo) / 40 for i in range(41)]
    ax.hist(kept, bins=bins, alpha=0.7, label=f"kept ({len(kept)})")
    ax.hist(gone, bins=bins, alpha=0.9, color="tab:red", label=f"removed ({len(gone)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel(label)
    ax.set_ylabel("rows")
    ax.legend()
    return fig


def topic_distribution(counts: Mapping[str, Mapping[str, int]]):
    """Rows per topic, stacked by split: `{split: {topic: n}}`."""
    fig, ax = _fig(8, 4)
    topics = sorted({t for per in counts.values() for t in per})
    bottom = [0] * len(topics)
    for split, per in counts.items():
        values = [per.get(t, 0) for t in topics]
        ax.bar(topics, values, bottom=bottom, label=split)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("rows")
    ax.set_title("Topics per split")
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.legend()
    return fig


def bars(values: Mapping[str, float], title: str, ylabel: str):
    """One bar per key, labelled with its value."""
    fig, ax = _fig(6, 3)
    b = ax.bar(list(values), list(values.values()), color="tab:green")
    ax.bar_label(b, fmt="%g")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return fig


def training_curves(records: Sequence[Mapping], panels: Mapping[str, Sequence[str]]):
    """One panel per entry of `panels` (title -> metric keys), each key a line over `step`.
    `records` are the lines of a stage's `metrics.jsonl`."""
    n = len(panels)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3 * rows), layout="constrained", squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels.items(), strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig
