"""Retrieval and grounding metrics: R@K and mAP agree with torchmetrics; moment and highlight scores on known cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from models.vl.evaluation import (
    detection_ap,
    hit_at_1,
    image_text_recall,
    moment_map,
    r1_at_iou,
    ranking_map,
    recall_at_k,
    temporal_iou,
    zero_shot_accuracy,
)


def _flat(scores: torch.Tensor, relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    queries = torch.arange(len(scores))[:, None].expand_as(scores)
    return scores.flatten(), relevant.flatten(), queries.flatten()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_and_ranking_map_equal_torchmetrics(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(40, 120, generator=generator) + 0.01  # torchmetrics' AP drops targets whose score is ≤ 0
    relevant = torch.rand(40, 120, generator=generator) < 0.03
    relevant[torch.arange(40), torch.randint(120, (40,), generator=generator)] = True  # every query has one
    preds, target, indexes = _flat(scores, relevant)
    for k, value in recall_at_k(scores, relevant, ks=(1, 5, 10, 50)).items():
        assert value == pytest.approx(RetrievalHitRate(top_k=k)(preds, target, indexes=indexes).item(), abs=1e-6)
    assert ranking_map(scores, relevant) == pytest.approx(
        RetrievalMAP()(preds, target, indexes=indexes).item(), abs=1e-6
    )


def test_perfect_image_text_similarity_scores_every_recall_and_an_rsum_of_600():
    captions_of = torch.arange(10).repeat_interleave(5)  # five captions per image, as COCO
    similarity = (captions_of[None, :] == torch.arange(10)[:, None]).float()
    report = image_text_recall(similarity, captions_of)
    assert report["rsum"] == pytest.approx(600) and report["i2t_r1"] == report["t2i_r1"] == 100
    swapped = image_text_recall(similarity[torch.roll(torch.arange(10), 1)], captions_of)
    assert swapped["t2i_r1"] == 0  # each caption's best image is now another image


def test_zero_shot_accuracy_is_the_argmax_hit_rate():
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert zero_shot_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_temporal_iou_of_known_windows():
    iou = temporal_iou(np.array([[0, 10], [5, 15], [20, 30]]), np.array([[0, 10]]))
    np.testing.assert_allclose(iou[:, 0], [1.0, 5 / 15, 0.0])


def test_moment_retrieval_scores_exact_and_partial_windows():
    truths = [np.array([[10.0, 20.0]]), np.array([[0.0, 8.0]])]
    exact = [np.array([[10.0, 20.0, 0.9], [40.0, 50.0, 0.1]]), np.array([[0.0, 8.0, 0.7]])]
    assert moment_map(exact, truths)["avg"] == pytest.approx(1.0)
    assert r1_at_iou(exact, truths) == {0.5: 1.0, 0.7: 1.0}
    shifted = [np.array([[12.0, 22.0, 0.9]]), np.array([[0.0, 8.0, 0.5]])]  # IoU 8/12 ≈ 0.67 for the first
    assert r1_at_iou(shifted, truths) == {0.5: 1.0, 0.7: 0.5}
    per = moment_map(shifted, truths)
    assert per["map@0.5"] == pytest.approx(1.0) and per["map@0.7"] == pytest.approx(0.5)


def test_a_wrong_first_window_halves_the_average_precision():
    truth = np.array([[10.0, 20.0]])
    pred = np.array([[40.0, 50.0, 0.9], [10.0, 20.0, 0.5]])
    assert detection_ap(pred, truth, 0.5) == pytest.approx(0.5)  # precision 1/2 at the only recall step


def test_hit_at_1_reads_the_saliency_of_the_top_predicted_clip():
    saliency = [np.array([0, 2, 4, 3]), np.array([0, 4, 1, 0])]
    assert hit_at_1([np.array([0.1, 0.2, 0.9, 0.3]), np.array([0.1, 0.2, 0.9, 0.3])], saliency) == 0.5
