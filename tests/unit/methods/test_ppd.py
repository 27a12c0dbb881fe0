"""PPD invariants: decoding with any prompt embeddings reproduces greedy decoding token for token; with no
prompt tokens it is greedy at one token per step; the accepted length is ≥ 1; the KD loss is zero iff the student's
distributions equal the teacher's and weighs offset i by 0.8^i; only the prompt embeddings train; the packed
training forward (K truncation points, 4-D mask) and the decoding step's chain mask give exactly the logits of
plain forwards of the same token sequences."""

from __future__ import annotations

import pytest
import torch

from models.context import Cancelled, InMemoryRunContext, stop_if_cancelled
from models.llm.distillation import kl_loss
from models.llm.generation import SamplingParams, generate_tokens
from models.llm.model import build_model, llama_config
from models.llm.parallel_prompt import (
    PromptTokens,
    batch_loss,
    kd_loss,
    ppd_generate,
    prompt_forward,
    random_cuts,
    train_prompts,
)

torch.set_num_threads(1)
VOCAB = 256


def chain_mask(cached: int, nodes: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    """The chain verification mask built directly, as the oracle the tree mechanism is checked against: [1, 1, q,
    cached + q] additive mask for `nodes` chain candidates followed by one group of m prompt tokens
    per candidate: candidate j sees the cache and candidates 0…j; group j's token i sees the cache, candidates
    0…j and its own tokens 0…i."""
    q = nodes + nodes * m
    allowed = torch.zeros(q, cached + q, dtype=torch.bool)
    allowed[:, :cached] = True
    allowed[:nodes, cached : cached + nodes] = torch.ones(nodes, nodes, dtype=torch.bool).tril()
    own = torch.ones(m, m, dtype=torch.bool).tril()
    for j in range(nodes):
        rows = slice(nodes + j * m, nodes + (j + 1) * m)
        allowed[rows, cached : cached + j + 1] = True
        allowed[rows, cached + nodes + j * m : cached + nodes + (j + 1) * m] = own
    return torch.zeros(q, cached + q, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@pytest.fixture(scope="module")
def model():
    return build_model(llama_config("micro", VOCAB), seed=0).eval()


def random_prompts(model, m: int, seed: int, scale: float = 1.0) -> PromptTokens:
    prompts = PromptTokens(m, model.config.hidden_size)
    with torch.no_grad():
        prompts.embeddings.copy_(
            scale * torch.randn(m, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
        )
    return prompts


def greedy(model, prefix: list[int], n: int) -> list[int]:
    return list(generate_tokens(model, prefix, SamplingParams(max_tokens=n, temperature=0.0), torch.Generator()))


def prefix_ids(seed: int, n: int = 12) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("m,seed,scale", [(1, 0, 1.0), (3, 1, 1.0), (4, 2, 10.0), (2, 3, 0.0)])
def test_output_equals_greedy_for_any_prompt_embeddings(model, m, seed, scale):
    prefix = prefix_ids(seed)
    result = ppd_generate(model, random_prompts(model, m, seed, scale), prefix, 24)
    assert result.tokens == greedy(model, prefix, 24)
    assert all(1 <= a <= m + 1 for a in result.accepted)
    assert sum(result.accepted) >= len(result.tokens) - 1  # prefill gives one token, every step ≥ 1


def test_output_equals_greedy_after_training(model):
    prompts = random_prompts(model, 3, 4)
    stream = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(5))
    train_prompts(model, prompts, stream, steps=3, batch_size=2, seq_len=24, cuts_per_window=3, lr=0.5)
    prefix = prefix_ids(6)
    assert ppd_generate(model, prompts, prefix, 20).tokens == greedy(model, prefix, 20)


def test_greedy_guesses_are_accepted(model):
    """Acceptance is real, not only safe: a model that repeats its greedy loop is guessed right by prompts whose
    logits are steered to the loop's token, and the steps then accept m+1 tokens."""
    prefix = prefix_ids(7)
    reference = greedy(model, prefix, 40)
    # PPD with prompts equal to the embedding of the token the base repeats at the end of its greedy run, if any
    token = reference[-1]
    prompts = PromptTokens(3, model.config.hidden_size)
    with torch.no_grad():
        prompts.embeddings.copy_(model.get_input_embeddings().weight[token].expand(3, -1))
    result = ppd_generate(model, prompts, prefix, 40)
    assert result.tokens == reference
    assert result.forwards <= len(result.tokens)


def test_zero_prompt_tokens_is_one_token_per_step(model):
    prefix = prefix_ids(8)
    for prompts in (None, PromptTokens(0, model.config.hidden_size)):
        result = ppd_generate(model, prompts, prefix, 15)
        assert result.tokens == greedy(model, prefix, 15)
        assert result.accepted == [1] * 14 and result.mean_accepted == 1.0
        assert result.forwards == len(result.tokens)


def test_stop_token_ends_without_being_emitted(model):
    prefix = prefix_ids(9)
    reference = greedy(model, prefix, 20)
    stop = reference[5]
    result = ppd_generate(model, random_prompts(model, 3, 9), prefix, 20, stop_token_ids=frozenset({stop}))
    assert result.tokens == reference[: reference.index(stop)]


def test_kd_loss_zero_iff_equal_and_decayed_per_offset():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 3, 11, generator=g)
    assert float(kd_loss(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-6)
    student = teacher.clone()
    student[..., 2, :] = torch.randn(2, 5, 11, generator=g)
    expected = 0.8**2 * kl_loss(student[..., 2, :], teacher[..., 2, :]) / 3
    assert float(kd_loss(student, teacher)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kd_loss(student, teacher)) > 0


def test_training_forward_matches_plain_forwards(model):
    """Group k of the packed forward sees exactly x[:cut_k] + its prompts; the x rows are the plain forward."""
    prompts = random_prompts(model, 3, 10)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(11))
    cuts = [1, 7, 17]
    with torch.no_grad():
        teacher, student = prompt_forward(model, prompts, ids, cuts)
        assert torch.allclose(teacher, model(input_ids=ids).logits, atol=1e-5)
        embed = model.get_input_embeddings()
        for k, cut in enumerate(cuts):
            x = torch.cat([embed(ids[:, :cut]), prompts.embeddings[None].expand(2, -1, -1)], dim=1)
            assert torch.allclose(student[:, k], model(inputs_embeds=x).logits[:, cut:], atol=1e-5)


def test_only_prompt_embeddings_receive_gradients(model):
    prompts = random_prompts(model, 2, 12)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(13))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    # the teacher rows do not depend on the prompts (no leak through the mask)
    teacher, _ = prompt_forward(model, prompts, ids, [3, 9])
    leak = torch.autograd.grad(teacher.sum(), prompts.embeddings, allow_unused=True)[0]
    assert leak is None or float(leak.abs().max()) == 0.0
    model.zero_grad(set_to_none=True)
    start = prompts.embeddings.detach().clone()
    stream = torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(14))
    losses = train_prompts(model, prompts, stream, steps=3, batch_size=2, seq_len=16, cuts_per_window=2)
    assert len(losses) == 3
    assert not torch.equal(prompts.embeddings, start)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    loss, _, _ = batch_loss(model, prompts, ids, [4])
    assert loss.requires_grad


