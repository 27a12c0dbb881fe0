"""Figures for artifacts: panels of labelled curves, rendered without pyplot's global state.

Built on `matplotlib.figure.Figure` directly (no `pyplot`), so a worker that makes many figures
leaks no windows or memory and needs no GUI backend; `ctx.save_artifact(name, fig, kind="plot")`
stores the PNG.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from matplotlib.figure import Figure

# A series is (x, y) or (x, y, error) — the error is drawn as a shaded band of ± error.
Series = tuple[Sequence[float], Sequence[float]] | tuple[Sequence[float], Sequence[float], Sequence[float]]


def curves_figure(panels: Mapping[str, Mapping[str, Series]], xlabel: str, *, logx: bool = False,
                  logy: bool = False, title: str = "", ncols: int = 3) -> Figure:
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
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig
