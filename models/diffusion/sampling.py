"""The one sampling core: model × scheduler × guidance rule × attention processor, per request.

Jobs (reproductions, sample grids) and the image endpoint call the same function:

    result = sample(parts, SampleRequest(prompt=[3, None, None], guidance=GuidanceSpec("apg", 8.0)))

Each step runs one batched forward of the U-Net on [x_t, x_t] with [prompt, negative-or-null]
conditioning, converts both outputs to clean-image predictions D (the APG paper's space), applies
the guidance rule, converts the guided D back to the model's own parameterisation and hands it to
the diffusers scheduler's `step`. Schedulers whose input is scaled (Euler, Heun: x/√(σ²+1)) are
handled by reading ᾱ = 1/(1+σ²) from the scheduler's σ; the others read ᾱ_t from `alphas_cumprod`.

Everything a request changes lives in objects made for that request (the scheduler instance, the
guidance state with APG's momentum buffer, the attention processors are set per call and restored),
so two requests never share state. Invalid combinations raise `SamplingRequestError` subclasses
that name the offending parameter, for the endpoint to map to 4xx problem bodies.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from models.diffusion.data import COLOURS, THICKNESS
from models.diffusion.guidance import GUIDANCE_RULES, GuidanceSpec
from models.diffusion.model import DiffusionParts
from models.diffusion.one_step import OneStep

SAMPLERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
}
_SIGMA_SCALED = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)
_SECOND_ORDER = ("heun",)  # two model evaluations per step would advance APG's momentum twice


def _nasa(parts: DiffusionParts, request: SampleRequest) -> Any:
    """SNOOPI's NASA on the cross-attention layers: the negative prompt is subtracted in attention."""
    from models.diffusion.nasa import DEFAULT_ALPHA, NASAProcessor

    with torch.no_grad():
        negative = encode_prompts(parts, [(request.negative_prompt, "negative_prompt")])
    return NASAProcessor(negative, request.attention_params.get("alpha", DEFAULT_ALPHA))


# name → factory(parts, request) of the processor for the U-Net's cross-attention layers (attn2);
# "standard" keeps the model's own processors. A negative prompt goes to the unconditional branch
# with "standard" and into the attention layers with "nasa".
ATTENTION_PROCESSORS: dict[str, Callable[[DiffusionParts, SampleRequest], Any] | None] = {
    "standard": None,
    "nasa": _nasa,
}

