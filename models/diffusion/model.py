"""The small prompt-conditioned diffusion model and its folder format.

A model is a diffusers `UNet2DConditionModel` (cross-attention at 8×8 and 4×4) fed by a tiny
prompt encoder (one learned 32-d embedding per token slot plus a slot position, LayerNorm'd), the
stand-in for a text encoder. A model folder is diffusers-style:

    unet/                 `UNet2DConditionModel.save_pretrained` (config.json + safetensors)
    scheduler/            the training `DDPMScheduler`'s scheduler_config.json
    prompt_encoder/       our encoder: config.json + model.safetensors
    crucible-diffusion.json   what the sampling core needs to validate a request

`load_parts` reads such a folder back, and any local diffusers folder with `unet/` and
`scheduler/` too. A Stable Diffusion folder (`text_encoder/` + `tokenizer/` + `vae/`, as
`StableDiffusionPipeline.save_pretrained` writes it) loads its own CLIP text encoder as the prompt
encoder (text prompts, "" as the unconditional prompt) and samples in the VAE's latent space, decoding
at the end — the same sampling core, so a GPU deployment serves a real SD checkpoint with every
guidance rule. A folder with neither encoder loads with `prompt_encoder=None` (then only
unconditional sampling is possible). Nothing is fetched from the hub: every `from_pretrained` call is
`local_files_only`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from models.diffusion.data import IMAGE_SIZE, NULL, VOCAB

INFO_FILE = "crucible-diffusion.json"


class PromptEncoder(nn.Module):
    """Token ids [B, S] → encoder hidden states [B, S, dim] for the U-Net's cross-attention."""

    def __init__(self, vocab: tuple[int, ...] = VOCAB, dim: int = 32):
        super().__init__()
        self.config = {"vocab": list(vocab), "dim": dim}
        self.slots = nn.ModuleList(nn.Embedding(v, dim) for v in vocab)
        self.position = nn.Parameter(torch.zeros(len(vocab), dim))
        self.norm = nn.LayerNorm(dim)

    @property
    def null_tokens(self) -> list[int]:
        return [v - 1 for v in self.config["vocab"]]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.stack([emb(tokens[:, k]) for k, emb in enumerate(self.slots)], dim=1)
        return self.norm(h + self.position)


def unet_config(
    widths: tuple[int, ...] = (16, 32, 64), cross_attention_dim: int = 32, head_dim: int = 8, dropout: float = 0.0
) -> dict[str, Any]:
    """The family's base U-Net, narrowed to fit CPU training: one resnet per block, 16→8→4 px,
    cross-attention at 8×8 and 4×4 and in the middle block."""
    n = len(widths)
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(widths),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=head_dim,
        norm_num_groups=8,
        dropout=dropout,
    )


def training_scheduler() -> DDPMScheduler:
    """ε-prediction, 1000 steps, cosine ᾱ schedule (diffusers' `squaredcos_cap_v2`)."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False
    )


class TextPromptEncoder(nn.Module):
    """A pipeline's own text encoder (Stable Diffusion 1.x/2.x: CLIPTextModel + CLIPTokenizer), as
    StableDiffusionPipeline uses it: prompts padded to the tokenizer's max length, the last hidden state."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


@dataclass
class DiffusionParts:
    """A loaded model: what the sampling core needs, nothing about how it is served."""

    unet: UNet2DConditionModel
    scheduler_config: dict[str, Any]
    prompt_encoder: PromptEncoder | TextPromptEncoder | None
    info: dict[str, Any] = field(default_factory=dict)
    vae: Any = None  # a diffusers AutoencoderKL when the U-Net works in its latent space

    @property
    def text_prompts(self) -> bool:
        return isinstance(self.prompt_encoder, TextPromptEncoder)

    @property
    def null_conditioning(self) -> bool:
        """Whether the model was trained with null prompts (what CFG/APG's unconditional branch needs)."""
        return bool(self.info.get("null_prob", 0.0) > 0) and self.prompt_encoder is not None

    @property
    def cross_attention(self) -> bool:
        return self.prompt_encoder is not None and any("attn2" in n for n, _ in self.unet.attn_processors.items())

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> DiffusionParts:
        """Move every module to `device` (a job's `ctx.device`, a deployment's engine device). Random
        draws stay on CPU generators and move over, so a seed gives the same noise on any device."""
        for module in (self.unet, self.prompt_encoder, self.vae):
            if module is not None:
                module.to(device)
        return self

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.prompt_encoder is None:
            raise ValueError("this model has no prompt encoder")
        return self.prompt_encoder(tokens.to(self.device) if isinstance(tokens, torch.Tensor) else tokens)

    def eval(self) -> DiffusionParts:
        self.unet.eval()
        if self.prompt_encoder is not None:
            self.prompt_encoder.eval()
        if self.vae is not None:
            self.vae.eval()
        return self

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final samples → images in [-1, 1] (through the VAE for a latent model)."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor).sample


def new_parts(
    widths: tuple[int, ...] = (16, 32, 64), null_prob: float = 0.1, attr_drop_prob: float = 0.3, dropout: float = 0.0
) -> DiffusionParts:
    encoder = PromptEncoder()
    unet = UNet2DConditionModel(**unet_config(widths, encoder.config["dim"], dropout=dropout))
    info = {
        "format": "crucible-diffusion/1",
        "image_size": IMAGE_SIZE,
        "prompt_slots": ["digit", "colour", "thickness"],
        "null_tokens": list(NULL),
        "null_prob": null_prob,
        "attr_drop_prob": attr_drop_prob,
        "prediction_type": "epsilon",
    }
    return DiffusionParts(unet, dict(training_scheduler().config), encoder, info)


def save_parts(parts: DiffusionParts, folder: Path) -> Path:
    folder = Path(folder)
    parts.unet.save_pretrained(folder / "unet", safe_serialization=True)
    sched = DDPMScheduler.from_config(parts.scheduler_config)
    sched.save_pretrained(folder / "scheduler")
    if parts.prompt_encoder is not None:
        (folder / "prompt_encoder").mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in parts.prompt_encoder.state_dict().items()},
            str(folder / "prompt_encoder" / "model.safetensors"),
        )
        (folder / "prompt_encoder" / "config.json").write_text(json.dumps(parts.prompt_encoder.config))
    (folder / INFO_FILE).write_text(json.dumps(parts.info, indent=2))
    return folder


def load_parts(folder: Path) -> DiffusionParts:
    """Load our folder or any local diffusers folder with `unet/` and `scheduler/`."""
    folder = Path(folder)
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no unet/ inside)")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text()) if sched_file.exists() else dict(training_scheduler().config)
    encoder: PromptEncoder | TextPromptEncoder | None = None
    info = json.loads((folder / INFO_FILE).read_text()) if (folder / INFO_FILE).exists() else {}
    if (folder / "prompt_encoder" / "config.json").exists():
        cfg = json.loads((folder / "prompt_encoder" / "config.json").read_text())
        encoder = PromptEncoder(tuple(cfg["vocab"]), cfg["dim"])
        encoder.load_state_dict(load_file(str(folder / "prompt_encoder" / "model.safetensors")))
    elif (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        from transformers import AutoTokenizer, CLIPTextModel

        encoder = TextPromptEncoder(
            AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
            CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
        )
        # SD was trained with captions dropped 10% of the time: "" is its unconditional prompt, so CFG works
        info.setdefault("null_prob", 0.1)
    vae = None
    if (folder / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    info.setdefault("prediction_type", scheduler_config.get("prediction_type", "epsilon"))
    return DiffusionParts(unet, scheduler_config, encoder, info, vae).eval()
