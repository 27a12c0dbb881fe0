"""Few-shot episodes: N-way K-shot sampling, class prototypes, and episode evaluation with a 95% CI.

An episode (Vinyals et al. 2016) draws N classes, K labelled "support" and Q "query" examples of each;
a metric-based learner classifies the queries from the support alone. Prototypical Networks (Snell,
Swersky & Zemel, NeurIPS 2017, eq. 1–2) take each class's prototype c_k = mean of its support
embeddings and score a query q by −‖f(q) − c_k‖² (a softmax over these is the episode's class posterior).

`EpisodeSampler` is a `models.training.BatchOrder`: `fit_classifier` then trains on episodes, each
laid out as [N·K support, class-major | N·Q queries, class-major], so a loss recovers the support,
the queries and their episode labels 0…N−1 from positions alone. Evaluation reports the mean episode
accuracy with the usual 95% interval 1.96·s/√n over episodes (as few-shot papers do), plus ECE and
NLL of the pooled query posteriors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class EpisodeSpec:
    way: int = 5
    shot: int = 5
    query: int = 15

    @property
    def size(self) -> int:
        return self.way * (self.shot + self.query)

    def support_labels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.arange(self.way, device=device).repeat_interleave(self.shot)

    def query_labels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.arange(self.way, device=device).repeat_interleave(self.query)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An episode's rows → (support [way, shot, D], queries [way·query, D])."""
        n_support = self.way * self.shot
        return z[:n_support].reshape(self.way, self.shot, -1), z[n_support:]


def sample_episode(by_class: list[torch.Tensor], spec: EpisodeSpec, generator: torch.Generator) -> torch.Tensor:
    """Indices of one episode: `spec.way` of the classes, `shot + query` distinct examples of each."""
    if len(by_class) < spec.way:
        raise ValueError(f"a {spec.way}-way episode needs {spec.way} classes, the pool has {len(by_class)}")
    chosen = torch.randperm(len(by_class), generator=generator)[: spec.way]
    rows = []
    for c in chosen.tolist():
        members = by_class[c]
        if len(members) < spec.shot + spec.query:
            raise ValueError(f"class {c} has {len(members)} examples, an episode needs {spec.shot + spec.query}")
        rows.append(members[torch.randperm(len(members), generator=generator)[: spec.shot + spec.query]])
    rows_t = torch.stack(rows)  # [way, shot + query]
    return torch.cat([rows_t[:, : spec.shot].reshape(-1), rows_t[:, spec.shot :].reshape(-1)])


def indices_by_class(y: torch.Tensor) -> list[torch.Tensor]:
    y = y.cpu()
    return [torch.nonzero(y == c).squeeze(1) for c in torch.unique(y).tolist()]


@dataclass(frozen=True)
class EpisodeSampler:
    """`episodes` random episodes per epoch from the train split (a `BatchOrder`; `batch_size` is unused)."""

    spec: EpisodeSpec
    episodes: int

    def __call__(self, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        by_class = indices_by_class(y)
        return [sample_episode(by_class, self.spec, generator).to(y.device) for _ in range(self.episodes)]


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i − b_j‖² [len(a), len(b)] by explicit differences (exact, unlike the ‖a‖²+‖b‖²−2ab expansion)."""
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def prototype_logits(
    support: torch.Tensor, queries: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits −‖q − c_k‖²/T [Q, way], prototypes c_k = support mean [way, D])."""
    prototypes = support.mean(dim=1)
    return -squared_distances(queries, prototypes) / temperature, prototypes


@dataclass
class EpisodeEvaluation:
    accuracies: np.ndarray  # one per episode
    logits: torch.Tensor  # all queries' logits, [episodes·way·query, way]
    labels: torch.Tensor  # their episode labels

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        return mean_ci95(self.accuracies)[1]


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """(mean, half-width 1.96·s/√n) — the few-shot literature's interval over test episodes."""
    values = np.asarray(values, dtype=np.float64)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


@torch.no_grad()
def evaluate_episodes(
    z: torch.Tensor, y: torch.Tensor, spec: EpisodeSpec, episodes: int, seed: int, temperature: float = 1.0
) -> EpisodeEvaluation:
    """ProtoNet classification of `episodes` episodes drawn (generator seeded by `seed`, so every model
    scored with the same seed sees the same episodes) from precomputed embeddings `z` with labels `y`."""
    generator = torch.Generator().manual_seed(seed)
    by_class = indices_by_class(y)
    target = spec.query_labels(z.device)
    accs, all_logits = [], []
    for _ in range(episodes):
        support, queries = spec.split(z[sample_episode(by_class, spec, generator).to(z.device)])
        logits, _ = prototype_logits(support, queries, temperature)
        accs.append((logits.argmax(1) == target).float().mean().item())
        all_logits.append(logits)
    return EpisodeEvaluation(np.array(accs), torch.cat(all_logits), target.repeat(episodes))