_WORD_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class SamplingRequestError(ValueError):
    """A request the model cannot serve; `param` names the offending request field."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


class UnknownSamplerError(SamplingRequestError):
    pass


class UnsupportedGuidanceError(SamplingRequestError):
    """A guidance rule the model cannot use (e.g. CFG on a model trained without null prompts)."""


class UnsupportedNegativePromptError(SamplingRequestError):
    """A negative prompt for a model without prompt cross-attention, or with no rule that uses it."""


class InvalidPromptError(SamplingRequestError):
    pass


Prompt = Sequence[int | None] | str | None


@dataclass(frozen=True)
class SampleRequest:
    """One sampling request. `prompt`: token ids [digit, colour, thickness] (None = null slot), a
    string such as "red bold 3", or None (unconditional). Image i uses seed `seed + i`."""

    prompt: Prompt = None
    negative_prompt: Prompt = None
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    sampler: str = "ddim"
    steps: int = 30
    seed: int = 0
    n: int = 4
    attention: str = "standard"
    attention_params: dict[str, float] = field(default_factory=dict)
    max_batch: int = 256
    height: int | None = None  # pixels; None: the model's native size (a latent model draws others too)
    width: int | None = None


@dataclass
class SampleResult:
    images: torch.Tensor  # [n, C, H, W] in [0, 1], clipped
    raw: torch.Tensor  # the final samples in pixel space (decoded by the VAE of a latent model), before clipping
    seeds: list[int]
    diff_norm: list[float]  # per step: mean ‖ΔD̄‖ (APG) — empty for other rules
    parallel_fraction: list[float]  # per step: mean ‖Δ∥‖/‖ΔD̄‖ (APG)


def parse_prompt(prompt: Prompt, null: Sequence[int], field_name: str = "prompt") -> list[int]:
    """Token ids from ids or words ("a red bold 3", "seven"); unknown words are an error."""
    if prompt is None:
        return list(null)
    if isinstance(prompt, str):
        tokens = list(null)
        for word in re.findall(r"[a-z0-9]+", prompt.lower()):
            if word in ("a", "an", "the", "digit", "number", "in", "of"):
                continue
            if word.isdigit() and len(word) == 1:
                tokens[0] = int(word)
            elif word in _WORD_DIGITS:
                tokens[0] = _WORD_DIGITS.index(word)
            elif word in COLOURS:
                tokens[1] = COLOURS.index(word)
            elif word in THICKNESS:
                tokens[2] = THICKNESS.index(word)
            else:
                raise InvalidPromptError(
                    field_name,
                    f"unknown word {word!r}; use a digit 0-9, a colour {COLOURS} and a thickness {THICKNESS}",
                )
        return tokens
    ids = list(prompt)
    if len(ids) != len(null):
        raise InvalidPromptError(field_name, f"expected {len(null)} token ids, got {len(ids)}")
    out = []
    for k, (tok, nk) in enumerate(zip(ids, null)):
        if tok is None:
            out.append(nk)
        elif isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok <= nk:
            raise InvalidPromptError(field_name, f"slot {k} must be an int in [0, {nk}] or null, got {tok!r}")
        else:
            out.append(tok)
    return out


def encode_prompts(parts: DiffusionParts, prompts: Sequence[tuple[Prompt, str]]) -> torch.Tensor:
    """[len(prompts), S, D] conditioning for (prompt, field name) pairs: slot tokens through our prompt
    encoder, or text through a pipeline's own text encoder (None → "", SD's unconditional prompt)."""
    if parts.text_prompts:
        texts = []
        for prompt, name in prompts:
            if prompt is not None and not isinstance(prompt, str):
                raise InvalidPromptError(name, "this model's text encoder takes a text prompt, not token ids")
            texts.append(prompt or "")
        return parts.encode(texts)
    null = parts.prompt_encoder.null_tokens
    return parts.encode(torch.tensor([parse_prompt(prompt, null, name) for prompt, name in prompts]))


def validate(parts: DiffusionParts, request: SampleRequest) -> None:
    """Raise the specific error for a request this model cannot serve."""
    g = request.guidance
    if request.sampler not in SAMPLERS:
        raise UnknownSamplerError("sampler", f"unknown sampler {request.sampler!r}; known: {sorted(SAMPLERS)}")
    if g.name not in GUIDANCE_RULES:
        raise UnsupportedGuidanceError("guidance", f"unknown rule {g.name!r}; known: {GUIDANCE_RULES}")
    if g.needs_uncond and not parts.null_conditioning:
        raise UnsupportedGuidanceError(
            "guidance",
            f"{g.name} needs a model trained with null-prompt dropout; this one was not, use guidance 'none'",
        )
    if g.name == "apg" and request.sampler in _SECOND_ORDER:
        raise UnsupportedGuidanceError(
            "sampler",
            f"APG keeps a momentum buffer per step; the second-order "
            f"sampler {request.sampler!r} would advance it twice per step",
        )
    if not math.isfinite(g.scale) or not math.isfinite(g.eta) or not math.isfinite(g.momentum):
        raise UnsupportedGuidanceError("guidance", "scale, eta and momentum must be finite numbers")
    if request.prompt is not None and parts.prompt_encoder is None:
        raise InvalidPromptError("prompt", "this model has no prompt encoder; send no prompt")
    for name, prompt in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if parts.text_prompts and prompt is not None and not isinstance(prompt, str):
            raise InvalidPromptError(name, "this model's text encoder takes a text prompt, not token ids")
    if request.negative_prompt is not None:
        if not parts.cross_attention:
            raise UnsupportedNegativePromptError("negative_prompt", "this model has no prompt cross-attention")
        if not g.needs_uncond and request.attention == "standard":
            raise UnsupportedNegativePromptError(
                "negative_prompt",
                "a negative prompt acts through the unconditional branch; use guidance 'cfg' or 'apg'",
            )
    if request.attention not in ATTENTION_PROCESSORS:
        raise SamplingRequestError(
            "attention", f"unknown processor {request.attention!r}; known: {sorted(ATTENTION_PROCESSORS)}"
        )
    if request.attention == "nasa" and (request.negative_prompt is None or not parts.cross_attention):
        raise UnsupportedNegativePromptError(
            "negative_prompt", "NASA needs a negative prompt and a model with prompt cross-attention"
        )
    if request.steps < 1 or request.n < 1:
        raise SamplingRequestError("steps" if request.steps < 1 else "n", "must be at least 1")
    check_size(parts, request)


def vae_scale(parts: DiffusionParts) -> int:
    """Pixels per latent pixel along a side: the VAE's upsampling (1 for a model that samples in pixel space)."""
    return 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae is not None else 1


