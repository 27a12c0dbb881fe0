"""Embeddings on the Poincaré disc: a 2-D view of ball-valued features, and its figure.

`to_disc` keeps each point's hyperbolic radius and gives it the direction of its first two principal
components in the tangent space at 0 (PCA of log₀ x), so a point's distance to the origin — what hyperbolic
classifiers read as confidence — is drawn exactly, and only the angle is a projection.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from models.hyperbolic.ball import PoincareBall


def to_disc(x: torch.Tensor, ball: PoincareBall) -> np.ndarray:
    """Ball points [N, d] → disc points [N, 2] of the same curvature (see the module docstring)."""
    v = ball.logmap0(x.detach().double())
    centred = v - v.mean(0)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    direction = centred @ vt[:2].T
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return ball.expmap0(direction * v.norm(dim=-1, keepdim=True)).numpy()


def poincare_disc_figure(groups: dict[str, np.ndarray], radius: float, title: str = "") -> Figure:
    """One scatter per labelled group of disc points, inside the boundary circle of `radius` = 1/√c."""
    fig = Figure(figsize=(4.6, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.add_patch(Circle((0, 0), radius, fill=False, color="black", linewidth=1))
    for label, pts in groups.items():
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.7, label=label)
    ax.set(xlim=(-radius * 1.05, radius * 1.05), ylim=(-radius * 1.05, radius * 1.05), aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="upper right", ncols=2)
    if title:
        ax.set_title(title)
    return fig
