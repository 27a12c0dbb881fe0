"""ThinK: query-driven pruning of key channels (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven
Pruning", arXiv 2407.21018), alone or on top of a token-eviction press (ThinK + SnapKV is the paper's main setting).

ThinK shrinks the key cache along the channel axis instead of the token axis. Per layer and KV head, channel c of
the keys is scored by how much it can contribute to the attention logits of the most recent queries (Sec. 3.2):

    score[c] = ‖Q_obs[:, c] K[:, c]ᵀ‖_F = ‖Q_obs[:, c]‖ · ‖K[:, c]‖,

with Q_obs the post-RoPE queries of the last `window` prompt tokens (the observation window, as SnapKV's). The
⌊λ·d⌋ lowest-scored channels are pruned: their key entries are never read again, so q·k over a pruned channel is
0. We store the pruned entries as zeros (kvpress's `ThinKPress` does the same, so attention needs no change) and
count only the kept d − ⌊λ·d⌋ channels as bytes, which is what the paper's layout stores (plus a d-bit channel
mask per head, which we do not count). With grouped queries, the query term is the root-mean-square over the
heads of the group (kvpress averages the squared norms the same way), which for one query head per KV head is
the paper's norm product up to a constant factor that does not change the ranking.

Reference-code choices followed: the paper's code (SalesforceAIResearch/ThinK) leaves the keys of the last
`recent` slots (the observation window) and every key written after prefill unpruned; `recent=0` prunes every
prefill slot, which is kvpress's behaviour and what `tests/unit/test_think.py` compares against kvpress 0.5.5's
`ThinKPress.compress` (channel selection and masked keys). With a token press, ThinK scores the keys that press
kept, the order of kvpress's `ComposedPress([SnapKVPress, ThinKPress])`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.llm.kv_cache.press import Compressed, Press


def channel_scores(window_queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ThinK's score of every key channel, [B, H_kv, d]: RMS of the window queries' channel c (over the window and
    the query heads of the KV group) times RMS of the keys' channel c (over the valid slots)."""
    b, h_kv, _, d = keys.shape
    q2 = window_queries.float().pow(2).mean(dim=2)  # [B, H_q, d]
    q2 = q2.view(b, h_kv, -1, d).mean(2)
    if valid is None:
        k2 = keys.float().pow(2).mean(dim=2)
    else:
        w = valid.float().unsqueeze(-1)
        k2 = (keys.float().pow(2) * w).sum(2) / w.sum(2).clamp_min(1)
    return (q2 * k2).sqrt()


def pruned_channels(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ⌊ratio·d⌋ lowest-scored channels per head, [B, H_kv, n_pruned] (kvpress's count)."""
    n_pruned = int(scores.shape[-1] * ratio)
    return scores.topk(n_pruned, dim=-1, largest=False).indices


def zero_channels(keys: torch.Tensor, channels: torch.Tensor, slots: int) -> torch.Tensor:
    """A copy of `keys` with `channels` [B, H, n] zeroed in the first `slots` slots of each head."""
    out = keys.clone()
    index = channels.unsqueeze(2).expand(-1, -1, slots, -1)
    out[:, :, :slots] = out[:, :, :slots].scatter(-1, index, 0.0)
    return out


@dataclass
class ThinK:
    """Prune a fraction `ratio` (the paper's λ) of each head's key channels after `tokens` (a token press, or None
    for channel pruning alone) has chosen the slots. `recent` trailing slots keep all channels."""

    ratio: float
    window: int = 8
    recent: int = 8
    tokens: Press | None = None
    needs_queries = True

    @property
    def needs_attention(self) -> bool:
        return self.tokens is not None and self.tokens.needs_attention

    def compress(
        self,
        module: nn.Module,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> Compressed:
        kept = (
            self.tokens.compress(module, keys, values, attention)
            if self.tokens is not None
            else Compressed(keys, values)
        )
        if self.ratio <= 0:
            return kept
        if kept.valid is not None and self.recent:
            raise ValueError("ThinK keeps recent slots whole only over a token press without head-wise padding")
        if queries is None:
            raise ValueError("ThinK scores channels with the prompt's queries (the hook passes them)")
        scores = channel_scores(queries[..., -self.window :, :], kept.keys, kept.valid)
        channels = pruned_channels(scores, self.ratio)
        slots = max(kept.keys.shape[2] - self.recent, 0)
        return Compressed(
            zero_channels(kept.keys, channels, slots),
            kept.values,
            kept.valid,
            key_channels=kept.keys.shape[-1] - channels.shape[-1],
            narrow_slots=slots,
        )
