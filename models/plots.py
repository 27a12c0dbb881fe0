"""Figures for artifacts: panels of labelled curves, rendered without pyplot's global state.

Built on `matplotlib.figure.Figure` directly (no `pyplot`), so a worker that makes many figures
leaks no windows or memory and needs no GUI backend; `ctx.save_artifact(name, fig, kind="plot")`
stores the PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from models.metrics import ReliabilityBins

# A series is (x, y) or (x, y, error) — the error is drawn as a shaded band of ± error.
Series = tuple[Sequence[float], Sequence[float]] | tuple[Sequence[float], Sequence[float], Sequence[float]]


def curves_figure(
    panels: Mapping[str, Mapping[str, Series]],
    xlabel: str,
    *,
    logx: bool = False,
    logy: bool = False,
    title: str = "",
    ncols: int = 3,
) -> Figure:
    """One panel per entry of `panels` (its key is the panel's y label), one line per series."""
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (ylabel, series) in zip(axes, panels.items()):
        for label, (x, y, *err) in series.items():
            line = ax.plot(x, y, marker="o", markersize=3, label=label)[0]
            if err:
                lo = [a - e for a, e in zip(y, err[0])]
                hi = [a + e for a, e in zip(y, err[0])]
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log" if logx else "linear")
        ax.set_yscale("log" if logy else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def reliability_figure(diagrams: Mapping[str, ReliabilityBins], title: str = "") -> Figure:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal, with the
    gap to confidence shaded, and the ECE in each panel's title (one panel per model)."""
    fig = Figure(figsize=(3.6 * len(diagrams), 3.6), layout="constrained")
    axes = fig.subplots(1, len(diagrams), squeeze=False).ravel()
    for ax, (name, bins) in zip(axes, diagrams.items()):
        width = bins.edges[1] - bins.edges[0]
        left = bins.edges[:-1]
        shown = [c > 0 for c in bins.count]
        acc = [a if s else 0.0 for a, s in zip(bins.accuracy, shown)]
        conf = [p if s else 0.0 for p, s in zip(bins.confidence, shown)]
        ax.bar(left, acc, width=width, align="edge", edgecolor="black", linewidth=0.5, label="accuracy")
        ax.bar(
            left,
            [p - a for a, p in zip(acc, conf)],
            bottom=acc,
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{name}: ECE {bins.ece:.3f}")
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title)
    return fig
