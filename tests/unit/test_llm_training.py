"""The llm-training jobs (`frugal`, `stable-spam`, `sst`) run end to end, and the baselines' invariants."""

from __future__ import annotations

import torch

from models.context import InMemoryRunContext
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
