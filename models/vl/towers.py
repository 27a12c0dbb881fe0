"""Our own loop over a CLIP tower's encoder layers, exposing hidden states and three hooks.

Without hooks it computes exactly what `CLIPModel.get_image_features` / `get_text_features` do:

    image: h⁰ = LN_pre(E_patch(x) + E_pos),  hˡ = Layerₗ(hˡ⁻¹),  f = W_v · LN_post(h^L[cls])
    text:  h⁰ = E_tok(ids) + E_pos,  hˡ = Layerₗ(hˡ⁻¹; causal mask),  f = W_t · LN_final(h^L)[eos]

(Radford et al. 2021). The hooks are the three ways parameter-efficient methods reach inside a tower:

- `prompt(l, h) → h` before layer l: deep prompts (VPT, Jia et al. 2022; MaPLe, Khattak et al. 2023;
  PromptSRC). A vision hook may append tokens (pooling stays at index 0); a text hook must keep the
  length (prompts replace placeholder tokens, as CoOp does), since pooling reads the end token's index.
- `skip(l) → bool`: layer l is not run; with an adapter, hˡ = adapter(l, hˡ⁻¹, hˡ⁻¹) (DAS,
  Wu et al. 2023: a skipped layer becomes x + Adapter(x)).
- `adapter(l, h_in, h_out) → h_out` after layer l: parallel or sequential adapters (Houlsby et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPModel


@dataclass(frozen=True)
class TowerHooks:
    prompt: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    skip: Callable[[int], bool] | None = None
    adapter: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


NO_HOOKS = TowerHooks()


@dataclass(frozen=True)
class TowerOutput:
    hidden_states: tuple[torch.Tensor, ...]  # h⁰ (the layers' input) … h^L
    pooled: torch.Tensor  # the normalised class / end-token state, before projection
    features: torch.Tensor  # the projection: what get_image_features / get_text_features return


def run_layers(
    layers: nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor | None, hooks: TowerHooks, keep_length: bool
) -> list[torch.Tensor]:
    states = [hidden]
    for index, layer in enumerate(layers):
        if hooks.prompt is not None:
            prompted = hooks.prompt(index, hidden)
            if keep_length and prompted.shape[1] != hidden.shape[1]:
                raise ValueError("a text prompt hook must keep the sequence length (replace placeholder tokens)")
            hidden = prompted
        skipped = hooks.skip is not None and hooks.skip(index)
        out = hidden if skipped else layer(hidden, mask)
        if hooks.adapter is not None:
            out = hooks.adapter(index, hidden, out)
        hidden = out
        states.append(hidden)
    return states


def encode_image(model: CLIPModel, pixel_values: torch.Tensor, hooks: TowerHooks = NO_HOOKS) -> TowerOutput:
    tower = model.vision_model
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states = run_layers(tower.encoder.layers, hidden, None, hooks, keep_length=False)
    pooled = tower.post_layernorm(states[-1][:, 0])
    return TowerOutput(tuple(states), pooled, model.visual_projection(pooled))


def text_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: causal, and no attention to padding keys."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def end_token_index(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The first end token of each row: where CLIP pools the text."""
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def encode_text(
    model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, hooks: TowerHooks = NO_HOOKS
) -> TowerOutput:
    tower = model.text_model
    hidden = tower.embeddings(input_ids=input_ids)
    mask = text_mask(attention_mask if attention_mask is not None else torch.ones_like(input_ids), hidden.dtype)
    states = run_layers(tower.encoder.layers, hidden, mask, hooks, keep_length=True)
    last = tower.final_layer_norm(states[-1])
    pooled = last[torch.arange(len(last)), end_token_index(input_ids, tower.eos_token_id)]
    return TowerOutput(tuple(states), pooled, model.text_projection(pooled))
