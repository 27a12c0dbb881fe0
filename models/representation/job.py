"""What every representation job shares: its params and its ending.

`RepresentationParams` holds the fields the family's training jobs share, under one name and meaning
each: the optimizer schedule of `models.params.EpochTrainingParams` (`lr`, `batch_size`,
`weight_decay`, `epochs`), `checkpoint_every` (`models.params.ResumableParams`: a resumed run ends
as an uninterrupted one), the CNN `width` and the `plot` of the embeddings. A job whose schedule
is not counted in epochs of mini-batches (class-balanced iterations) or whose encoder is not a CNN
takes the mixins it does have, `EmbeddingPlotParams` among them.

`finish_representation_job` is the one ending of a representation job, as `finish_lm_job` is the
language-model family's: score the frozen embeddings (the family's evaluation suite, or the
zero-shot half of it for classes unseen in training), log the scores at the last step, plot the
training curves and a 2-D map of the embeddings, save `report.json`, and publish the encoder as a
registered model that any `evaluate` job (RankMe, say) can load back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from models.context import RunContext, stop_if_cancelled
from models.params import EpochTrainingParams, ResumableParams
from models.plots import curves_figure
from models.registry import MethodParams
from models.representation.encoders import ContrastiveEncoder, save_encoder
from models.representation.evaluation import embedding_figure, evaluate_embeddings, zero_shot_metrics

PlotKind = Literal["tsne", "pca", "none"]
Evaluation = Literal["probes", "zero-shot", "none"]
Embeddings = tuple["torch.Tensor | np.ndarray", "np.ndarray"]


class EmbeddingPlotParams(MethodParams):
    """The 2-D map every representation job can draw of the embeddings it evaluates."""

    plot: PlotKind = Field(
        "tsne", description="2-D map of the evaluated embeddings: t-SNE, PCA, or none (no map; saves seconds)"
    )


class RepresentationParams(EmbeddingPlotParams, EpochTrainingParams, ResumableParams):
    """A representation job that trains a CNN encoder for `epochs` passes of mini-batches with Adam.

    The defaults are the contrastive loop's (`models.representation.contrastive`); a method
    redeclares a field only where its default or bounds differ.
    """

    lr: float = Field(2e-3, gt=0.0, le=1.0, description="Adam learning rate")
    batch_size: int = Field(256, ge=2, le=8192, description="mini-batch size (a contrastive batch needs 2 or more)")
    weight_decay: float = Field(1e-6, ge=0.0, le=1.0, description="Adam weight decay")
    epochs: int = Field(10, ge=1, le=1000, description="training epochs")
    checkpoint_every: int = Field(5, ge=0, le=1000, description="checkpoint every N epochs (0: never)")
    width: int = Field(32, ge=4, le=512, description="CNN channels (= representation size)")


Curves = Sequence[str] | Mapping[str, Sequence[str]]


def history_panels(
    history: Sequence[Mapping[str, float]], curves: Curves, label: str, x: str
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """`curves_figure` panels from per-epoch (or per-evaluation) history rows.

    `curves` names history keys, one panel each, or maps a panel title to several keys drawn in it. A
    panel of one key draws one line named `label`; a row without a key is left out of that key's line,
    a panel with no point at all is left out. x is each row's `x` entry when it has one, else its
    position from 1.
    """
    groups = {k: [k] for k in curves} if not isinstance(curves, Mapping) else {k: list(v) for k, v in curves.items()}
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for title, keys in groups.items():
        lines = {}
        for key in keys:
            rows = [(float(r.get(x, i + 1)), float(r[key])) for i, r in enumerate(history) if key in r]
            if rows:
                lines[label if len(keys) == 1 else key] = ([a for a, _ in rows], [b for _, b in rows])
        if lines:
            panels[title] = lines
    return panels


HEADLINES = (("linear_probe_acc", "probe", ".3f"), ("recall_at_1", "R@1", ".3f"), ("rankme", "RankMe", ".1f"))


def headline(report: Mapping[str, float], prefix: str = "") -> str:
    """The score an embedding map's title quotes: the linear probe, else Recall@1, else RankMe."""
    for key, name, fmt in HEADLINES:
        for named in (prefix + key, key):
            if named in report:
                return f"{name} {report[named]:{fmt}}"
    return ""


def finish_representation_job(
    ctx: RunContext,
    params: MethodParams,
    *,
    method: str,
    step: int,
    test: Embeddings | None = None,
    train: Embeddings | None = None,
    evaluation: Evaluation = "probes",
    prefix: str = "",
    metrics: Mapping[str, float] | None = None,
    history: Sequence[Mapping[str, float]] = (),
    curves: Curves = (),
    label: str = "",
    x: str = "epoch",
    title: str | Callable[[Mapping[str, float]], str] = "",
    plot_name: str = "embedding.png",
    encoder: ContrastiveEncoder | None = None,
    report: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluate, log, plot, report and register a trained representation; the logged scores.

    - `evaluation="probes"`: the family's suite on `train` and `test` embeddings (linear probe and
      k-NN fit on train; clustering, retrieval and RankMe on test: `evaluate_embeddings`);
      `"zero-shot"`: clustering and retrieval of `test` alone (`zero_shot_metrics`, the protocol for
      classes unseen in training); `"none"`: only `metrics`. Scores are named `prefix` + their name
      (`unseen_recall_at_1`); `metrics` (the method's own numbers) come after and win a clash.
    - all of them are logged at `step` and saved, with the further (unlogged) `report` entries, as
      `report.json`;
    - `curves.png`: the `curves` of `history` (see `history_panels`), x labelled `x`;
    - `plot_name`: a t-SNE or PCA map (`params.plot`; none: no map) of the `test` embeddings coloured
      by their labels, titled `title` and the headline score (or `title(report)` when callable);
    - `encoder`: its body saved with `save_encoder` (the params kept in its config) and registered as
      `{method}-{job id}` with the scores, so `load_encoder` (RankMe, say) can read it back.

    Checks for a cancel first: a job asked to stop publishes nothing.
    """
    stop_if_cancelled(ctx)
    scores: dict[str, float] = {}
    if evaluation == "probes":
        if train is None or test is None:
            raise ValueError("the probes need train and test embeddings")
        scores = evaluate_embeddings(train[0], train[1], test[0], test[1], ctx.seed).metrics()
    elif evaluation == "zero-shot":
        if test is None:
            raise ValueError("the zero-shot scores need test embeddings")
        scores = zero_shot_metrics(test[0], test[1], ctx.seed)
    logged = {f"{prefix}{k}": float(v) for k, v in scores.items()} | {k: float(v) for k, v in (metrics or {}).items()}
    ctx.log(step, **logged)
    panels = history_panels(history, curves, label or method, x)
    if panels:
        ctx.save_artifact("curves.png", curves_figure(panels, x), kind="plot")
    plot = getattr(params, "plot", "none")
    if test is not None and plot != "none":
        heading = title(logged) if callable(title) else ": ".join(s for s in (title, headline(logged, prefix)) if s)
        z, y = np.asarray(test[0]), np.asarray(test[1])
        ctx.save_artifact(plot_name, embedding_figure(z, y, heading, plot, ctx.seed), kind="plot")
    ctx.save_artifact("report.json", {**logged, **(report or {})}, kind="json")
    if encoder is not None:
        folder = save_encoder(ctx.workdir / "encoder", encoder, {"method": method, **params.model_dump()})
        ctx.register_model(f"{method}-{ctx.job_id}", folder, {"method": method, **logged})
    return logged
