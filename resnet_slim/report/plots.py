"""The report's figures: accuracy/latency Pareto with the gate's feasible region, sizes, curves.

Every function draws with matplotlib's Agg backend (no display, nothing fetched) and returns
PNG bytes; the caller decides where they go (files for DVC, base64 for the HTML report).
"""

import csv
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from resnet_slim.io import finite_number  # noqa: E402

PNG_META = {"Software": None}  # no version string: the same inputs give the same bytes
# label positions tried in turn (points from the marker) until one overlaps no other label
LABEL_OFFSETS = [(4, 4), (4, -11), (4, 15), (4, -22), (-40, 8), (-40, -16), (4, 26), (4, -33)]


def feasible_region(ref_top1, ref_p50, max_acc_drop_pp, min_speedup) -> tuple[float, float] | None:
    """(lowest top-1 %, highest p50 ms) that the gate accepts, or None if any input is missing.

    The gate passes accuracy when ref_top1 - top1 <= max_acc_drop_pp and latency when
    ref_p50 / p50 >= min_speedup, i.e. top1 >= ref_top1 - drop and p50 <= ref_p50 / speed-up.
    """
    values = [finite_number(v) for v in (ref_top1, ref_p50, max_acc_drop_pp, min_speedup)]
    if any(v is None for v in values) or values[3] <= 0:
        return None
    ref_top1, ref_p50, drop, speedup = values
    return ref_top1 - drop, ref_p50 / speedup


def is_feasible(top1, p50_ms, region: tuple[float, float] | None) -> bool:
    """True when a model's (top-1, p50) lies inside the region (the size check is not part of
    it)."""
    top1, p50_ms = finite_number(top1), finite_number(p50_ms)
    if region is None or top1 is None or p50_ms is None:
        return False
    return top1 >= region[0] and p50_ms <= region[1]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata=PNG_META)
    plt.close(fig)
    return buf.getvalue()


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both latency (lower) and top-1 (higher), fastest
    first."""
    frontier, best = [], -math.inf
    for name, (_, top1) in sorted(points.items(), key=lambda item: (item[1][0], -item[1][1])):
        if top1 > best:
            frontier.append(name)
            best = top1
    return frontier


def place_labels(fig, ax, labels: list[tuple[str, tuple[float, float]]]) -> None:
    """Annotate each point at the first of several offsets whose text box overlaps no earlier label
    (measured with the renderer, so long names and log axes are handled alike)."""
    renderer = fig.canvas.get_renderer()
    taken = []
    for text, xy in labels:
        for offset in LABEL_OFFSETS:
            note = ax.annotate(text, xy, fontsize=7, xytext=offset, textcoords="offset points")
            box = note.get_window_extent(renderer).expanded(1.05, 1.15)
            if not any(box.overlaps(other) for other in taken) or offset == LABEL_OFFSETS[-1]:
                taken.append(box)
                break
            note.remove()


def pareto_png(models: dict, release: str | None, region: tuple[float, float] | None) -> bytes:
    """Top-1 vs batch-1 p50 latency (log x) for every model with both numbers."""
    return _png(pareto_figure(models, release, region))


def pareto_figure(models: dict, release: str | None, region: tuple[float, float] | None):
    """The Pareto figure: each model with its top-1 CI bar, the frontier, the gate's region."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = pareto_points(models)
    if points:
        _fit_axes(ax, points, region)
    if region is not None and points:
        _shade_region(ax, region)
    _top1_ci_bars(ax, models, points)
    frontier = pareto_frontier(points)
    if len(frontier) > 1:
        ax.step(
            [points[n][0] for n in frontier],
            [points[n][1] for n in frontier],
            where="post",
            color="tab:orange",
            lw=1.0,
            alpha=0.8,
            zorder=2,
            label="Pareto frontier",
        )
    place_labels(fig, ax, _scatter_models(ax, models, points, release))
    ax.set_xlabel("p50 latency, batch 1 (ms, log scale)")
    ax.set_ylabel("top-1 on the test split (%)")
    ax.set_title("Accuracy vs latency (shaded: what the gate accepts, size check not shown)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    return fig


def pareto_points(models: dict) -> dict[str, tuple[float, float]]:
    """Model -> (p50 ms, top-1 %) for every model with both numbers (p50 > 0: a log axis)."""
    points = {
        n: (finite_number(m.get("p50_ms")), finite_number(m.get("top1"))) for n, m in models.items()
    }
    return {n: p for n, p in points.items() if p[0] is not None and p[1] is not None and p[0] > 0}


def _fit_axes(ax, points: dict, region: tuple[float, float] | None) -> None:
    """Log latency axis; both axes span every point and the region's corner, with a margin."""
    xs = [p[0] for p in points.values()] + ([region[1]] if region and region[1] > 0 else [])
    ys = [p[1] for p in points.values()] + ([region[0]] if region else [])
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    pad = max(0.5, (max(ys) - min(ys)) * 0.08)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)