def native_size(parts: DiffusionParts) -> int:
    """The side in pixels of the images a model draws by default (its U-Net's sample size times the VAE's scale)."""
    return int(parts.unet.config.sample_size) * vae_scale(parts)


def size_step(parts: DiffusionParts) -> int:
    """What a latent model's width and height must be multiples of: the VAE's scale times the U-Net's
    downsampling (each level halves the latent; an odd size would not come back up to its own shape)."""
    return vae_scale(parts) * 2 ** (len(parts.unet.config.block_out_channels) - 1)


def check_size(parts: DiffusionParts, request: SampleRequest) -> None:
    """Width and height: any multiple of `size_step` for a latent model (as the diffusers pipelines take
    `height`/`width`); only the native size for a pixel-space model, whose U-Net was trained at that size alone
    (and a one-step student, which is one)."""
    native = native_size(parts)
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is None or value == native:
            continue
        if parts.vae is None or "one_step" in parts.info:
            raise SamplingRequestError(
                name, f"this model samples in pixel space at {native}x{native} only; leave width and height out"
            )
        step = size_step(parts)
        if value < step or value % step:
            raise SamplingRequestError(name, f"{value} is not a positive multiple of {step} (this model's size step)")


def latent_shape(parts: DiffusionParts, request: SampleRequest) -> tuple[int, int, int]:
    """(channels, height, width) of the noise the U-Net starts from."""
    size, scale = int(parts.unet.config.sample_size), vae_scale(parts)
    height = request.height // scale if request.height else size
    width = request.width // scale if request.width else size
    return int(parts.unet.config.in_channels), height, width


def make_scheduler(parts: DiffusionParts, name: str) -> Any:
    """A fresh scheduler instance (per request) of the named kind from the model's scheduler config."""
    config = dict(parts.scheduler_config)
    config["prediction_type"] = parts.info.get("prediction_type", config.get("prediction_type", "epsilon"))
    scheduler = SAMPLERS[name].from_config(config)
    return scheduler


