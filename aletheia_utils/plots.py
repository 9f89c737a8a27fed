"""Every figure of the course is one call here (introduced in 01_curate). Each returns its Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np


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


def _along(xy: np.ndarray, step: float = 2.0) -> np.ndarray:
    """Points every `step` pixels along a polyline given in display coordinates."""
    parts = [xy[:1]]
    for a, b in zip(xy[:-1], xy[1:], strict=True):
        parts.append(np.linspace(a, b, max(2, int(np.hypot(*(b - a)) / step))))
    return np.concatenate(parts)


def _label_points(ax, points: Sequence[tuple[float, float]], labels: Sequence[str]) -> None:
    """Write each label beside its point, at the first place (upper right, lower left, right, left, …) inside the
    axes that covers no other label, no legend and no plotted line; where none is free, at the least bad one."""
    fig = ax.figure
    fig.canvas.draw()  # settles the layout and the limits the places are measured in
    ax.set(xlim=ax.get_xlim(), ylim=ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    drawn = np.concatenate([np.zeros((0, 2)), *(_along(line.get_transform().transform(line.get_xydata()))
                                                for line in ax.lines)])
    for point, label in zip(points, labels, strict=True):
        best = None
        for dx, dy in ((5, 3), (-5, -3), (7, 0), (-7, 0), (5, -3), (-5, 3), (0, 6), (0, -6)):
            text = ax.annotate(label, point, xytext=(dx, dy), textcoords="offset points", fontsize=8, in_layout=False,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center",
                               va="bottom" if dy > 0 else "top" if dy < 0 else "center")
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            cost = (not inside, sum(box.overlaps(t) for t in taken), box.padded(2).count_contains(drawn))
            if best is not None and cost >= best[0]:
                text.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (cost, text, box)
            if cost == (False, 0, 0):
                break
        taken.append(best[2])


def quant_ladder(rows: Sequence[Mapping], reference: float | None = None):
    """File size against held-out perplexity for each GGUF level (06_gguf), the plain levels as one line and the
    `-imatrix` ones as another; `reference` = the HF model's."""
    fig, ax = _fig(6, 3.5)
    sizes = [r["size_bytes"] / 2**20 for r in rows]
    ppl = [r["perplexity"] for r in rows]
    weighted = [r["level"].endswith("-imatrix") for r in rows]
    for imatrix, color, label in ((False, "tab:blue", "plain"), (True, "tab:orange", "with the importance matrix")):
        xy = [(x, y) for x, y, w in zip(sizes, ppl, weighted, strict=True) if w == imatrix]
        if xy:
            ax.plot(*zip(*xy, strict=True), "o-", color=color, label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1, label="merged HF model (fp32)")
    ax.legend(loc="upper right", fontsize=8)
    ax.margins(x=0.15, y=0.35)  # room for the labels inside the axes, clear of the title
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("perplexity on held-out responses")
    ax.set_title("Quantization ladder: size against quality")
    _label_points(ax, list(zip(sizes, ppl, strict=True)), [f"{r['level']} · {r['bpw']:.2f} bpw" for r in rows])
    return fig


def latency_histogram(results: Sequence[Mapping]):
    """Per-request latency distributions of load-test runs (07_serve_cpu), one per concurrency level."""
    fig, ax = _fig()
    for r in results:
        ax.hist(r["latencies_s"], bins=20, alpha=0.5, label=f"{r['server']} ×{r['concurrency']}")
    ax.set_xlabel("request latency (s)")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8)
    ax.set_title("Latency by concurrency")
    return fig


