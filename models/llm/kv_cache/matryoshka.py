"""MatryoshkaKV: trainable orthogonal projections of each head's keys and values, truncated to a per-head rank.

Paper: Lin et al., "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection" (ICLR 2025); the
reference code is `The-kamisato/MatryoshkaKV-cache` (`modeling_pcallama_trial.py`, `cal_pcallama_init.py`,
`cal_adaptive_rate.py`). Per layer and KV head, after RoPE:

    k̃ = (k − μ_K) U_K[:, :r_K],  q̃ = q U_K[:, :r_K]        (q·μ_K is constant per query: softmax ignores it)
    ṽ = (v − μ_V) U_V[:, :r_V],  o = softmax(q̃ k̃ᵀ/√d) ṽ U_V[:, :r_V]ᵀ + μ_V    (attention rows sum to 1)

so the cache holds r_K + r_V numbers per token and head instead of 2d, and at r = d the output is exactly the
original attention for any orthogonal U and any μ. U = P·C(X) with C the Cayley map (I − A/2)⁻¹(I + A/2),
A = X − Xᵀ (always orthogonal, det +1), and P the PCA basis of the calibration keys/values (columns by decreasing
variance, column 0 flipped when det P = −1), so X = 0 is the PCA initialisation. Ranks are masks over U's columns:
rank r keeps the first r (nested "Matryoshka" prefixes), so one trained U serves every rank; training draws every
head's r_K, r_V uniformly from {step, 2·step, …, d} at each step (`sample_ranks`).

Heads of a layer may have different ranks; stored tensors are as wide as the layer's largest rank with narrower
heads zero-masked, and KV bytes count Σ_h (r_K,h + r_V,h) (a ragged layout's size).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.llm.kv_cache.cache import CompressedCache, CompressedLayer

MATRYOSHKA_ATTENTION = "matryoshka-kv"


def cayley(x: torch.Tensor) -> torch.Tensor:
    """(I − A/2)⁻¹(I + A/2) with A = X − Xᵀ, batched over leading dims: an orthogonal matrix with det +1."""
    a = x - x.transpose(-1, -2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(a)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def pca_basis(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [.., d] and principal directions [.., d, d] (columns by decreasing variance, det +1) of samples
    [.., N, d]."""
    mean = samples.mean(-2)
    centred = samples - mean.unsqueeze(-2)
    cov = centred.transpose(-1, -2) @ centred / max(samples.shape[-2] - 1, 1)
    eigenvalues, vectors = torch.linalg.eigh(cov.double())
    vectors = vectors.flip(-1).to(samples.dtype)  # decreasing variance
    sign = torch.where(torch.linalg.det(vectors.double()) < 0, -1.0, 1.0).to(samples.dtype)
    vectors[..., :, 0] = vectors[..., :, 0] * sign.unsqueeze(-1)
    return mean, vectors


def rank_mask(ranks: torch.Tensor, dim: int) -> torch.Tensor:
    """[..] integer ranks → [.., dim] float masks keeping the first r columns."""
    return (torch.arange(dim, device=ranks.device) < ranks.unsqueeze(-1)).float()


