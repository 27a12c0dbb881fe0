"""Retrieval tuning: needle sequences are well formed, tuning code never overlaps the held-out evaluation code, and
a few tuning steps lower the loss on the key tokens."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from models.context import Cancelled, InMemoryRunContext
from models.datasets import Dataset, Split
from models.llm.data import token_stream
from models.llm.passkey import NeedleTokens, passkey_samples
from models.llm.retrieval_tuning import (
    RETRIEVAL_RECIPES,
    needle_batch,
    retrieval_loss,
    tune_for_retrieval,
    tuning_step,
    tuning_stream,
)
from tests.unit.llm_fixtures import small_corpus

torch.set_num_threads(1)


def test_needle_batch_ends_in_the_question_and_its_key(smoke_base):
    tok = smoke_base.tokenizer
    pieces = NeedleTokens.of(tok)
    stream = token_stream(tok, small_corpus().train["text"], max_tokens=2000)
    ids, mask = needle_batch(tok, pieces, stream, 96, 3, random.Random(0))
    assert ids.shape == mask.shape == (3, 96)
    for row, m in zip(ids.tolist(), mask.tolist()):
        key = [t for t, k in zip(row, m) if k]
        assert 2 <= len(key) <= 5 and all(m[-len(key) :])  # the key tokens are the last ones, only they are marked
        question = row[-len(key) - len(pieces.prefix) : -len(key)]
        assert question == pieces.prefix
        needle = pieces.prefix + key + pieces.newline
        starts = [i for i in range(len(row) - len(needle)) if row[i : i + len(needle)] == needle]
        assert len(starts) == 1  # the needle carries the same key the answer asks for


def test_tuning_code_and_evaluation_code_are_disjoint(smoke_base):
    """Tuning sequences are cut from the train split only, passkey evaluation sets from the validation split only:
    with a train split of `alpha` lines and a validation split of `omega` lines, neither side holds the other's."""
    tok = smoke_base.tokenizer
    texts = {"train": ["alpha = alpha + 1\n" * 200] * 3, "val": ["omega = omega - 2\n" * 200] * 3}
    ds = Dataset("two-streams", "text-corpus", {s: Split({"text": t}) for s, t in texts.items()})
    recipe = replace(RETRIEVAL_RECIPES[True], train_tokens=3000)
    rows, _ = needle_batch(tok, NeedleTokens.of(tok), tuning_stream(tok, ds, recipe), 96, 8, random.Random(0))
    tuning = tok.decode(rows.flatten().tolist())
    held_out = token_stream(tok, ds.val["text"], max_tokens=3000)
    evaluation = tok.decode(torch.cat([s.prompt for s in passkey_samples(tok, held_out, 96, (0.2, 0.8), 3)]).tolist())
    assert "alpha" in tuning and "omega" not in tuning
    assert "omega" in evaluation and "alpha" not in evaluation


def test_the_builtin_splits_share_no_file():
    from models.datasets import load_builtin

    ds = load_builtin("stdlib-code")
    assert ds.val["path"] and not set(ds.train["path"]) & set(ds.val["path"])


def test_a_few_tuning_steps_lower_the_key_loss(smoke_base):
    tok = smoke_base.tokenizer
    model = type(smoke_base.model)(smoke_base.model.config)
    model.load_state_dict(smoke_base.model.state_dict())
    stream = token_stream(tok, small_corpus().train["text"], max_tokens=4000)
    recipe = replace(RETRIEVAL_RECIPES[True], stages=((12, (48, 64)),))
    probe = needle_batch(tok, NeedleTokens.of(tok), stream, 64, 8, random.Random(99))
    with torch.no_grad():
        before = retrieval_loss(model.eval(), *probe, recipe.key_weight)[1].item()
    history = tune_for_retrieval(model, tok, stream, recipe)
    with torch.no_grad():
        after = retrieval_loss(model, *probe, recipe.key_weight)[1].item()
    assert len(history) == 12 and after < before


def test_compressed_passkey_prefills_only_the_context(smoke_base):
    """The press sees the prompt without its question (else the prefill's own forward would read the uncompressed
    needle), and with no press the ranking equals the plain model's."""
    from models.llm.kv_cache.evaluation import passkey_hits
    from models.llm.kv_cache.press import Compressed
    from models.llm.passkey import candidate_loglik

    tok = smoke_base.tokenizer
    samples = passkey_samples(tok, token_stream(tok, small_corpus().val["text"], max_tokens=2000), 80, (0.3, 0.7), 2)
    seen = []

    class Recording:
        needs_attention = False

        def compress(self, module, keys, values, attention):
            seen.append(keys.shape[2])
            return Compressed(keys, values)

    compressed = passkey_hits(smoke_base.model, samples, Recording())
    assert set(seen) == {80 - len(NeedleTokens.of(tok).prefix)}
    plain = [bool(candidate_loglik(smoke_base.model, s).argmax() == 0) for s in samples]
    assert compressed == plain == passkey_hits(smoke_base.model, samples, None)
    seen.clear()  # query-aware mode: the question but its last token is compressed with the context
    assert passkey_hits(smoke_base.model, samples, Recording(), question_in_context=True) == plain
    assert set(seen) == {79}


def test_a_tuning_step_reports_progress_and_stops_a_cancelled_run():
    ctx = InMemoryRunContext()
    tuning_step(ctx, 0, 10, 2.5)
    assert ctx.progress_state[:2] == (1, 10)
    ctx.cancel()
    with pytest.raises(Cancelled):
        tuning_step(ctx, 1, 10, 2.0)
