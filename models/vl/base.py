"""The pretrained TinyCLIP, trained once and reused by every vision-language job.

`tinyclip_folder(ctx, smoke)` looks where the LLM kit's base model is looked for, in the same
order: the registry (`ctx.load_model(name)`), then a cache folder keyed by a hash of the recipe and
of the code that trains it, then trains it now. The cache folder is written under a lock and
published by an atomic rename, so parallel jobs train it once and never read a half-written
folder; it lives beside the LLM base models under `$CRUCIBLE_HOME/cache/vl/`. Every use reports
the weights' digest to the reproduction recorder (`models.provenance.note_input`).

Registry names: `tinyclip-<key>` for the full recipe and `tinyclip-micro-<key>` for the seconds-long
smoke recipe. A full-recipe step (batch 128) takes ≈ 0.16 s on two threads, so its 1,700 steps train in
about 4.7 minutes on two idle cores. The folder's `crucible-lineage.json` records the recipe, the
training time and the zero-shot report (`models.vl.zero_shot.zero_shot_report`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from models.context import InMemoryRunContext, RunContext, cpu_threads
from models.llm.base import _locked, cache_root
from models.provenance import note_input, trained_key, weights_digest
from models.vl.pretraining import TinyClipRecipe, pretrain_tinyclip
from models.vl.tinyclip import TinyClip, load_tinyclip, save_tinyclip
from models.vl.zero_shot import zero_shot_report

RECIPE_VERSION = 1
LINEAGE_FILE = "crucible-lineage.json"
RECIPES: dict[bool, TinyClipRecipe] = {
    False: TinyClipRecipe(),
    True: TinyClipRecipe(
        size="micro", steps=40, batch_size=64, lr=3e-3, warmup_steps=4, train_scenes=512, digit_steps=20, log_every=10
    ),
}


def recipe_key(recipe: TinyClipRecipe) -> str:
    """The recipe, the training code's fingerprint, the libraries' versions and the CPU kernels (12 hex digits)."""
    return trained_key({"recipe": asdict(recipe), "version": RECIPE_VERSION}, "models.vl.pretraining")


def tinyclip_name(smoke: bool = False) -> str:
    recipe = RECIPES[smoke]
    return f"tinyclip{'-micro' if smoke else ''}-{recipe_key(recipe)}"


def _train_into(folder: Path, recipe: TinyClipRecipe, ctx: RunContext) -> None:
    """Train in a private context (the caller's progress forwarded), evaluate zero-shot, write the folder."""
    inner = InMemoryRunContext(
        seed=recipe.seed,
        resources=ctx.resources,
        on_progress=lambda d, t, m: ctx.progress(d, t, f"TinyCLIP: {m}"),
    )
    started = time.perf_counter()
    with cpu_threads(ctx.resources):
        clip = pretrain_tinyclip(inner, recipe)
        seconds = time.perf_counter() - started
        zero_shot = zero_shot_report(clip)
    lineage: dict[str, Any] = {
        "method": "tinyclip-pretrain",
        "job_id": ctx.job_id,
        "recipe": asdict(recipe),
        "recipe_key": recipe_key(recipe),
        "train_seconds": round(seconds, 1),
        "final_loss": inner.latest("loss"),
        "zero_shot": zero_shot,
    }
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tinyclip(clip, tmp)
    (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2))
    tmp.rename(folder)


def tinyclip_folder(ctx: RunContext, smoke: bool = False) -> Path:
    """The trained TinyCLIP folder: from the registry, else the local cache, else trained now (then registered)."""
    name = tinyclip_name(smoke)
    try:
        registered = Path(ctx.load_model(name))
        note_input(name, weights_digest(registered))
        return registered
    except (KeyError, PermissionError, FileNotFoundError):
        pass
    recipe = RECIPES[smoke]
    folder = cache_root() / "vl" / f"tinyclip-{recipe.size}-{recipe_key(recipe)}"
    with _locked(folder.with_name(folder.name + ".lock")):
        if not (folder / "config.json").exists():
            _train_into(folder, recipe, ctx)
    ctx.register_model(name, folder, json.loads((folder / LINEAGE_FILE).read_text()))
    note_input(name, weights_digest(folder))
    return folder


def pretrained_tinyclip(ctx: RunContext, smoke: bool = False) -> TinyClip:
    return load_tinyclip(tinyclip_folder(ctx, smoke))