class KVProjection(nn.Module):
    """Every layer's and head's U_K, U_V (PCA base × Cayley(X)) and μ_K, μ_V, plus the ranks in use."""

    def __init__(self, layers: int, heads: int, head_dim: int):
        super().__init__()
        self.shape = (layers, heads, head_dim)
        zeros = torch.zeros(layers, heads, head_dim, head_dim)
        self.x_k, self.x_v = nn.Parameter(zeros.clone()), nn.Parameter(zeros.clone())
        self.mu_k = nn.Parameter(torch.zeros(layers, heads, head_dim))
        self.mu_v = nn.Parameter(torch.zeros(layers, heads, head_dim))
        eye = torch.eye(head_dim).expand(layers, heads, head_dim, head_dim).clone()
        self.register_buffer("base_k", eye)
        self.register_buffer("base_v", eye.clone())
        full = torch.full((layers, heads), head_dim, dtype=torch.long)
        self.register_buffer("rank_k", full)
        self.register_buffer("rank_v", full.clone())

    @classmethod
    def from_pca(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVProjection:
        """PCA initialisation from per-layer calibration keys/values [N, H, T, d] (post-RoPE keys)."""
        layers, (_, heads, _, head_dim) = len(keys), keys[0].shape
        proj = cls(layers, heads, head_dim)
        with torch.no_grad():
            for i, (k, v) in enumerate(zip(keys, values)):
                for samples, mu, base in ((k, proj.mu_k, proj.base_k), (v, proj.mu_v, proj.base_v)):
                    flat = samples.transpose(0, 1).reshape(heads, -1, head_dim).float()
                    mean, vectors = pca_basis(flat)
                    mu[i], base[i] = mean, vectors
        return proj

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "_bases", None) is not None:
            return self._bases
        return self.base_k @ cayley(self.x_k), self.base_v @ cayley(self.x_v)

    @contextmanager
    def cached_bases(self) -> Iterator[None]:
        """Compute U_K, U_V once for every layer's call within the block (one forward, or a no-grad evaluation)."""
        self._bases = None
        self._bases = self.bases()
        try:
            yield
        finally:
            self._bases = None

    def set_ranks(self, rank_k: torch.Tensor | int, rank_v: torch.Tensor | int) -> None:
        self.rank_k.copy_(torch.as_tensor(rank_k).expand_as(self.rank_k))
        self.rank_v.copy_(torch.as_tensor(rank_v).expand_as(self.rank_v))

    def sample_ranks(self, step: int, generator: torch.Generator) -> None:
        """Matryoshka rank sampling: every head's r_K and r_V uniform on {step, 2·step, …, d}."""
        levels = self.shape[2] // step
        draw = lambda: torch.randint(1, levels + 1, self.rank_k.shape, generator=generator) * step  # noqa: E731
        self.set_ranks(draw(), draw())

    def kv_fraction(self) -> float:
        """Σ (r_K + r_V) / (2·layers·heads·d): the cache's size relative to the dense one."""
        return float((self.rank_k.sum() + self.rank_v.sum()) / (2 * math.prod(self.shape)))

    def layer(self, idx: int, u_k: torch.Tensor | None = None, u_v: torch.Tensor | None = None) -> dict[str, Any]:
        if u_k is None:
            u_k, u_v = self.bases()
        d = self.shape[2]
        return {
            "u_k": u_k[idx],
            "u_v": u_v[idx],
            "mu_k": self.mu_k[idx],
            "mu_v": self.mu_v[idx],
            "mask_k": rank_mask(self.rank_k[idx], d),
            "mask_v": rank_mask(self.rank_v[idx], d),
            "width_k": int(self.rank_k[idx].max()),
            "width_v": int(self.rank_v[idx].max()),
        }


