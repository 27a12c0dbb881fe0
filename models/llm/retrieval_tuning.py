"""A retrieval-tuned variant of the cached base: a short continued training on code with passkey needles, so that
passkey retrieval separates KV-cache methods.

Why: the tiny base is pre-trained on plain stdlib code and never saw a needle; it ranks the true key first about as
often as chance (1 in 5), so KV-bytes-vs-passkey curves say nothing about which tokens a press keeps. Studies of
cache and attention methods on small models therefore train the model on the synthetic retrieval format first;
this is our short version of that.

The recipe (a reconstruction for this scale, not a published one): the base's own train split with one needle
`PASSKEY = <5 digits>` per sequence at a uniform random depth and the question `PASSKEY = ` at the end followed by
the key; next-token cross-entropy on every token plus `key_weight` × the mean over the key tokens (so the few answer
tokens are not drowned by hundreds of code tokens). A curriculum of stages: first short sequences (many needles per
step at a fixed token count, short look-back), then the evaluation lengths. It reaches ~50-60% dense retrieval
(chance 20%) at 128, 256 and 512 tokens and every depth; ~350 steps, 2-5 CPU minutes depending on the load.

What did not work within the budget, for the record: the base cannot copy at all (its loss on the second occurrence
of a random token span equals the first's); repeated random spans (the induction-head task, Olsson et al. 2022)
form a copy circuit in ~200 steps alone, but it did not carry over to needles, mixed in from the start it did not
form, and needle steps after it erased it; needle-only tuning at 3e-3 or at the evaluation lengths alone moved the
key loss least.

Held-out code stays disjoint from the tuning code: needles are built only from the train split's stream (here),
passkey evaluation sets only from the validation split (`email/`, `json/` of the stdlib), which share no file.
The tuned model is cached as a model folder at `$CRUCIBLE_HOME/cache/llm-retrieval/<hash>`, the hash covering the
recipe and the base model's own recipe key, so it trains once per machine (`models.checkpoint.trained_once` cannot
write it: the tiny Llama ties its embedding and output weights, which `safetensors.save_file` refuses).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.context import RunContext, stop_if_cancelled
from models.datasets import Dataset, load_builtin
from models.llm.base import BASE_DATASET, RECIPES, base_model, base_model_name, cache_root, recipe_key
from models.llm.data import sampled_stream
from models.llm.folder import CausalLM, load_folder, save_folder
from models.llm.passkey import NeedleTokens, text_ids

RECIPE_VERSION = 1


@dataclass(frozen=True)
class RetrievalRecipe:
    stages: tuple[tuple[int, tuple[int, ...]], ...]  # (steps, needle sequence lengths drawn from), in order
    tokens_per_step: int  # batch size = tokens_per_step // length
    lr: float
    key_weight: float
    train_tokens: int  # size of the train-split sample the code is cut from
    seed: int = 0

    @property
    def steps(self) -> int:
        return sum(steps for steps, _ in self.stages)


RETRIEVAL_RECIPES: dict[bool, RetrievalRecipe] = {
    False: RetrievalRecipe(
        stages=((250, (64,)), (100, (128, 256, 512))),
        tokens_per_step=2048,
        lr=1e-3,
        key_weight=4.0,
        train_tokens=400_000,
    ),
    True: RetrievalRecipe(
        stages=((4, (48,)), (2, (64,))), tokens_per_step=256, lr=3e-3, key_weight=4.0, train_tokens=4_000
    ),
}


def needle_batch(
    tokenizer, pieces: NeedleTokens, stream: torch.Tensor, length: int, batch: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` tuning sequences of `length` tokens, [B, L], and the mask of the answer's key tokens, [B, L]: code
    cut at a random offset of `stream`, a needle at a uniform random depth, the question and the key at the end."""
    rows, masks = [], []
    for _ in range(batch):
        key = text_ids(tokenizer, str(rng.randrange(10000, 100000)))
        filler = pieces.filler(length, key) - len(key)
        start = rng.randrange(0, len(stream) - filler)
        code = stream[start : start + filler].tolist()
        ids = pieces.prompt(code, rng.random(), key) + key
        rows.append(ids)
        masks.append([False] * (length - len(key)) + [True] * len(key))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks)


