"""The llm-training jobs (`frugal`, `stable-spam`, `sst`) run end to end, and the baselines' invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.context import Cancelled, InMemoryRunContext
from models.datasets import load_builtin
from models.lm_training import LMTrainingParams, builtin_code_corpus, fresh_llama, train_lm
from models.methods.llm_training.sst import lora_llama, relora_restarts, trainable
from models.registry import get_method

torch.set_num_threads(1)

TINY = dict(steps=3, batch_size=2, seq_len=16, max_documents=3, eval_windows=2, warmup_steps=1, vocab_size=300)


def run_job(method_id: str, **extra) -> InMemoryRunContext:
    spec = get_method(method_id)
    ctx = InMemoryRunContext(dataset=load_builtin("stdlib-code"), seed=0)
    spec.run(ctx, spec.params(**TINY, **extra))
    return ctx


def test_frugal_job_logs_state_bytes_and_registers_a_model():
    ctx = run_job("frugal", projection="svd", update_gap=2)
    assert ctx.latest("state_bytes") > 0 and ctx.latest("val_ppl") > 1
    assert "frugal-llama" in ctx.models and "curves.png" in ctx.artifacts


def test_stable_spam_job_trains_a_4bit_model():
    ctx = run_job("stable-spam", reset_interval=2)
    assert len(ctx.history("grad_norm")) == 3 and "stable-spam-llama" in ctx.models


def test_sst_job_exports_a_dense_llama():
    ctx = run_job("sst", rank=2, iteration_steps=1)
    folder = ctx.models["sst-llama"][-1]
    assert (folder / "model.safetensors").exists() and ctx.latest("state_bytes") > 0


def test_relora_restart_merges_without_changing_the_function():
    params = LMTrainingParams(**TINY)
    corpus = builtin_code_corpus(params)
    model = lora_llama(corpus, params, seed=0, rank=2)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    train_lm(model, opt, corpus, params, seed=0)  # B ≠ 0 now: the adapters carry a delta
    ids = corpus.val_windows[:1]
    before = model(input_ids=ids).logits
    relora_restarts(model, opt, every=1)(1)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(not p.any() for p in lora_b) and all(p not in opt.state for p in lora_b)


def test_lora_model_starts_equal_to_the_base_model():
    params = LMTrainingParams(**TINY)
    corpus = builtin_code_corpus(params)
    ids = corpus.val_windows[:1]
    base = fresh_llama(corpus, params, seed=0)(input_ids=ids).logits
    torch.testing.assert_close(lora_llama(corpus, params, seed=0, rank=2)(input_ids=ids).logits, base)


# -- HLP -------------------------------------------------------------------------------------------------


def test_horizon_targets_strictly_decrease_to_zero_at_end_of_infill():
    from models.methods.llm_training.hlp import horizon_targets

    for m in (1, 2, 7):
        y = horizon_targets(m)
        assert len(y) == m + 1 and y[0] == 1.0 and y[-1] == 0.0 and (y[1:] < y[:-1]).all()


def _micro_fim_setup(seq_len: int = 48):
    import random

    from models.llm.model import build_model, llama_config
    from models.llm.tokenizer import train_tokenizer
    from models.methods.llm_training.hlp import FIM_TOKENS, FimFormat, FimSampler, add_fim_tokens

    texts = [t for t in load_builtin("stdlib-code").splits["train"]["text"][:6]]
    tokenizer = train_tokenizer(texts, 300)
    model = build_model(
        llama_config("micro", len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        seed=0,
    )
    ids = add_fim_tokens(model, tokenizer)
    fmt = FimFormat(*(ids[t] for t in FIM_TOKENS), tokenizer.eos_token_id)
    random.seed(0)
    return model, tokenizer, fmt, lambda: FimSampler(tokenizer, fmt, texts, seq_len, 1.0, seed=0)


def test_fim_batches_mark_the_middle_from_mid_sentinel_to_end_of_infill():
    model, tokenizer, fmt, sampler = _micro_fim_setup()
    batch = sampler().batch(4)
    for ids, mask, target in zip(batch.input_ids, batch.horizon_mask, batch.horizon_target):
        positions = mask.nonzero().squeeze(1)
        assert ids[positions[0]] == fmt.mid and ids[positions[-1] + 1] == fmt.eoi  # t=1 at <mid>, t=M+1 predicts <eoi>
        assert target[positions[0]] == 1.0 and target[positions[-1]] == 0.0


def test_hlp_weight_zero_trains_bit_identically_to_fim_next_token_prediction():
    import copy

    from models.methods.llm_training.hlp import HLPParams, train_fim

    model, tokenizer, fmt, sampler = _micro_fim_setup()
    twin = copy.deepcopy(model)
    params = HLPParams(steps=3, batch_size=2, seq_len=48, hlp_weight=0.0)
    train_fim(model, nn.Linear(model.config.hidden_size, 1), sampler(), params)
    train_fim(twin, None, sampler(), params)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_hlp_loss_trains_the_head_and_changes_the_model():
    import copy

    from models.methods.llm_training.hlp import HLPParams, fim_losses, train_fim

    model, tokenizer, fmt, sampler = _micro_fim_setup()
    twin = copy.deepcopy(model)
    head = nn.Linear(model.config.hidden_size, 1)
    batch = sampler().batch(2)
    _, before = fim_losses(model, head, batch)
    train_fim(model, head, sampler(), HLPParams(steps=8, batch_size=2, seq_len=48, hlp_weight=1.0, lr=1e-2))
    _, after = fim_losses(model, head, batch)
    assert after < before
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# -- SeND ------------------------------------------------------------------------------------------------


def _fact_model():
    from models.llm.model import build_model, llama_config
    from models.llm.tokenizer import train_tokenizer
    from models.methods.llm_training.send import fictional_facts

    facts = fictional_facts(16)
    tokenizer = train_tokenizer([f.text for f in facts], 300)
    model = build_model(
        llama_config("micro", len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        seed=0,
    )
    return model, tokenizer, facts


def test_dropped_units_output_zero_and_receive_zero_gradient():
    from models.methods.llm_training.send import UnitMask

    model, tokenizer, facts = _fact_model()
    mask = UnitMask(model)
    dropped = torch.tensor([0, 5, 9])
    mask.drop([dropped] * len(mask.layers))
    mask.recording = True
    ids = torch.tensor([tokenizer.encode(facts[0].text)])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all((r[0][:, dropped] == 0).all() for r in mask.recorded)
    for layer in mask.layers:
        assert not layer.mlp.gate_proj.weight.grad[dropped].any() and not layer.mlp.up_proj.weight.grad[dropped].any()
        assert not layer.mlp.down_proj.weight.grad[:, dropped].any()
        assert layer.mlp.gate_proj.weight.grad.any()


def test_sensitivity_is_the_summed_swing_times_the_variance_over_checkpoints():
    from models.methods.llm_training.send import most_sensitive, sensitivity

    history = torch.tensor([[[0.0, 1.0, 2.0]], [[0.0, 3.0, 2.5]], [[0.0, 1.0, 2.0]]])  # [T=3, examples=1, units=3]
    s = sensitivity(history)
    var1 = torch.tensor([1.0, 3.0, 1.0]).var(unbiased=False)
    var2 = torch.tensor([2.0, 2.5, 2.0]).var(unbiased=False)
    torch.testing.assert_close(s, torch.stack([torch.tensor(0.0), 4.0 * var1, 1.0 * var2]))
    assert most_sensitive(history, 1 / 3).tolist() == [1]


def test_send_with_no_dropout_trains_exactly_like_normal_training():
    import copy
    import random

    from models.methods.llm_training.send import SeNDParams, fact_batches, train_facts

    model, tokenizer, facts = _fact_model()
    twin = copy.deepcopy(model)
    params = SeNDParams(epochs=3, drop_fraction=0.0)
    train_facts(model, tokenizer, facts, facts[:4], params, seed=0)
    plain = torch.optim.AdamW(twin.parameters(), lr=params.lr, weight_decay=0.0)
    rng = random.Random(0)
    for _ in range(3):
        for tokens, labels in fact_batches(tokenizer, facts, params.batch_size, rng):
            loss = twin(input_ids=tokens, labels=labels).loss
            plain.zero_grad(set_to_none=True)
            loss.backward()
            plain.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# -- cancellation --------------------------------------------------------------------------------------


def _cancel_at_first_report(ctx: InMemoryRunContext) -> list[int]:
    reports: list[int] = []

    def cancel(done: int, total: int, message: str) -> None:
        reports.append(done)
        if done < total:
            ctx.cancel()

    ctx.on_progress = cancel
    return reports


def test_train_lm_raises_cancelled_one_step_after_the_cancel():
    params = LMTrainingParams(**{**TINY, "steps": 6})
    corpus = builtin_code_corpus(params)
    model = fresh_llama(corpus, params, seed=0)
    ctx = InMemoryRunContext(seed=0)
    reports = _cancel_at_first_report(ctx)
    with pytest.raises(Cancelled):
        train_lm(model, torch.optim.AdamW(model.parameters()), corpus, params, seed=0, ctx=ctx)
    assert reports == [1] and [s for s, _ in ctx.history("train_loss")] == [1]
    assert ctx.latest("val_loss") is None  # no final evaluation of a cancelled run


def test_a_cancelled_send_run_removes_its_unit_mask():
    from models.methods.llm_training.send import SeNDParams, train_facts

    model, tokenizer, facts = _fact_model()
    ctx = InMemoryRunContext(seed=0)
    reports = _cancel_at_first_report(ctx)
    with pytest.raises(Cancelled):
        train_facts(model, tokenizer, facts, facts[:4], SeNDParams(epochs=3), seed=0, ctx=ctx)
    assert reports == [1] and len(ctx.history("train_loss")) == 1
    assert not any(layer.mlp.down_proj._forward_pre_hooks for layer in model.model.layers)


def test_a_cancelled_job_registers_nothing():
    spec = get_method("frugal")
    ctx = InMemoryRunContext(dataset=load_builtin("stdlib-code"), seed=0)
    _cancel_at_first_report(ctx)
    assert not spec.invoke(ctx, {**TINY, "update_gap": 2})
    assert not ctx.models and not ctx.artifacts and len(ctx.history("train_loss")) == 1