def test_decoding_step_mask_matches_plain_forwards(model):
    """With a cached prefix, candidate j's logits and prompt group j's logits equal the uncached forward of
    prefix + candidates[:j+1] (+ prompts): positions and the chain mask place every token as in training."""
    from transformers import DynamicCache

    prompts = random_prompts(model, 2, 15)
    prefix = torch.tensor([prefix_ids(16, 9)])
    candidates = torch.tensor([[5, 17, 99]])
    nodes, m = 3, 2
    embed = model.get_input_embeddings()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix, cache=cache, use_cache=True)
        x = torch.cat([embed(candidates), prompts.embeddings.repeat(nodes, 1)[None]], dim=1)
        positions = [9, 10, 11] + [p for j in range(nodes) for p in range(10 + j, 10 + j + m)]
        logits = model(
            inputs_embeds=x,
            cache=cache,
            use_cache=True,
            attention_mask=chain_mask(9, nodes, m, x.dtype),
            position_ids=torch.tensor([positions]),
        ).logits[0]
        plain = model(input_ids=torch.cat([prefix, candidates], dim=1)).logits[0, 9:]
        assert torch.allclose(logits[:nodes], plain, atol=1e-5)
        for j in range(nodes):
            seq = torch.cat([embed(torch.cat([prefix, candidates[:, : j + 1]], dim=1)), prompts.embeddings[None]], 1)
            ref = model(inputs_embeds=seq).logits[0, -m:]
            assert torch.allclose(logits[nodes + j * m : nodes + (j + 1) * m], ref, atol=1e-5)


def test_random_cuts_leave_room_for_targets():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cuts = random_cuts(16, 3, 5, g)
        assert len(set(cuts)) == len(cuts) == 5 and all(1 <= c <= 13 for c in cuts)


def test_output_equals_transformers_greedy_generate(model):
    """Library parity: the same tokens as HF `generate(do_sample=False)` (up to its end-of-text stop)."""
    prefix = prefix_ids(17)
    hf = model.generate(torch.tensor([prefix]), max_new_tokens=20, do_sample=False, pad_token_id=1)[0, len(prefix) :]
    ours = ppd_generate(model, random_prompts(model, 3, 17), prefix, 20).tokens
    assert ours[: len(hf)] == hf.tolist()


def test_a_cancel_stops_training_and_restores_the_base(model):
    prompts = random_prompts(model, 2, 12)
    flags = [p.requires_grad for p in model.parameters()]
    stream = torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(14))
    ctx, steps = InMemoryRunContext(), []

    def on_step(step: int, loss: float) -> None:
        steps.append(step)
        ctx.cancel()
        stop_if_cancelled(ctx)

    with pytest.raises(Cancelled):
        train_prompts(model, prompts, stream, steps=5, batch_size=2, seq_len=16, cuts_per_window=2, on_step=on_step)
    assert steps == [1]
    assert [p.requires_grad for p in model.parameters()] == flags


def test_job_cancelled_during_training_registers_nothing():
    """Cancelled after its first training step, the job stops there: one logged loss and no registered model."""
    from models.registry import get_method

    class CancelOnFirstLoss(InMemoryRunContext):
        def log(self, step: int, **metrics: float) -> None:
            super().log(step, **metrics)
            if "train_kd_loss" in metrics:
                self.cancel()

    spec = get_method("ppd")
    ctx = CancelOnFirstLoss()
    assert not spec.invoke(ctx, {**spec.tiny, "steps": 5})
    assert len(ctx.history("train_kd_loss")) == 1
    assert "ppd" not in ctx.models and not ctx.artifacts