def throughput_vs_concurrency(results: Sequence[Mapping]):
    """Aggregate output tokens/s and p95 latency against concurrent clients, one line per server."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    for name in dict.fromkeys(r["server"] for r in results):
        mine = sorted((r for r in results if r["server"] == name), key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in mine]
        left.plot(x, [r["output_tokens_per_s"] for r in mine], "o-", label=name)
        right.plot(x, [r["latency_p95_s"] for r in mine], "o-", label=name)
    left.set(xlabel="concurrent clients", ylabel="output tokens/s (all clients)", title="Throughput")
    right.set(xlabel="concurrent clients", ylabel="p95 latency (s)", title="Tail latency")
    left.legend(fontsize=8)
    return fig


def task_scores(results: Mapping[str, Mapping[str, Mapping]], metrics: Mapping[str, str]):
    """One panel per task (08_evaluate): its headline metric per model with ±1 standard error bars.
    `results` is {model: {task: {"metrics": {...}} | {"skipped": why}}}; a model without a score gets no bar."""
    tasks = [t for t in metrics if any("metrics" in per.get(t, {}) for per in results.values())]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1), 3.2), layout="constrained",
                             squeeze=False)
    models = list(results)
    for ax, task in zip(axes.flat, tasks, strict=False):
        metric = metrics[task]
        got = [(i, results[m][task]["metrics"]) for i, m in enumerate(models) if "metrics" in results[m].get(task, {})]
        xs = [i for i, _ in got]
        ax.bar(xs, [s[metric] for _, s in got], yerr=[s.get(f"{metric}_stderr") or 0 for _, s in got], capsize=4,
               color=[f"C{i}" for i in xs])
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}\n{metric}", fontsize=9)
    return fig


def win_rates(pairs: Mapping[str, Mapping]):
    """Win rate of A over B per pair with its 95% interval (08_evaluate); 0.5 means no difference."""
    names = [n for n, p in pairs.items() if p.get("prompts")]
    fig, ax = _fig(6, 0.6 * len(names) + 1.2)
    rates = [pairs[n]["win_rate"] for n in names]
    err = [[r - pairs[n]["ci_low"] for n, r in zip(names, rates, strict=True)],
           [pairs[n]["ci_high"] - r for n, r in zip(names, rates, strict=True)]]
    ax.barh(names, rates, xerr=err, capsize=4, color="tab:purple")
    for y, n in enumerate(names):
        p = pairs[n]
        ax.text(1.01, y, f"{p['wins']}/{p['ties']}/{p['losses']}", va="center", fontsize=8)
    ax.axvline(0.5, color="black", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of A over B (ties half), 95% bootstrap interval; right: wins/ties/losses")
    ax.invert_yaxis()
    return fig


def paired_differences(comparisons: Mapping[str, Mapping], metrics: Mapping[str, str]):
    """One panel per metric (08_evaluate; `metrics`: key -> label): each pair's mean per-prompt difference A − B
    with its bootstrap 95% interval, and a line at 0. Blue: the interval excludes 0; grey: it includes 0."""
    names = [n for n, c in comparisons.items() if c.get("differences")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics) + 1.2, 0.45 * len(names) + 1.5),
                             layout="constrained", sharey=True, squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics.items(), strict=True):
        reach = 1e-3  # the panel spans ±(its widest interval end), so 0 sits in the middle
        for y, name in enumerate(names):
            d = comparisons[name]["differences"][key]
            if not d.get("prompts"):
                continue
            shown = d["ci_low"] > 0 or d["ci_high"] < 0
            err = [[max(d["mean"] - d["ci_low"], 0)], [max(d["ci_high"] - d["mean"], 0)]]
            ax.errorbar(d["mean"], y, xerr=err, fmt="o", capsize=4, color="tab:blue" if shown else "grey")
            reach = max(reach, abs(d["ci_low"]), abs(d["ci_high"]))
        ax.axvline(0, color="black", lw=1)
        ax.set_xlim(-1.15 * reach, 1.15 * reach)
        ax.set_title(f"Δ {label}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[0, 0].set_yticks(range(len(names)), names)
    axes[0, 0].set_ylim(len(names) - 0.5, -0.5)
    fig.supxlabel("mean per-prompt difference A − B with its bootstrap 95% interval", fontsize=9)
    return fig


def answer_shapes(per_model: Mapping[str, Sequence[Mapping | None]]):
    """Answer length distribution and the share of answers with lists, code blocks and headings, per model."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    models = list(per_model)
    rows = {m: [r for r in per_model[m] if r] for m in models}
    left.boxplot([[r["words"] for r in rows[m]] or [0] for m in models], tick_labels=models)
    left.set(ylabel="words per answer", title="Answer length")
    kinds = ("list_items", "code_blocks", "headings")
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        shares = [sum(r[k] > 0 for r in rows[m]) / max(len(rows[m]), 1) for k in kinds]
        right.bar([k + i * width for k in range(len(kinds))], shares, width, label=m)
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], ["lists", "code blocks", "headings"])
    right.set(ylabel="share of answers", ylim=(0, 1), title="Structure")
    right.legend(fontsize=8)
    return fig
