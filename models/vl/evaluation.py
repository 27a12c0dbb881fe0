"""Retrieval, zero-shot and video-grounding metrics, each a function of scores and ground truth.

- R@K: the fraction of queries with a relevant item among their K best-scored ones; rSum: the sum
  of R@{1, 5, 10} in both directions (image→text and text→image), as VSE++ (Faghri et al. 2018)
  and the noisy-correspondence papers report. torchmetrics' `RetrievalHitRate` is the reference.
- Ranking mAP: mean over queries of AP = (1/|R|) Σ_{k: item k relevant} precision@k (torchmetrics'
  `RetrievalMAP`).
- Zero-shot accuracy: argmax over class prompts against the label (Radford et al. 2021).
- Moment retrieval (QVHighlights, Lei et al. 2021): temporal IoU of [start, end) windows;
  R1@IoU θ: the top-scored window of a query overlaps a ground-truth window at IoU ≥ θ; mAP: per
  query, ActivityNet's detection AP (predictions by score, each matched to an unused ground truth
  at IoU ≥ θ, precision made monotone, area under it) averaged over θ ∈ {0.5, 0.55, …, 0.95} and
  queries.
- Highlight detection HIT@1: the clip with the highest predicted saliency has ground-truth
  saliency ≥ 4 ("very good").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
MR_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))
VERY_GOOD = 4


def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """R@K for a [queries, items] score matrix and a boolean relevance matrix of the same shape."""
    order = scores.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def image_text_recall(
    similarity: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """i2t and t2i R@K and rSum from [images, captions] similarities; caption j describes image caption_image[j]."""
    relevant = caption_image[None, :] == torch.arange(len(similarity))[:, None]
    i2t = recall_at_k(similarity, relevant, ks)
    t2i = recall_at_k(similarity.T, relevant.T, ks)
    out = {f"i2t_r{k}": 100 * v for k, v in i2t.items()} | {f"t2i_r{k}": 100 * v for k, v in t2i.items()}
    out["rsum"] = sum(out.values())
    return out


def ranking_map(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """Mean over queries (with at least one relevant item) of average precision."""
    order = scores.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order).float()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    count = hits.sum(1)
    ap = (precision * hits).sum(1) / count.clamp_min(1)
    return float(ap[count > 0].mean())


def zero_shot_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


# -- moments and highlights -----------------------------------------------------------------------


def temporal_iou(windows: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[P, G] IoU of windows [P, 2] against windows [G, 2] (start, end)."""
    windows, truth = np.atleast_2d(windows).astype(float), np.atleast_2d(truth).astype(float)
    inter = np.clip(
        np.minimum(windows[:, None, 1], truth[None, :, 1]) - np.maximum(windows[:, None, 0], truth[None, :, 0]), 0, None
    )
    union = (windows[:, 1] - windows[:, 0])[:, None] + (truth[:, 1] - truth[:, 0])[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def r1_at_iou(
    predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray], thresholds: Sequence[float] = (0.5, 0.7)
) -> dict[float, float]:
    """R1@IoU θ: predictions[q] is [P, 3] (start, end, score); truths[q] is [G, 2]."""
    best = []
    for pred, truth in zip(predictions, truths):
        top = pred[np.argmax(pred[:, 2]), :2]
        best.append(temporal_iou(top[None], truth).max())
    return {t: float(np.mean(np.asarray(best) >= t)) for t in thresholds}


def detection_ap(pred: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """ActivityNet/QVHighlights AP of one query's scored windows [P, 3] against its windows [G, 2]."""
    order = np.argsort(-pred[:, 2], kind="stable")
    iou = temporal_iou(pred[order, :2], truth)
    used = np.zeros(len(truth), dtype=bool)
    tp = np.zeros(len(order))
    for i in range(len(order)):
        for g in np.argsort(-iou[i], kind="stable"):
            if iou[i, g] < threshold:
                break
            if not used[g]:
                used[g], tp[i] = True, 1
                break
    recall = np.cumsum(tp) / len(truth)
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(precision) - 2, -1, -1):  # the monotone envelope
        precision[i] = max(precision[i], precision[i + 1])
    changed = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[changed] - recall[changed - 1]) * precision[changed]))


def moment_map(
    predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray], thresholds: Sequence[float] = MR_IOU_THRESHOLDS
) -> dict[str, float]:
    """mAP at each IoU threshold (mean over queries) and their average (`"avg"`)."""
    per = {t: float(np.mean([detection_ap(p, g, t) for p, g in zip(predictions, truths)])) for t in thresholds}
    return {f"map@{t:g}": v for t, v in per.items()} | {"avg": float(np.mean(list(per.values())))}


def hit_at_1(predicted: Sequence[np.ndarray], saliency: Sequence[np.ndarray], threshold: int = VERY_GOOD) -> float:
    """Fraction of videos whose highest-predicted clip has ground-truth saliency ≥ `threshold`."""
    return float(np.mean([s[int(np.argmax(p))] >= threshold for p, s in zip(predicted, saliency)]))