def retrieval_loss(
    model: nn.Module, ids: torch.Tensor, key_mask: torch.Tensor, key_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, mean CE on the key tokens): next-token CE on every token + key_weight × the key tokens' CE."""
    logits = model(input_ids=ids[:, :-1]).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(ids.shape[0], -1)
    on_key = key_mask[:, 1:]
    key_loss = ce[on_key].mean()
    return ce.mean() + key_weight * key_loss, key_loss


def tune_for_retrieval(
    model: nn.Module,
    tokenizer,
    stream: torch.Tensor,
    recipe: RetrievalRecipe,
    on_step: Callable[[int, float], None] = lambda step, key_loss: None,
) -> list[float]:
    """Continue training `model` in place on needle sequences, stage by stage; returns the key-token loss of every
    step."""
    rng = random.Random(recipe.seed)
    pieces = NeedleTokens.of(tokenizer)
    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    lengths = [stage_lengths for steps, stage_lengths in recipe.stages for _ in range(steps)]
    model.train()
    history = []
    for step, choices in enumerate(lengths):
        length = rng.choice(choices)
        ids, mask = needle_batch(tokenizer, pieces, stream, length, max(1, recipe.tokens_per_step // length), rng)
        loss, key_loss = retrieval_loss(model, ids, mask, recipe.key_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(key_loss.item())
        on_step(step, history[-1])
    model.eval()
    return history


def tuning_stream(tokenizer, dataset: Dataset, recipe: RetrievalRecipe) -> torch.Tensor:
    """The code needles are inserted into: a seeded sample of the train split only (evaluation sets are cut from
    the validation split, whose files the train split never holds)."""
    return sampled_stream(tokenizer, dataset.train["text"], recipe.train_tokens, seed=recipe.seed)


def retrieval_key(smoke: bool = False) -> str:
    """Hash of the tuning recipe and the base it starts from."""
    spec = {"recipe": asdict(RETRIEVAL_RECIPES[smoke]), "version": RECIPE_VERSION, "base": recipe_key(RECIPES[smoke])}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def tuning_step(ctx: RunContext, step: int, steps: int, key_loss: float) -> None:
    """Report a tuning step, and stop (`Cancelled`) when the run was cancelled: nothing is cached then."""
    ctx.progress(step + 1, steps, f"retrieval tuning: key loss {key_loss:.3f}")
    stop_if_cancelled(ctx)


def retrieval_model(ctx: RunContext, smoke: bool = False) -> CausalLM:
    """The retrieval-tuned base: its folder from the cache, else tuned now from the cached base and written there
    (as a `.partial` folder renamed when complete, so a crash never leaves a half folder the next run would load)."""
    folder = cache_root() / "llm-retrieval" / retrieval_key(smoke)
    if not (folder / "config.json").exists():
        lm = load_folder(base_model(ctx, smoke))
        recipe = RETRIEVAL_RECIPES[smoke]
        stream = tuning_stream(lm.tokenizer, load_builtin(BASE_DATASET), recipe)
        history = tune_for_retrieval(
            lm.model,
            lm.tokenizer,
            stream,
            recipe,
            lambda step, loss: tuning_step(ctx, step, recipe.steps, loss),
        )
        tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_folder(
            lm.model,
            lm.tokenizer,
            tmp,
            {
                "method": "retrieval-tuning",
                "parent": base_model_name(smoke),
                "recipe": asdict(recipe),
                "key_loss_last": history[-1],
            },
        )
        try:
            tmp.rename(folder)
        except OSError:  # another process published the same recipe first
            shutil.rmtree(tmp, ignore_errors=True)
    lm = load_folder(folder)
    lm.model.eval()
    return lm