def _shade_region(ax, region: tuple[float, float]) -> None:
    """Shade what the gate accepts: at least the lowest top-1, at most the highest p50."""
    (left, _), (low, top) = ax.get_xlim(), ax.get_ylim()
    ax.fill_between(
        [left, region[1]],
        max(region[0], low),
        top,
        color="tab:green",
        alpha=0.12,
        label=f"gate: top-1 ≥ {region[0]:.2f}%, p50 ≤ {region[1]:.3g} ms",
    )
    ax.axvline(region[1], color="tab:green", lw=0.8, ls="--")
    ax.axhline(region[0], color="tab:green", lw=0.8, ls="--")


def _top1_ci_bars(ax, models: dict, points: dict) -> None:
    """The 95% CI of each model's top-1 as a grey bar, where it brackets the point."""
    for name, (x, y) in points.items():
        low, high = (
            finite_number(models[name].get("top1_ci_low")),
            finite_number(models[name].get("top1_ci_high")),
        )
        if low is not None and high is not None and low <= y <= high:
            ax.errorbar(
                x,
                y,
                yerr=[[y - low], [high - y]],
                fmt="none",
                ecolor="tab:gray",
                elinewidth=0.8,
                capsize=2,
                alpha=0.7,
                zorder=2,
            )


def _scatter_models(ax, models: dict, points: dict, release: str | None) -> list:
    """A marker per model, fastest first (the release a red star, PyTorch rows hollow); returns
    the labels to place."""
    labels = []
    for name, (x, y) in sorted(points.items(), key=lambda item: item[1][0]):
        torch_row = models[name].get("runtime") == "pytorch"
        if name == release:
            ax.scatter(x, y, marker="*", s=260, color="tab:red", zorder=4, label=f"release: {name}")
        else:
            ax.scatter(
                x,
                y,
                s=45,
                zorder=3,
                facecolors="none" if torch_row else "tab:blue",
                edgecolors="tab:gray" if torch_row else "tab:blue",
            )
        labels.append((name + (" (PyTorch)" if torch_row else ""), (x, y)))
    return labels


def size_png(models: dict, release: str | None) -> bytes:
    """Horizontal bars of each model's file size in MB."""
    sizes = {n: finite_number(m.get("size_mb")) for n, m in models.items()}
    sizes = {n: s for n, s in sizes.items() if s is not None}
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(sizes) + 1.2))
    names = list(sizes)[::-1]
    colors = ["tab:red" if n == release else "tab:blue" for n in names]
    bars = ax.barh(names, [sizes[n] for n in names], color=colors)
    ax.bar_label(bars, labels=[f"{sizes[n]:.2f}" for n in names], fontsize=7, padding=2)
    ax.set_xlabel("file size (MB)")
    ax.set_title("Model file size (red: release)")
    ax.tick_params(axis="y", labelsize=8)
    return _png(fig)


def read_curve(tsv: Path, column: str = "val_top1") -> list[tuple[float, float]]:
    """(step, value) pairs from a DVCLive TSV; rows with a missing or bad value are skipped."""
    pairs = []
    with open(tsv, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            try:
                pairs.append((float(row["step"]), float(row[column])))
            except (KeyError, TypeError, ValueError):
                continue
    return pairs


def curves_png(curves: dict[str, list[tuple[float, float]]]) -> bytes:
    """One line per training run: validation top-1 per epoch."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, pairs in curves.items():
        ax.plot([p[0] + 1 for p in pairs], [p[1] for p in pairs], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Validation top-1 per epoch, every training run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def channels_png(channels: list[dict]) -> bytes:
    """Channels per layer before and after pruning (reports/prune/channels.json)."""
    rows = [c for c in channels if isinstance(c, dict) and "layer" in c]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.32 * len(rows)), 4.2))
    xs = range(len(rows))
    ax.bar(
        xs, [finite_number(c.get("before")) or 0 for c in rows], color="lightgray", label="before"
    )
    ax.bar(xs, [finite_number(c.get("after")) or 0 for c in rows], color="tab:blue", label="kept")
    ax.set_xticks(list(xs), [c["layer"] for c in rows], rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Channels kept per layer")
    ax.legend(fontsize=8)
    return _png(fig)
