"""`send`: Sensitive Neuron Dropout, scored with the Efficient EigenScore.

Paper: Shahrad Mohammadzadeh, Juan David Guerra, Marco Bonizzato, Reihaneh Rabbany and Golnoosh Farnadi,
"Hallucination Detox: Sensitive Neuron Dropout (SeND) for Large Language Model Training" (arXiv
2410.15460, 2024; the ACL 2025 version is titled "Hallucination Detox: Sensitivity Dropout (SenD) for
Large Language Model Training"). Reference code: https://github.com/notarobot-hub/SEND
(`send/send_pythia.py`, `sensitivity/efficient_eigenscore/efficient.py`).

SeND watches the MLP units of every decoder layer on a tracking set between training epochs and drops
(deterministically, not at random) those whose activations swing most: over the last ≤3 checkpoints t,

    S_j = Σ_t |a_{t+1,j} − a_{t,j}| · Var_t(a_{t,j})        (Section 4, "sensitive neurons"),

averaged over tracking examples; the top `drop_fraction` of units of each layer are zeroed for the next
epochs and re-identified every `reidentify_every` epochs (30% and 2 epochs, the reference script's).
The mask sits on the input of `down_proj` (the unit activations act(gate)·up), so a dropped unit outputs
0 and its gate/up rows and down_proj column receive zero gradient.

The hallucination signal is EigenScore over K sampled answers per query: the answers' penultimate-layer
states at their second-to-last token form Z ∈ R^{K×d}, and ES = (1/K) log det(ZᵀJZ + αI) with J the
centring matrix; EES estimates the same log-determinant with Chebyshev moments and Hutchinson probes
(`models/eigenscore.py`, in the textbook form cos(m·arccos x) where the reference code has cos(m·x)).

Deviations: Pythia and its data are replaced by a micro Llama trained from scratch on templated fictional
facts (nothing a model could know beforehand), AdamW at lr 5e-3 for 30 epochs instead of the script's
1e-4 on a pre-trained model, and embeddings are standardised before EigenScore (α = 1 on that scale);
the reference script's inconsistent axis handling in the sensitivity score is replaced by the paper's
formula above.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from models.context import RunContext, stop_if_cancelled
from models.eigenscore import efficient_eigenscore, eigenscore
from models.llm.folder import decoder_layers
from models.llm.model import build_model, llama_config
from models.llm.tokenizer import encode_documents, train_tokenizer
from models.params import EpochTrainingParams
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

ATTRIBUTES = ("capital", "founder", "river", "color", "language", "mascot")
SYLLABLES = ("ka", "lo", "mi", "zu", "ter", "van", "dor", "el", "qui", "ra", "sen", "tho", "bra", "ny", "ox", "pel")


class SeNDParams(EpochTrainingParams):
    lr: float = Field(5e-3, gt=0.0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(8, ge=1, le=512, description="facts per step")
    epochs: int = Field(30, ge=1, le=1000, description="passes over the facts")
    facts: int = Field(100, ge=10, le=100_000, description="templated fictional facts to learn")
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
) -> list[float]:
    """Train on the facts with SeND (drop_fraction > 0) or plainly; the per-epoch mean loss (`Cancelled`
    when `ctx` is)."""
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    mask = UnitMask(model)
    rng = random.Random(seed)
    checkpoints: list[torch.Tensor] = []
    losses = []
    try:
        for epoch in range(params.epochs):
            if params.drop_fraction and len(checkpoints) >= 2 and epoch % params.reidentify_every == 0:
                history = torch.stack(checkpoints[-3:])  # [T, layers, examples, units]
                mask.drop([most_sensitive(history[:, i], params.drop_fraction) for i in range(history.shape[1])])
            model.train()
            total, count = 0.0, 0
            for tokens, labels in fact_batches(tokenizer, facts, params.batch_size, rng):
                if ctx is not None:
                    stop_if_cancelled(ctx)
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
                ctx.progress(epoch + 1, params.epochs, f"epoch {epoch + 1}: loss {losses[-1]:.3f}")
    finally:
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


def train_and_score(params: SeNDParams, seed: int, ctx: RunContext | None = None) -> SeNDRun:
    facts = fictional_facts(params.facts, seed=0)
    n_query = max(2, int(params.query_fraction * len(facts)))
    queries, tracking = facts[:n_query], facts[n_query : 2 * n_query]
    tokenizer = train_tokenizer([f.text for f in facts], 400)
    model = build_model(
        llama_config("micro", len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        seed,
    )
    losses = train_facts(model, tokenizer, facts, tracking, params, seed, ctx)
    return SeNDRun(model, losses, score_queries(model, tokenizer, queries, params, seed))


@method(
    "send",
    family="llm-training",
    task="train",
    datasets=(),
    params=SeNDParams,
    paper="Hallucination Detox: Sensitive Neuron Dropout (SeND) for Large Language Model Training",
    tiny=dict(facts=24, epochs=3, samples=3),
)
def run(ctx: RunContext, params: SeNDParams) -> None:
    """Train a micro Llama on fictional facts with sensitive-neuron dropout; log accuracy and mean EES."""
    result = train_and_score(params, ctx.seed, ctx)
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
    """100 fictional facts, a micro Llama from scratch, 30 epochs with and without SeND (a first protocol of
    300 facts and 6 epochs left recall at 0% in both arms), same seed and batches; 10 queries × K=10 sampled answers;
    three seeds. The claim's further conditions: mean accuracy over seeds no lower with SeND, and Pearson
    correlation ≥ 0.9 between EES and exact EigenScore over every query of every arm and seed."""
    params = SeNDParams(facts=24, epochs=3, samples=3) if smoke else SeNDParams()
    seeds = seeds_for(seed, smoke)
    arms = (("normal", 0.0), ("send", params.drop_fraction))
    runs: dict[str, list[SeNDRun]] = {name: [] for name, _ in arms}
    for name, frac, s in sweep(
        ctx, [(name, frac, s) for name, frac in arms for s in seeds], label=lambda x: f"{x[0]} seed {x[2]}"
    ):
        runs[name].append(train_and_score(params.model_copy(update={"drop_fraction": frac}), s))
    ees = {name: [float(np.mean(r.scores.ees)) for r in rs] for name, rs in runs.items()}
    exact = {name: float(np.mean([np.mean(r.scores.exact) for r in rs])) for name, rs in runs.items()}
    accuracy = {name: float(np.mean([r.scores.accuracy for r in rs])) for name, rs in runs.items()}
    final_loss = {name: float(np.mean([r.losses[-1] for r in rs])) for name, rs in runs.items()}
    all_ees = [v for rs in runs.values() for r in rs for v in r.scores.ees]
    all_exact = [v for rs in runs.values() for r in rs for v in r.scores.exact]
    pearson = float(np.corrcoef(all_ees, all_exact)[0, 1]) if len(set(all_exact)) > 1 else float("nan")
    ees_ours, ees_base = float(np.mean(ees["send"])), float(np.mean(ees["normal"]))
    holds = bool(accuracy["send"] >= accuracy["normal"] and pearson >= 0.9)
    note = (
        f"SeND vs normal, means over {len(seeds)} seed(s): EES {ees_ours:.3f} vs {ees_base:.3f}, exact ES "
        f"{exact['send']:.3f} vs {exact['normal']:.3f}, accuracy {accuracy['send']:.3f} vs {accuracy['normal']:.3f}; "
        f"Pearson(EES, exact ES) {pearson:.3f} over {len(all_ees)} queries; final train loss "
        f"{final_loss['send']:.3f} vs {final_loss['normal']:.3f}."
        + (
            ""
            if holds and ees_ours < ees_base
            else f" A 0.13M-parameter model trained from scratch recalls few of the facts (unlike the "
            f"paper's pre-trained Pythia), so most sampled answers are hallucinated in both arms; and with K="
            f"{params.samples} answers in d=64 the log-determinant has rank {params.samples - 1}, estimated from 20 "
            f"Hutchinson probes whose noise is of the order of the spread of EigenScore across queries."
        )
    )
    return Outcome(
        ours=ees["send"],
        baseline=ees["normal"],
        holds=holds,
        note=note,
        details={"pearson": pearson, "accuracy": accuracy, "exact_eigenscore": exact},
    )