def _alpha_bar(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    if isinstance(scheduler, _SIGMA_SCALED):
        sigma = scheduler.sigmas[scheduler.step_index].to(torch.float64)
        return 1.0 / (1.0 + sigma**2)
    return scheduler.alphas_cumprod[int(t)].to(torch.float64)


def to_clean(output: torch.Tensor, x_in: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Model output → D = x̂₀ (ε: (x − √(1−ᾱ)ε)/√ᾱ; v: √ᾱx − √(1−ᾱ)v; sample: itself)."""
    a, s = alpha_bar.sqrt().to(output.dtype), (1 - alpha_bar).sqrt().to(output.dtype)
    if prediction_type == "epsilon":
        return (x_in - s * output) / a
    if prediction_type == "v_prediction":
        return a * x_in - s * output
    return output


def from_clean(d: torch.Tensor, x_in: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The inverse of `to_clean` at the same x_t and ᾱ."""
    a, s = alpha_bar.sqrt().to(d.dtype), (1 - alpha_bar).sqrt().to(d.dtype)
    if prediction_type == "sample":
        return d
    eps = (x_in - a * d) / s
    return eps if prediction_type == "epsilon" else a * eps - s * d


@contextmanager
def attention_processor(parts: DiffusionParts, request: SampleRequest) -> Iterator[None]:
    """Install the request's cross-attention processor for the duration of one request."""
    factory = ATTENTION_PROCESSORS.get(request.attention)
    if factory is None:
        yield
        return
    before = dict(parts.unet.attn_processors)
    processor = factory(parts, request)
    parts.unet.set_attn_processor({k: (processor if k.endswith("attn2.processor") else v) for k, v in before.items()})
    try:
        yield
    finally:
        parts.unet.set_attn_processor(before)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its own seed: the initial noise and then every step's noise
    (DDPM, Euler ancestral) of image i come from generator i, as the diffusers pipelines draw them when given a
    list of generators, so image i depends only on seed + i (not on n or batching) and equals the pipeline's."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def initial_noise(
    seeds: Sequence[int] | Sequence[torch.Generator], shape: tuple[int, ...], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The starting noise [n, *shape], image i's drawn first from its own generator (`image_generators`; seeds
    are made into generators); drawn on CPU and moved to `device`, so a seed gives the same noise on any device."""
    generators = [g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(g) for g in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def _conditioning(parts: DiffusionParts, request: SampleRequest, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if parts.prompt_encoder is None:
        dim = parts.unet.config.cross_attention_dim
        zeros = torch.zeros(n, 1, dim, device=parts.device)
        return zeros, zeros
    negative = request.negative_prompt if request.attention == "standard" else None  # NASA uses it in attention
    emb = encode_prompts(parts, [(request.prompt, "prompt"), (negative, "negative_prompt")])
    return emb[0].expand(n, -1, -1), emb[1].expand(n, -1, -1)


@torch.no_grad()
def _one_step_chunk(parts: DiffusionParts, request: SampleRequest, seeds: list[int]) -> tuple[torch.Tensor, Any]:
    """A one-step student (snoopi's PG-SB / SwiftBrush, `info["one_step"]`): x̂₀ = (z − σ_T ε(z, T, c)) / α_T in
    one U-Net call; CFG/APG combine the conditional and negative/null one-step outputs (the paper's baseline for
    one-step negative prompts), NASA acts in the attention layers; `steps` and `sampler` do not apply."""
    one = OneStep(**{k: parts.info["one_step"][k] for k in ("timestep", "alpha", "sigma")})
    g = request.guidance
    noise = initial_noise(seeds, latent_shape(parts, request), parts.device)
    cond, uncond = _conditioning(parts, request, len(seeds))
    state = g.new_state()
    d_c = one.generate(parts.unet, noise, cond)
    d_u = one.generate(parts.unet, noise, uncond) if g.needs_uncond else None
    return g.apply(d_c, d_u, state, 0, 1), state


@torch.no_grad()
def _sample_chunk(parts: DiffusionParts, request: SampleRequest, seeds: list[int]) -> tuple[torch.Tensor, Any]:
    if "one_step" in parts.info:
        return _one_step_chunk(parts, request, seeds)
    unet, g, n = parts.unet, request.guidance, len(seeds)
    prediction_type = parts.info.get("prediction_type", "epsilon")
    scheduler = make_scheduler(parts, request.sampler)
    scheduler.set_timesteps(request.steps, device=parts.device)
    generators = image_generators(seeds)
    x = initial_noise(generators, latent_shape(parts, request), parts.device) * scheduler.init_noise_sigma
    cond, uncond = _conditioning(parts, request, n)
    state = g.new_state()
    # stochastic samplers' per-step noise continues each image's own generator; deterministic ones take none
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if g.needs_uncond:
            out = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
            out_c, out_u = out.chunk(2)
        else:
            out_c, out_u = unet(x_in, t, encoder_hidden_states=cond).sample, None
        alpha_bar = _alpha_bar(scheduler, t)
        d_c = to_clean(out_c, x_in, alpha_bar, prediction_type)
        d_u = to_clean(out_u, x_in, alpha_bar, prediction_type) if out_u is not None else None
        d_g = g.apply(d_c, d_u, state, i, len(scheduler.timesteps))
        guided = out_c if d_g is d_c else from_clean(d_g, x_in, alpha_bar, prediction_type)
        x = scheduler.step(guided, t, x, **extra).prev_sample
    return x, state


def sample(parts: DiffusionParts, request: SampleRequest) -> SampleResult:
    """Images and the seeds used for one request (validated first)."""
    validate(parts, request)
    seeds = [request.seed + i for i in range(request.n)]
    raws, norms, fractions = [], [], []
    with attention_processor(parts, request):
        for start in range(0, request.n, request.max_batch):
            x, state = _sample_chunk(parts, request, seeds[start : start + request.max_batch])
            raws.append(parts.decode(x).cpu())
            norms.append(state.diff_norm)
            fractions.append(state.parallel_fraction)
    raw = torch.cat(raws)
    return SampleResult(((raw + 1) / 2).clamp(0, 1), raw, seeds, mean_rows(norms), mean_rows(fractions))


def mean_rows(rows: list[list[float]]) -> list[float]:
    """Element-wise mean of equal-length per-step traces (from several chunks or requests)."""
    return [sum(v) / len(v) for v in zip(*rows)] if rows and rows[0] else []
