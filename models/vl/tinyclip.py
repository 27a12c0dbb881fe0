"""TinyCLIP: a `transformers.CLIPModel` small enough to pretrain on CPU, and its caption tokenizer.

The architecture is CLIP's (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"): a ViT over 8×8 patches of a 32×32 image (16 patches + a class token,
pooled at the class token after a LayerNorm) and a causal text transformer over at most 24 tokens,
pooled at the end-of-text token, each followed by a linear projection to a shared space where
cosine similarity times exp(t) (t learned, initialised at ln(1/0.07)) scores an image–text pair.

The tokenizer is the LLM kit's byte-level BPE (`models.llm.tokenizer.train_tokenizer`) trained on
captions; a text is its tokens then one `<|endoftext|>` (no start token), and the config's
`eos_token_id` is that token's id, so transformers pools at the first end token, which is where
CLIP pools. Padding uses `<|pad|>` after it (the causal mask keeps padding out of the pooled state).

| size  | width | layers | heads | projection | parameters |
|-------|-------|--------|-------|------------|------------|
| micro | 32    | 1      | 2     | 32         | ≈ 0.05 M (unit tests) |
| tiny  | 96    | 3      | 4     | 96         | ≈ 0.75 M (the pretrained model) |
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from models.llm.tokenizer import encode_documents, load_tokenizer, save_tokenizer, train_tokenizer
from models.vl.scenes import IMAGE_SIZE

PATCH = 8
CONTEXT = 24
SizeName = Literal["micro", "tiny"]


@dataclass(frozen=True)
class TinyClipSize:
    width: int
    layers: int
    heads: int
    projection: int


SIZES: dict[str, TinyClipSize] = {"micro": TinyClipSize(32, 1, 2, 32), "tiny": TinyClipSize(96, 3, 4, 96)}


@dataclass
class TinyClip:
    model: CLIPModel
    tokenizer: PreTrainedTokenizerFast


def caption_tokenizer(captions: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE over captions: with 512 symbols every caption word is one token."""
    return train_tokenizer(captions, vocab_size=vocab_size, model_max_length=CONTEXT)


def clip_config(size: SizeName, tokenizer: PreTrainedTokenizerFast) -> CLIPConfig:
    shape = SIZES[size]
    tower = {
        "hidden_size": shape.width,
        "intermediate_size": 4 * shape.width,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
    }
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    text = {**tower, "vocab_size": len(tokenizer), "max_position_embeddings": CONTEXT}
    text |= {"eos_token_id": eos, "bos_token_id": eos, "pad_token_id": pad}
    vision = {**tower, "image_size": IMAGE_SIZE, "patch_size": PATCH, "num_channels": 3}
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=shape.projection,
        logit_scale_init_value=math.log(1 / 0.07),
    )


def build_tinyclip(size: SizeName, tokenizer: PreTrainedTokenizerFast, seed: int) -> TinyClip:
    torch.manual_seed(seed)
    return TinyClip(CLIPModel(clip_config(size, tokenizer)).eval(), tokenizer)


def tokenize(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids [B, L] (tokens, then `<|endoftext|>`, then padding; L ≤ 24) and the attention mask."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [ids[: CONTEXT - 1] + [eos] for ids in encode_documents(tokenizer, texts)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """Scene images in [0, 1] → the model's input range [-1, 1]."""
    return images * 2 - 1


def save_tinyclip(clip: TinyClip, folder: Path) -> None:
    clip.model.save_pretrained(str(folder))
    save_tokenizer(clip.tokenizer, folder)


def load_tinyclip(folder: Path) -> TinyClip:
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return TinyClip(model.eval(), load_tokenizer(folder))
