"""`send`: Sensitive Neuron Dropout with the Efficient EigenScore (Mohammadzadeh et al., "Hallucination Detox:
Sensitive Neuron Dropout (SeND) for Large Language Model Training", 2024).

SeND watches the MLP units of every decoder layer on a tracking set between training epochs and drops
(deterministically, not at random) those whose activations swing most: over the last ≤3 checkpoints t,

    S_j = Σ_t |a_{t+1,j} − a_{t,j}| · Var_t(a_{t,j})        (Section 4, "sensitive neurons"),

averaged over tracking examples; the top `drop_fraction` (30%) of units of each layer are zeroed for the
next epochs and re-identified every `reidentify_every` epochs (2). The mask sits on the input of
`down_proj` (the unit activations act(gate)·up), so a dropped unit outputs 0 and its gate/up rows and
down_proj column receive zero gradient. The hallucination signal is EigenScore over K sampled answers
per query (penultimate-layer state of the second-to-last token), estimated by EES
(`models/eigenscore.py`). Pythia and its data are replaced by a micro Llama trained from scratch on
templated fictional facts; the SeND script's inconsistent axis handling is replaced by the paper's formula.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from models.context import RunContext, cpu_threads
from models.eigenscore import efficient_eigenscore, eigenscore
from models.llm.folder import decoder_layers
from models.llm.model import build_model, llama_config
from models.llm.tokenizer import encode_documents, train_tokenizer
from models.registry import MethodParams, method
from models.reproduction import Outcome, reproduction

ATTRIBUTES = ("capital", "founder", "river", "color", "language", "mascot")
SYLLABLES = ("ka", "lo", "mi", "zu", "ter", "van", "dor", "el", "qui", "ra", "sen", "tho", "bra", "ny", "ox", "pel")


class SeNDParams(MethodParams):
    facts: int = Field(100, ge=10, le=100_000, description="templated fictional facts to learn")
    epochs: int = Field(30, ge=1, le=1000, description="passes over the facts")
    batch_size: int = Field(8, ge=1, le=512)
    lr: float = Field(5e-3, gt=0.0, le=1.0, description="AdamW learning rate")
    drop_fraction: float = Field(0.3, ge=0.0, lt=1.0, description="fraction of MLP units dropped per layer (0: off)")
    reidentify_every: int = Field(2, ge=1, description="epochs between re-identifications of sensitive units")
    samples: int = Field(10, ge=2, le=100, description="K sampled answers per query for EigenScore")
    alpha: float = Field(1.0, gt=0.0, description="α of log det(ZᵀJZ + αI) (on standardised embeddings)")
    query_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="facts used as evaluation queries")


# -- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    @property
    def prompt(self) -> str:
        return f"The {self.attribute} of {self.entity} is"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.value}."


def fictional_facts(n: int, seed: int = 0) -> list[Fact]:
    """`n` facts about distinct made-up entities with made-up values (nothing a model could know before)."""
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice(SYLLABLES) for _ in range(k)).capitalize()  # noqa: E731
    entities: set[str] = set()
    while len(entities) < n:
        entities.add(word(3))
    return [Fact(e, rng.choice(ATTRIBUTES), word(2)) for e in sorted(entities)]


# -- sensitive-neuron dropout -------------------------------------------------------------------------


class UnitMask:
    """Zero chosen MLP units of every decoder layer (a forward pre-hook on `down_proj`), and record their
    activations at the last token when `recording`."""

    def __init__(self, model: nn.Module):
        self.layers = list(decoder_layers(model))
        units = self.layers[0].mlp.down_proj.in_features
        self.keep = [torch.ones(units) for _ in self.layers]
        self.recorded: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.recording = False
        self.handles = [
            layer.mlp.down_proj.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)
        ]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            x = inputs[0] * self.keep[i]
            if self.recording:
                self.recorded[i].append(x[:, -1].detach().clone())
            return (x,)

        return hook

    def drop(self, units_per_layer: list[torch.Tensor]) -> None:
        for keep, units in zip(self.keep, units_per_layer):
            keep.fill_(1.0)
            keep[units] = 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sensitivity(history: torch.Tensor) -> torch.Tensor:
    """S_j from activations [checkpoints T ≥ 2, examples, units]: Σ_t |Δa| · Var_t(a), averaged over examples."""
    swings = (history[1:] - history[:-1]).abs().sum(0)
    return (swings * history.var(0, unbiased=False)).mean(0)


def most_sensitive(history: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(round(fraction * history.shape[-1]))
    return torch.topk(sensitivity(history), k).indices if k else torch.zeros(0, dtype=torch.long)


# -- training and evaluation -----------------------------------------------------------------------


def fact_batches(tokenizer: PreTrainedTokenizerFast, facts: list[Fact], batch_size: int, rng: random.Random):
    order = list(range(len(facts)))
    rng.shuffle(order)
    ids = encode_documents(tokenizer, [facts[i].text for i in order])
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(map(len, chunk))
        tokens = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        for row, seq in enumerate(chunk):
            tokens[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
        yield tokens, labels


@torch.no_grad()
def tracking_activations(
    model: nn.Module, mask: UnitMask, tokenizer: PreTrainedTokenizerFast, tracking: list[Fact]
) -> torch.Tensor:
    """[layers, examples, units] activations at the last prompt token (masked units read 0)."""
    mask.recorded = [[] for _ in mask.layers]
    mask.recording = True
    for seq in encode_documents(tokenizer, [f.prompt for f in tracking]):
        model(input_ids=torch.tensor([seq]))
    mask.recording = False
    return torch.stack([torch.cat(r) for r in mask.recorded])


def train_facts(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    facts: list[Fact],
    tracking: list[Fact],
    params: SeNDParams,
    seed: int,
    ctx: RunContext | None = None,
) -> list[float] | None:
    """Train on the facts with SeND (drop_fraction > 0) or plainly; the per-epoch mean loss, None if cancelled."""
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.0)
    mask = UnitMask(model)
    rng = random.Random(seed)
    checkpoints: list[torch.Tensor] = []
    losses = []
    for epoch in range(params.epochs):
        if params.drop_fraction and len(checkpoints) >= 2 and epoch % params.reidentify_every == 0:
            history = torch.stack(checkpoints[-3:])  # [T, layers, examples, units]
            mask.drop([most_sensitive(history[:, i], params.drop_fraction) for i in range(history.shape[1])])
        model.train()
        total, count = 0.0, 0
        for tokens, labels in fact_batches(tokenizer, facts, params.batch_size, rng):
            if ctx is not None and ctx.cancelled():
                mask.remove()
                return None
            loss = model(input_ids=tokens, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item(), count + 1
        losses.append(total / count)
        if params.drop_fraction:
            model.eval()
            checkpoints.append(tracking_activations(model, mask, tokenizer, tracking))
        if ctx is not None:
            ctx.log(epoch + 1, train_loss=losses[-1], dropped_fraction=float(1 - torch.stack(mask.keep).mean()))
    mask.remove()  # inference uses every unit
    model.eval()
    return losses


@torch.no_grad()
def answer_embeddings(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, fact: Fact, samples: int, generator_seed: int
) -> tuple[torch.Tensor, bool]:
    """K sampled answers' penultimate-layer states at their second-to-last token [K, d], and whether the
    greedy answer is exactly right."""
    prompt = torch.tensor([encode_documents(tokenizer, [fact.prompt])[0]])
    greedy = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    correct = tokenizer.decode(greedy[0, prompt.shape[1] :]).startswith(f" {fact.value}.")
    torch.manual_seed(generator_seed)
    sampled = model.generate(
        prompt.repeat(samples, 1),
        attention_mask=torch.ones(samples, prompt.shape[1]),
        max_new_tokens=6,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        pad_token_id=tokenizer.pad_token_id,
    )
    states = model(input_ids=sampled, output_hidden_states=True).hidden_states[-2]
    return states[:, -2].float(), correct


def standardised(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / (z.std(0) + 1e-6)


@dataclass
class FactScores:
    accuracy: float
    ees: list[float]
    exact: list[float]


def score_queries(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, queries: list[Fact], params: SeNDParams, seed: int
) -> FactScores:
    ees, exact, correct = [], [], []
    for i, fact in enumerate(queries):
        z, ok = answer_embeddings(model, tokenizer, fact, params.samples, seed * 1000 + i)
        z = standardised(z)
        correct.append(ok)
        exact.append(eigenscore(z, params.alpha))
        ees.append(efficient_eigenscore(z, params.alpha, generator=torch.Generator().manual_seed(i)))
    return FactScores(float(np.mean(correct)), ees, exact)


@dataclass
class SeNDRun:
    model: LlamaForCausalLM
    losses: list[float]
    scores: FactScores


def train_and_score(params: SeNDParams, seed: int, ctx: RunContext | None = None) -> SeNDRun | None:
    facts = fictional_facts(params.facts, seed=0)
    n_query = max(2, int(params.query_fraction * len(facts)))
    queries, tracking = facts[:n_query], facts[n_query : 2 * n_query]
    tokenizer = train_tokenizer([f.text for f in facts], 400)
    model = build_model(
        llama_config("micro", len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        seed,
    )
    losses = train_facts(model, tokenizer, facts, tracking, params, seed, ctx)
    if losses is None:
        return None
    return SeNDRun(model, losses, score_queries(model, tokenizer, queries, params, seed))


@method(
    "send",
    family="llm-training",
    task="train",
    datasets=(),
    params=SeNDParams,
    paper="Hallucination Detox: Sensitive Neuron Dropout (SeND) for Large Language Model Training",
)
def run(ctx: RunContext, params: SeNDParams) -> None:
    """Train a micro Llama on fictional facts with sensitive-neuron dropout; log accuracy and mean EES."""
    with cpu_threads(ctx.resources):
        result = train_and_score(params, ctx.seed, ctx)
    if result is not None:
        ctx.log(
            params.epochs,
            accuracy=result.scores.accuracy,
            ees=float(np.mean(result.scores.ees)),
            eigenscore=float(np.mean(result.scores.exact)),
        )


@reproduction(
    "send",
    claim="training with sensitive-neuron dropout lowers the (Efficient) EigenScore of sampled "
    "answers without lowering fact-recall accuracy, and EES tracks exact EigenScore "
    "(Pearson ≥ 0.9)",
    metric="mean EES over queries (lower: less hallucination)",
    direction="lower",
    baseline="normal training (drop_fraction 0)",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """100 fictional facts, a micro Llama from scratch, 30 epochs with and without SeND (the notes' 300 facts
    and 6 epochs left recall at 0% for both arms), same seed and batches; 10 queries × K=10 sampled answers."""
    params = SeNDParams(facts=24, epochs=3, samples=3) if smoke else SeNDParams()
    with cpu_threads(ctx.resources):
        runs = {
            name: train_and_score(params.model_copy(update={"drop_fraction": frac}), seed)
            for name, frac in (("normal", 0.0), ("send", params.drop_fraction))
        }
    ours, base = runs["send"].scores, runs["normal"].scores
    both_ees = ours.ees + base.ees
    both_exact = ours.exact + base.exact
    pearson = float(np.corrcoef(both_ees, both_exact)[0, 1]) if len(set(both_exact)) > 1 else float("nan")
    ees_ours, ees_base = float(np.mean(ours.ees)), float(np.mean(base.ees))
    holds = bool(ees_ours < ees_base and ours.accuracy >= base.accuracy and pearson >= 0.9)
    note = (
        f"SeND vs normal: EES {ees_ours:.3f} vs {ees_base:.3f}, exact ES {np.mean(ours.exact):.3f} vs "
        f"{np.mean(base.exact):.3f}, accuracy {ours.accuracy:.3f} vs {base.accuracy:.3f}; Pearson(EES, exact ES) "
        f"{pearson:.3f} over {len(both_ees)} queries; final train loss {runs['send'].losses[-1]:.3f} vs "
        f"{runs['normal'].losses[-1]:.3f}; one seed."
        + (
            ""
            if holds
            else f" A 0.13M-parameter model trained from scratch recalls few of the facts (unlike the "
            f"paper's pre-trained Pythia), so most sampled answers are hallucinated in both arms; and with K="
            f"{params.samples} answers in d=64 the log-determinant has rank {params.samples - 1}, estimated from 20 "
            f"Hutchinson probes whose noise is of the order of the spread of EigenScore across queries."
        )
    )
    return Outcome(
        ours=ees_ours,
        baseline=ees_base,
        seeds=1,
        holds=holds,
        note=note,
        details={"pearson": pearson, "accuracy": {"send": ours.accuracy, "normal": base.accuracy}},
    )
