"""The one evaluation routine of the representation family, and the embedding plot.

`evaluate_embeddings(train, test)` scores frozen features the way self-supervised learning papers
evaluate them, with one report schema for every method:

- linear probe: standardise, then multinomial logistic regression on train, accuracy on test;
- weighted k-NN (Wu et al. 2018, as in DINO/solo-learn): cosine similarity, k = 20 neighbours,
  votes weighted by exp(s/T), T = 0.1;
- clustering: k-means with as many clusters as classes, NMI and ARI against the labels;
- retrieval among the test set: Recall@k (a same-class item among the k nearest, the query
  itself excluded) and MAP@R, via pytorch-metric-learning's `AccuracyCalculator` driven by
  scikit-learn's exact neighbours and k-means (not faiss);
- RankMe (Garrido et al. 2023, eq. 1): exp of the entropy of the normalised singular values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

RECALL_AT = (1, 2, 4, 8)
MAX_PLOTTED = 600


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(−Σ_k p_k log p_k), p_k = σ_k/‖σ‖₁ + ε, σ the singular values of the [N, D] embeddings.

    In [1, min(N, D)] (up to ε); k equal non-zero singular values give k. No centring, as in the
    paper's definition.
    """
    s = torch.linalg.svdvals(torch.as_tensor(z, dtype=torch.float64))
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def linear_probe_accuracy(
    train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, c: float = 1.0
) -> float:
    scaler = StandardScaler().fit(train_z)
    clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train_z), train_y)
    return float((clf.predict(scaler.transform(test_z)) == test_y).mean())


def knn_accuracy(
    train_z: np.ndarray,
    train_y: np.ndarray,
    test_z: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Weighted cosine k-NN: class score Σ_{j∈kNN(i), y_j=c} exp(cos(z_i, z_j)/T)."""
    a = torch.nn.functional.normalize(torch.as_tensor(test_z, dtype=torch.float32), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(train_z, dtype=torch.float32), dim=1)
    sim, idx = (a @ b.T).topk(min(k, len(b)), dim=1)
    labels = torch.as_tensor(train_y)[idx]
    votes = torch.zeros(len(a), int(max(train_y.max(), test_y.max())) + 1)
    votes.scatter_add_(1, labels, torch.exp(sim / temperature))
    return float((votes.argmax(1).numpy() == test_y).mean())


def sklearn_knn(
    query: torch.Tensor, k: int, reference: torch.Tensor, ref_includes_query: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-metric-learning's `knn_func` interface on scikit-learn's exact neighbours (Euclidean)."""
    nn_ = NearestNeighbors(n_neighbors=min(k + int(ref_includes_query), len(reference)))
    dist, idx = nn_.fit(reference.cpu().numpy()).kneighbors(query.cpu().numpy())
    dist, idx = torch.from_numpy(dist).float(), torch.from_numpy(idx)
    if ref_includes_query:  # drop each query's own row, as PML's return_results does
        keep = idx != torch.arange(len(query))[:, None]
        keep[keep.all(1), -1] = False
        dist, idx = dist[keep].view(len(query), -1), idx[keep].view(len(query), -1)
    return dist, idx


def sklearn_kmeans(x: torch.Tensor, n_clusters: int, seed: int = 0) -> np.ndarray:
    return KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(np.asarray(x.cpu(), dtype=np.float64))


def retrieval_metrics(z: np.ndarray, y: np.ndarray, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Recall@k (Euclidean on L2-normalised z, query excluded) and PML's MAP@R and precision@1."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    zt = torch.nn.functional.normalize(torch.as_tensor(z, dtype=torch.float32), dim=1)
    yt = torch.as_tensor(y)
    _, idx = sklearn_knn(zt, max(ks), zt, ref_includes_query=True)
    hit = yt[idx] == yt[:, None]
    out = {f"recall_at_{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        device=torch.device("cpu"),
        knn_func=sklearn_knn,
        kmeans_func=sklearn_kmeans,
    )
    pml = calc.get_accuracy(zt, yt)
    out["map_at_r"] = float(pml["mean_average_precision_at_r"])
    out["pml_precision_at_1"] = float(pml["precision_at_1"])
    return out


@dataclass(frozen=True)
class EmbeddingReport:
    """One schema for every representation method's evaluation."""

    linear_probe_acc: float
    knn_acc: float
    nmi: float
    ari: float
    recall_at_1: float
    recall_at_2: float
    recall_at_4: float
    recall_at_8: float
    map_at_r: float
    rankme: float
    num_train: int
    num_test: int
    dim: int

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def zero_shot_metrics(z: torch.Tensor | np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Label-free-training scores of one set of embeddings: k-means NMI/ARI and retrieval among themselves
    (the zero-shot retrieval protocol when `z` holds classes unseen in training)."""
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    clusters = sklearn_kmeans(torch.from_numpy(z), len(np.unique(y)), seed)
    return {
        "nmi": float(normalized_mutual_info_score(y, clusters)),
        "ari": float(adjusted_rand_score(y, clusters)),
        **retrieval_metrics(z, y),
    }


def evaluate_embeddings(
    train_z: torch.Tensor | np.ndarray,
    train_y: np.ndarray,
    test_z: torch.Tensor | np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
) -> EmbeddingReport:
    """Linear probe and k-NN (fit on train, scored on test); clustering, retrieval and RankMe on test."""
    tr, te = np.asarray(train_z, dtype=np.float64), np.asarray(test_z, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    unseen = zero_shot_metrics(te, test_y, seed)
    return EmbeddingReport(
        linear_probe_acc=linear_probe_accuracy(tr, train_y, te, test_y),
        knn_acc=knn_accuracy(tr, train_y, te, test_y),
        nmi=unseen["nmi"],
        ari=unseen["ari"],
        **{f"recall_at_{k}": unseen[f"recall_at_{k}"] for k in RECALL_AT},
        map_at_r=unseen["map_at_r"],
        rankme=rankme(torch.from_numpy(te)),
        num_train=len(tr),
        num_test=len(te),
        dim=te.shape[1],
    )


def embedding_figure(z: np.ndarray, y: np.ndarray, title: str = "", method: str = "tsne", seed: int = 0) -> Figure:
    """2-D map of the embeddings coloured by class: t-SNE (PCA-initialised) or plain PCA.

    At most `MAX_PLOTTED` points (a seeded sample): t-SNE costs seconds per thousand points.
    """
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    if len(z) > MAX_PLOTTED:
        keep = np.random.default_rng(seed).choice(len(z), MAX_PLOTTED, replace=False)
        z, y = z[keep], y[keep]
    if method == "tsne" and len(z) > 5:
        xy = TSNE(2, perplexity=min(30.0, (len(z) - 1) / 3), init="pca", random_state=seed).fit_transform(z)
    else:
        xy = PCA(2, random_state=seed).fit_transform(z)
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    points = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=6)
    ax.legend(*points.legend_elements(), fontsize=6, title="class", loc="best", markerscale=0.7)
    ax.set(xticks=[], yticks=[], title=title or f"{method.upper()} of the embeddings")
    return fig
