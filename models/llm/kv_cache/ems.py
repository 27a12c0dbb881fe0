"""EMS-style head-wise evict-then-merge KV compression with a global-local importance score.

Paper: Li, Li, Meng, Ma, Geng, Xia and Wang, "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache
Compression Based on Global-Local Importance" (arXiv 2412.08521); no reference code is public. Only its abstract
and third-party descriptions of it (the ICLR 2025 reviews of the submission, and the EMS column of a related-work
table in a kvpress pull request) could be read; everything marked [R] below is our reconstruction, not the paper's
equations, and the method is called "EMS-style" wherever results are reported.

Per layer and KV head, with A the causal softmax attention of the T prompt tokens (`press.prefill_attention`):

1. Global-Local score (paper: combines attention accumulated from global and local tokens; the two statistics are
   mean-aligned before they are combined).
   [R] s_Glo[j] = Σ_i A[i,j] / (T − j) (H2O's accumulated attention divided by the number of queries that see j,
   which removes the causal-mask bias toward early tokens — kvpress's `ObservedAttentionPress`);
   [R] s_Loc[j] = SnapKV's observation-window score (last `window` queries, pooled with width `kernel`);
   [R] s_GL = s_Glo · mean(s_Loc)/mean(s_Glo) + s_Loc over the tokens before the window.
2. [R] The last `window` tokens are always kept; the top budget − window tokens by s_GL are kept as class centres.
3. Evict-then-merge of the remaining R = T − budget tokens (paper: per head, irrelevant tokens are evicted,
   to-be-merged tokens merge into class centres, a token unlike every centre goes to the "zero class"; heads differ
   in sparsity and redundancy, so each head evicts and merges different numbers).
   [R] Head sparsity σ_h = share of the candidates' s_GL mass held by the centres; the round(σ_h·R) lowest-scored
   remaining tokens are irrelevant (sparse heads evict more).
   [R] Each other token t joins the centre c* = argmax_c cos(K_t, K_c) when cos(K_t,K_c*)·cos(V_t,V_c*) ≥ tau
   (the reviewers' key×value redundancy), else the zero class (redundant heads merge more).
   [R] A centre's value becomes the s_GL-weighted mean of its own and its members' values (a convex combination);
   its key the s_GL-weighted mean of the key directions, rescaled to the centre's own key norm ("keys normalised,
   norms stored separately").
4. Zero class (paper: head-wise parallel compression): slot 0 is a discard bin; every head's evictions and merges
   are one batched `scatter_add` into [1 + centres] slots, and slot 0 is dropped — so all heads run as one tensor
   op however they split their tokens. Every head ends with exactly `budget` slots.

Defaults are ours (the paper's were not readable): window 8 and kernel 5 (SnapKV's pooling), tau 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.llm.kv_cache.press import Compressed, gather_slots
from models.llm.kv_cache.presses import observed_attention_scores, window_scores


def global_local_scores(attention: torch.Tensor, window: int, kernel: int, kv_heads: int) -> torch.Tensor:
    """s_GL of the T − window tokens before the observation window, [B, H_kv, T − window] (step 1)."""
    glo = observed_attention_scores(attention, kv_heads)[..., :-window]
    loc = window_scores(attention, window, kernel, kv_heads)
    align = loc.mean(-1, keepdim=True) / glo.mean(-1, keepdim=True).clamp_min(1e-30)
    return glo * align + loc


def evict_then_merge(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, centres: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2–4 over the candidates (the tokens before the window): keys/values [B, H, C, d], scores [B, H, C].
    Returns the centres' merged keys and values [B, H, centres, d] (in position order) and each candidate's class
    [B, H, C] (0 = zero class, i = centre i − 1)."""
    b, h, c, _ = keys.shape
    order = scores.argsort(dim=-1, descending=True)
    centre_idx = order[..., :centres].sort(dim=-1).values
    rest_idx = order[..., centres:]  # descending score
    weight = scores.clamp_min(0)
    sigma = weight.gather(-1, centre_idx).sum(-1) / weight.sum(-1).clamp_min(1e-30)  # [B, H]
    n_rest = c - centres
    n_irrelevant = (sigma * n_rest).round().long()
    irrelevant = torch.arange(n_rest, device=keys.device) >= (n_rest - n_irrelevant).unsqueeze(-1)

    k_c, v_c = gather_slots(keys, centre_idx), gather_slots(values, centre_idx)
    k_r, v_r = gather_slots(keys, rest_idx), gather_slots(values, rest_idx)
    cos_k = F.normalize(k_r, dim=-1) @ F.normalize(k_c, dim=-1).transpose(-1, -2)  # [B, H, R, centres]
    cos_v = F.normalize(v_r, dim=-1) @ F.normalize(v_c, dim=-1).transpose(-1, -2)
    best = cos_k.argmax(dim=-1, keepdim=True)
    similarity = (cos_k * cos_v).gather(-1, best).squeeze(-1)
    rest_class = torch.where(irrelevant | ~(similarity >= tau), 0, best.squeeze(-1) + 1)

    classes = torch.zeros(b, h, c, dtype=torch.long, device=keys.device)
    classes.scatter_(-1, centre_idx, torch.arange(1, centres + 1, device=keys.device).expand(b, h, centres))
    classes.scatter_(-1, rest_idx, rest_class)

    # one batched scatter for every head: slot 0 is the zero class, dropped afterwards
    w = weight.unsqueeze(-1)
    slots = centres + 1
    index = classes.unsqueeze(-1)
    mass = torch.zeros(b, h, slots, 1, dtype=w.dtype, device=keys.device).scatter_add_(2, index, w)
    v_sum = torch.zeros(b, h, slots, values.shape[-1], dtype=w.dtype, device=keys.device)
    v_sum.scatter_add_(2, index.expand(-1, -1, -1, values.shape[-1]), w * values.to(w.dtype))
    k_sum = torch.zeros(b, h, slots, keys.shape[-1], dtype=w.dtype, device=keys.device)
    k_sum.scatter_add_(2, index.expand(-1, -1, -1, keys.shape[-1]), w * F.normalize(keys, dim=-1).to(w.dtype))
    centre_mass = mass[:, :, 1:]
    merged_v = torch.where(centre_mass > 0, v_sum[:, :, 1:] / centre_mass.clamp_min(1e-30), v_c.to(w.dtype))
    direction = torch.where(centre_mass > 0, F.normalize(k_sum[:, :, 1:], dim=-1), F.normalize(k_c, dim=-1))
    merged_k = direction * k_c.norm(dim=-1, keepdim=True)
    return merged_k.to(keys.dtype), merged_v.to(values.dtype), classes


@dataclass
class EMS:
    """The EMS-style press (module docstring): every KV head keeps exactly `budget` slots."""

    budget: int
    window: int = 8
    kernel: int = 5
    tau: float = 0.5
    needs_attention = True

    def compress(
        self, module: nn.Module, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None
    ) -> Compressed:
        t = keys.shape[2]
        if t <= self.budget:
            return Compressed(keys, values)
        window = min(self.window, self.budget)
        if window == self.budget:  # no room for centres: everything before the window goes to the zero class
            return Compressed(keys[:, :, -window:], values[:, :, -window:])
        scores = global_local_scores(attention, window, self.kernel, keys.shape[1])
        k, v, _ = evict_then_merge(keys[:, :, :-window], values[:, :, :-window], scores, self.budget - window, self.tau)
        return Compressed(torch.cat([k, keys[:, :, -window:]], dim=2), torch.cat([v, values[:, :, -window:]], dim=2))