def project_kv(p: dict[str, Any], key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k̃, ṽ [B, H, T, width] (masked beyond each head's rank, cut to the layer's widest rank)."""
    k = ((key - p["mu_k"][:, None]) @ p["u_k"]) * p["mask_k"][:, None]
    v = ((value - p["mu_v"][:, None]) @ p["u_v"]) * p["mask_v"][:, None]
    return k[..., : p["width_k"]], v[..., : p["width_v"]]


def _projection(module: nn.Module) -> KVProjection:
    projection = module.__dict__.get("kv_projection")
    if projection is None:
        raise RuntimeError("matryoshka-kv attention needs a KVProjection: use `attach(model, projection)`")
    return projection


def matryoshka_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    kv_projected: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` function: projects k, v (unless a `ProjectedLayer` cache already did) and q, attends
    in the r-dim spaces, and maps the output back (module docstring). The parameter order is transformers' own
    (dropout sixth): kvpress wraps every registered attention function and passes dropout positionally."""
    p = _projection(module).layer(module.layer_idx)
    if not kv_projected:
        key, value = project_kv(p, key, value)
    groups = query.shape[1] // key.shape[1]
    u_k = p["u_k"][..., : key.shape[-1]].repeat_interleave(groups, dim=0)
    u_v = p["u_v"][..., : value.shape[-1]].repeat_interleave(groups, dim=0)
    q = query @ u_k
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n, m = q.shape[-2], key.shape[-2]
    if attention_mask is None:
        out = (
            F.scaled_dot_product_attention(q, key, value, scale=scale, is_causal=n > 1 and n == m)
            if n in (1, m)
            else F.scaled_dot_product_attention(
                q, key, value, scale=scale, attn_mask=torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
            )
        )
    else:
        out = F.scaled_dot_product_attention(q, key, value, scale=scale, attn_mask=attention_mask[..., :m])
    out = out @ u_v.transpose(-1, -2) + p["mu_v"].repeat_interleave(groups, dim=0)[:, None]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(MATRYOSHKA_ATTENTION, matryoshka_attention)
AttentionMaskInterface.register(MATRYOSHKA_ATTENTION, sdpa_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    inner = model.model if hasattr(model, "model") else model
    return [layer.self_attn for layer in inner.layers]


def attach(model: nn.Module, projection: KVProjection | None) -> None:
    """Give every attention module the projection (outside its parameters, so the model's state dict is unchanged)."""
    for module in attention_modules(model):
        module.__dict__["kv_projection"] = projection


@contextmanager
def projected(model: nn.Module, projection: KVProjection) -> Iterator[nn.Module]:
    """Run the model with MatryoshkaKV attention under `projection`, then restore its attention."""
    previous = model.config._attn_implementation
    attach(model, projection)
    model.set_attn_implementation(MATRYOSHKA_ATTENTION)
    try:
        with projection.cached_bases():
            yield model
    finally:
        model.set_attn_implementation(previous)
        attach(model, None)


class ProjectedLayer(CompressedLayer):
    """A cache layer that stores k̃, ṽ (the layer's widest rank wide) and tells the attention they are projected."""

    def __init__(self, projection: KVProjection, layer_idx: int):
        super().__init__()
        self.projection, self.layer_idx = projection, layer_idx
        self.widths = (int(projection.rank_k[layer_idx].sum()), int(projection.rank_v[layer_idx].sum()))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = project_kv(self.projection.layer(self.layer_idx), key_states, value_states)
        forward_kwargs = kwargs.get("kwargs")
        if isinstance(forward_kwargs, dict):
            forward_kwargs["kv_projected"] = True
        return super().update(k, v)

    def kv_bytes(self) -> int:
        if self.keys is None or self.keys.numel() == 0:
            return 0
        b, _, t, _ = self.keys.shape
        return b * t * (self.widths[0] + self.widths[1]) * self.keys.element_size()


class ProjectedCache(CompressedCache):
    """The MatryoshkaKV cache: one `ProjectedLayer` per decoder layer (use with `projected(model, projection)`)."""

    def __init__(self, projection: KVProjection):
        super().__init__()
        self.layer_class_to_replicate = None
        self.layers = [ProjectedLayer(projection, i) for i in range(projection.shape[0])]


PROJECTION_FILE = "kv_projection.safetensors"
RANKS_FILE = "kv_ranks.json"


def save_projection(
    folder, projection: KVProjection, rank_tables: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Write the projection (safetensors) and the per-budget rank tables (JSON, keyed by KV fraction) into a model
    folder, so a deployment of that folder can serve `kv_cache: matryoshka-kv`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().contiguous() for k, v in projection.state_dict().items()}
    save_file(tensors, str(folder / PROJECTION_FILE), metadata={"shape": json.dumps(list(projection.shape))})
    tables = {key: {"rank_k": rk.tolist(), "rank_v": rv.tolist()} for key, (rk, rv) in rank_tables.items()}
    (folder / RANKS_FILE).write_text(json.dumps(tables, indent=1))


def load_projection(folder) -> tuple[KVProjection, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The projection and rank tables `save_projection` wrote (FileNotFoundError when the folder has none)."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    with safe_open(str(folder / PROJECTION_FILE), framework="pt") as handle:
        shape = json.loads(handle.metadata()["shape"])
    projection = KVProjection(*shape)
    projection.load_state_dict(load_file(str(folder / PROJECTION_FILE)))
    tables = {}
    if (folder / RANKS_FILE).is_file():
        for key, row in json.loads((folder / RANKS_FILE).read_text()).items():
            tables[key] = (torch.tensor(row["rank_k"]), torch.tensor(row["rank_v"]))
    return projection, tables
