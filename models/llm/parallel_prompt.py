"""Parallel prompt decoding (Chen et al., "Hardware-Aware Parallel Prompt Decoding for Memory-Efficient
Acceleration of LLM Inference", 2024): m trained prompt-token embeddings, appended after the input, make one
forward pass of the *frozen* base model also guess the tokens at offsets +2 … +m+1.

- **Prompt tokens** (§3.1): m vectors in the embedding space, the only trained parameters (the paper's
  ensemble of n_e virtual tokens per position is taken with n_e = 1, its default). Prompt token i sits at
  position L+i after an input of L tokens, attends to the whole input and to prompt tokens 0…i-1, and
  predicts x_{L+i+1}.
- **Training** (§3.2): on randomly truncated sequences, KD against the base model's own next-token
  distribution at the same offset, L = (1/m) Σ_i 0.8^i · KL(p_teacher ‖ p_θ). Instead of one truncation per
  sequence, `prompt_forward` places K truncation points in one window with a 4-D mask (each group of m
  prompt tokens sees only the input before its cut point), so the x rows of the same forward *are* the
  teacher: with the base frozen, they do not depend on the prompts.
- **Decoding** (§3.3): each step feeds the pending greedy token and candidates built from the previous step's
  guesses — a sparse tree of the prompt tokens' top-k (`models/llm/prompt_tree.py`; by default the chain of top-1
  guesses) — with a group of m prompt tokens attached to every node, in one forward under a tree attention mask.
  Greedy verification follows, from the root, the child whose token greedy decoding would have produced, adds
  the base model's own next token (the "bonus" token), and takes the next guesses from the prompt group of the
  last accepted node. The KV cache is compacted to the accepted path. Output equals greedy decoding token for
  token, whatever the prompt embeddings and the tree; with m = 0 it is greedy decoding at one token per forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.llm.data import random_windows
from models.llm.distillation import kl_loss
from models.llm.prompt_tree import (
    SparseTree,
    additive_mask,
    chain_tree,
    keep_cache_rows,
    tree_attention,
    tree_positions,
)

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedModel

DECAY = 0.8  # the paper's per-offset weight 0.8^i in the KD loss
PROMPTS_FILE = "ppd_prompts.safetensors"


class PromptTokens(nn.Module):
    """m trainable input embeddings [m, d]; everything else stays the frozen base model's."""

    def __init__(self, count: int, hidden_size: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(count, hidden_size))

    @property
    def count(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def initialised(cls, model: PreTrainedModel, count: int, seed: int = 0) -> PromptTokens:
        """The vocabulary's mean embedding plus Gaussian noise of the embeddings' spread: a start inside the region
        the base model has seen, distinct per prompt token (our choice, not the paper's initialisation)."""
        table = model.get_input_embeddings().weight.detach().float()
        g = torch.Generator().manual_seed(seed)
        prompts = cls(count, table.shape[1])
        with torch.no_grad():
            prompts.embeddings.copy_(table.mean(0) + table.std() * torch.randn(count, table.shape[1], generator=g))
        return prompts


def save_prompts(path: Path, prompts: PromptTokens, rates: torch.Tensor | None = None) -> None:
    """The prompt embeddings and, when measured, the per-offset rank acceptance rates [m, k] a deployment builds its
    sparse tree from (one safetensors file in the model folder)."""
    from safetensors.torch import save_file

    tensors = {"embeddings": prompts.embeddings.detach().contiguous()}
    if rates is not None:
        tensors["acceptance"] = rates.detach().float().contiguous()
    save_file(tensors, str(path))


def load_prompts(path: Path) -> tuple[PromptTokens, torch.Tensor | None]:
    """`save_prompts`' file: the prompt tokens, and the acceptance rates (None for a file without them)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    prompts = PromptTokens(*tensors["embeddings"].shape)
    prompts.embeddings.data.copy_(tensors["embeddings"])
    return prompts, tensors.get("acceptance")


def _blocked(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def prompt_forward(
    model: PreTrainedModel, prompts: PromptTokens, ids: torch.Tensor, cuts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of [x, K groups of m prompts]: the base's logits on x [B, T, V] and the prompt logits
    [B, K, m, V]. Group k's token i has position cuts[k]+i and sees x[:cuts[k]] and its own tokens 0…i, so it
    is trained to predict x_{cuts[k]+i+1}, which the base predicts from x row cuts[k]+i."""
    b, t = ids.shape
    m, k = prompts.count, len(cuts)
    embed = model.get_input_embeddings()
    x = embed(ids)
    p = prompts.embeddings.to(x.dtype).unsqueeze(0).expand(b, m, -1).repeat(1, k, 1)
    n = t + k * m
    allowed = torch.zeros(n, n, dtype=torch.bool, device=ids.device)
    allowed[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    positions = list(range(t))
    own = torch.ones(m, m, dtype=torch.bool).tril()
    for g, cut in enumerate(cuts):
        if not 1 <= cut <= t - m:
            raise ValueError(f"cut {cut} leaves no teacher targets for {m} prompt tokens in a window of {t}")
        rows = slice(t + g * m, t + (g + 1) * m)
        allowed[rows, :cut] = True
        allowed[rows, rows] = own
        positions.extend(range(cut, cut + m))
    mask = torch.zeros(n, n, dtype=x.dtype).masked_fill(~allowed, _blocked(x.dtype))
    out = model(
        inputs_embeds=torch.cat([x, p], dim=1),
        attention_mask=mask[None, None].expand(b, 1, n, n),
        position_ids=torch.tensor([positions]).expand(b, n),
        use_cache=False,
    )
    return out.logits[:, :t], out.logits[:, t:].reshape(b, k, m, -1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, decay: float = DECAY) -> torch.Tensor:
    """(1/m) Σ_i decay^i · KL(p_teacher ‖ p_student) at offset i; both [..., m, V] (offset on dim -2)."""
    m = student.shape[-2]
    terms = [decay**i * kl_loss(student[..., i, :], teacher[..., i, :].detach()) for i in range(m)]
    return torch.stack(terms).sum() / m


def teacher_targets(teacher: torch.Tensor, cuts: Sequence[int], m: int) -> torch.Tensor:
    """The base's logits at rows cuts[k]+i, arranged like the prompt logits: [B, K, m, V]."""
    rows = torch.tensor([[c + i for i in range(m)] for c in cuts])
    return teacher[:, rows]


def batch_loss(
    model: PreTrainedModel, prompts: PromptTokens, ids: torch.Tensor, cuts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD loss on one batch, with the student and teacher logits (for accuracy)."""
    teacher, student = prompt_forward(model, prompts, ids, cuts)
    target = teacher_targets(teacher.detach(), cuts, prompts.count)
    return kd_loss(student, target), student, target


def random_cuts(seq_len: int, m: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` distinct truncation points in [1, seq_len - m] (the paper's random truncation)."""
    high = seq_len - m
    count = min(count, high)
    return sorted((torch.randperm(high, generator=generator)[:count] + 1).tolist())


def train_prompts(
    model: PreTrainedModel,
    prompts: PromptTokens,
    stream: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    cuts_per_window: int,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_step: Callable[[int, float], None] = lambda s, loss: None,
) -> list[float]:
    """Adam on the prompt embeddings only (lr 1e-2 as in the paper; `weight_decay` is Adam's L2 term, 0 in the
    paper); the base model is frozen for the call. `on_step(step, loss)` runs after every step; it stops the
    training by raising (`models.context.Cancelled` from `stop_if_cancelled`), which leaves the base's
    `requires_grad` flags restored."""
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(prompts.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    try:
        for step in range(steps):
            ids = random_windows(stream, batch_size, seq_len, g)
            loss, _, _ = batch_loss(model, prompts, ids, random_cuts(seq_len, prompts.count, cuts_per_window, g))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            on_step(step + 1, losses[-1])
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return losses


@torch.no_grad()
def rank_acceptance(
    model: PreTrainedModel,
    prompts: PromptTokens,
    windows: torch.Tensor,
    cuts_per_window: int,
    top_k: int,
    seed: int = 0,
    start: int = 1,
) -> torch.Tensor:
    """[m, top_k]: how often the base's greedy token at offset +i+2 is exactly prompt token i's r-th most likely
    token (teacher forcing on the windows, truncation points drawn in [start, T - m]). The paper's per-offset top-k
    accuracies, differenced per rank: the acceptance rates a_i(r) its sparse tree is built from (§3.3)."""
    g = torch.Generator().manual_seed(seed)
    hits = torch.zeros(prompts.count, top_k)
    total = 0
    for ids in windows.split(4):
        cuts = [start - 1 + c for c in random_cuts(ids.shape[1] - start + 1, prompts.count, cuts_per_window, g)]
        _, student, target = batch_loss(model, prompts, ids, cuts)
        ranked = student.topk(top_k, dim=-1).indices == target.argmax(-1, keepdim=True)  # [B, K, m, top_k]
        hits += ranked.float().sum(dim=(0, 1))
        total += student.shape[0] * student.shape[1]
    return hits / max(total, 1)


@torch.no_grad()
def greedy_rank_acceptance(
    model: PreTrainedModel, prompts: PromptTokens, prefixes: torch.Tensor, new_tokens: int, top_k: int
) -> torch.Tensor:
    """`rank_acceptance` where decoding meets it, as the reference code's evaluation measures it: along the base's
    own greedy continuations of held-out prefixes (every truncation point inside the continuation), so the targets
    are the tokens greedy verification will compare the guesses with."""
    from models.llm.generation import SamplingParams, generate_tokens

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    sequences = torch.tensor(
        [p + list(generate_tokens(model, p, params, torch.Generator())) for p in prefixes.tolist()]
    )
    length = prefixes.shape[1]
    return rank_acceptance(model, prompts, sequences, new_tokens, top_k, start=length)


def offset_agreement(
    model: PreTrainedModel, prompts: PromptTokens, windows: torch.Tensor, cuts_per_window: int, seed: int = 0
) -> list[float]:
    """Top-1 agreement of prompt token i with the base's greedy token at offset +i+2 (teacher forcing), per i."""
    return rank_acceptance(model, prompts, windows, cuts_per_window, 1, seed)[:, 0].tolist()


# -- decoding ----------------------------------------------------------------------------------------


@dataclass
class DecodeResult:
    """Generated ids and, per decoding step after the prefill, how many tokens it produced (accepted + 1)."""

    tokens: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def forwards(self) -> int:
        return 1 + len(self.accepted)

    @property
    def mean_accepted(self) -> float:
        """The paper's acceptance length: tokens per decoding step (1.0 for greedy decoding)."""
        return sum(self.accepted) / len(self.accepted) if self.accepted else 1.0


def _emit(result: DecodeResult, token: int, max_tokens: int, stops: frozenset[int]) -> bool:
    """Append a token; False when generation ends (stop token, which is not kept, or max_tokens reached)."""
    if token in stops:
        return False
    result.tokens.append(token)
    return len(result.tokens) < max_tokens


@torch.no_grad()
def ppd_generate(
    model: PreTrainedModel,
    prompts: PromptTokens | None,
    prompt_ids: Sequence[int],
    max_tokens: int,
    stop_token_ids: frozenset[int] = frozenset(),
    tree: SparseTree | None = None,
) -> DecodeResult:
    """Greedy decoding accelerated by parallel prompt decoding (see the module doc): each step verifies a candidate
    `tree` of rank paths over the prompt tokens' top-k guesses (default: the chain of top-1 guesses)."""
    result = DecodeResult()
    if max_tokens <= 0:
        return result
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    m = prompts.count if prompts is not None else 0
    tree = chain_tree(m) if tree is None else tree
    if tree.depth > m:
        raise ValueError(f"a tree of depth {tree.depth} needs at least {tree.depth} prompt tokens, not {m}")
    soft = prompts.embeddings.to(device=device, dtype=embed.weight.dtype) if prompts is not None else None
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    x = embed(ids) if soft is None else torch.cat([embed(ids), soft[None]], dim=1)
    # the plain causal mask is exactly the prompt tokens' mask; logits of the last input row and the prompts only
    out = model(inputs_embeds=x, use_cache=True, logits_to_keep=m + 1)
    cache = out.cache
    if m:
        cache.crop(-m)
    pending = int(out.logits[0, 0].argmax())
    guesses = _top_guesses(out.logits[0, 1:], tree.width)
    # verification steps run the decoder and apply the LM head only to the rows read: the nodes, then the accepted
    # node's prompt group (argmax and top-k need nothing else; the head over every prompt token would cost about a
    # third of a small model's forward)
    decoder, head = model.base_model, model.get_output_embeddings()
    if not _emit(result, pending, max_tokens, stop_token_ids):
        return result
    steps: dict[int, tuple[SparseTree, torch.Tensor, list[int]]] = {}  # per depth limit: tree, [q, q] mask, offsets
    while True:
        cached = cache.get_seq_length()
        room = min(tree.depth, max(0, max_tokens - len(result.tokens) - 1))  # guesses beyond max_tokens are cut
        if room not in steps:
            step_tree = tree.truncated(room)
            steps[room] = (step_tree, tree_attention(step_tree.parents, m), tree_positions(step_tree.depths, m))
        step_tree, allowed, offsets = steps[room]
        candidates = [pending, *(guesses[len(p) - 1][p[-1]] for p in step_tree.paths)]
        nodes = len(candidates)
        parts = [embed(torch.tensor([candidates], device=device))]
        if m:
            parts.append(soft.repeat(nodes, 1)[None])
        out = decoder(
            inputs_embeds=torch.cat(parts, dim=1),
            cache=cache,
            use_cache=True,
            attention_mask=additive_mask(cached, allowed, parts[0].dtype).to(device),
            position_ids=torch.tensor([[cached + o for o in offsets]], device=device),
        )
        cache, hidden = out.cache, out.last_hidden_state[0]
        greedy = head(hidden[:nodes]).argmax(-1).tolist()
        path = [0]  # greedy verification: follow the child whose token is greedy's, from the root
        while nxt := next((c for c in step_tree.children[path[-1]] if candidates[c] == greedy[path[-1]]), None):
            path.append(nxt)
        keep_cache_rows(cache, cached, path)
        result.accepted.append(len(path))
        for token in [*(candidates[j] for j in path[1:]), greedy[path[-1]]]:
            if not _emit(result, token, max_tokens, stop_token_ids):
                return result
        pending = greedy[path[-1]]
        if m:
            start = nodes + path[-1] * m
            guesses = _top_guesses(head(hidden[start : start + m]), tree.width)


def _top_guesses(logits: torch.Tensor, width: int) -> list[list[int]]:
    """Each prompt token's `width` most likely tokens, best first: [m][width]."""
    return logits.topk(max(width, 1), dim=-1).indices.tolist() if logits.shape[0] else []
