"""PASER (He et al. 2025): budgets never exceed B, JSD lies in [0, ln 2], an unpruned model gives CDS = 0 and a
uniform budget, the clustering, RAKE and concept filter behave, and the job registers a recovered model."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.context import InMemoryRunContext
from models.llm.instructions import CAPABILITIES, encode_instructions, instructions_from
from models.methods.llm_compression.paser import (
    ConceptGraph,
    PASERParams,
    allocate_budget,
    paser_select,
    rake_concepts,
    response_jsd,
    run,
    spectral_nmf_clusters,
)
from tests.unit.llm_fixtures import small_corpus

torch.set_num_threads(1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, math.log(2)), min_size=1, max_size=12), st.integers(0, 500))
def test_cluster_budgets_never_exceed_the_total(cds, budget):
    budgets = allocate_budget(dict(enumerate(cds)), budget)
    assert sum(budgets.values()) <= budget and all(b >= 0 for b in budgets.values())


def test_no_degradation_falls_back_to_a_uniform_budget():
    assert allocate_budget({0: 0.0, 1: 0.0, 2: 0.0}, 10) == {0: 3, 1: 3, 2: 3}


@pytest.fixture(scope="module")
def pool(smoke_base):
    items = instructions_from(small_corpus(30).train["text"], 5)
    ids, labels = encode_instructions(smoke_base.tokenizer, items, 64)
    fits = (labels != -100).any(1)
    return [i for i, ok in zip(items, fits.tolist()) if ok], ids[fits], labels[fits]


def test_jsd_is_zero_for_the_same_model_and_bounded_by_ln2(smoke_base, pool):
    _, ids, labels = pool
    model = smoke_base.model
    assert torch.all(response_jsd(model, model, ids, labels).abs() < 1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(-50.0)  # wildly different distributions
    jsd = response_jsd(model, other, ids, labels)
    assert torch.all((jsd >= 0) & (jsd <= math.log(2))) and torch.all(jsd > 0.01)


def test_unpruned_model_gives_zero_degradation_and_uniform_budgets(smoke_base, pool):
    items, ids, labels = pool
    jsd = response_jsd(smoke_base.model, smoke_base.model, ids, labels)
    clusters = np.arange(len(items)) % 3
    chosen = paser_select(items, jsd, (ids != 1).sum(1), clusters, budget=9)
    assert all(abs(v) < 1e-6 for v in chosen.cds.values())
    assert chosen.budgets == {0: 3, 1: 3, 2: 3} and len(chosen.indices) <= 9


def test_instruction_labels_cover_only_the_response(smoke_base, pool):
    items, ids, labels = pool
    assert {i.capability for i in items} == set(CAPABILITIES)
    prompt = smoke_base.tokenizer(items[0].prompt, add_special_tokens=False)["input_ids"]
    assert torch.all(labels[0, : len(prompt)] == -100) and labels[0, len(prompt)] == ids[0, len(prompt)]


def test_spectral_nmf_recovers_well_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 5
    x = np.concatenate([c + 0.1 * rng.standard_normal((20, 8)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = spectral_nmf_clusters(x, 3, seed=0)
    for group in range(3):
        assert len(set(labels[group * 20 : (group + 1) * 20])) == 1
    assert len(set(labels)) == 3


def test_rake_scores_multiword_phrases_first_and_is_deterministic():
    text = "Return the parsed email header value; parse email header fields"
    concepts = rake_concepts(text)
    assert concepts == rake_concepts(text) and concepts[0] in ("parsed email header value", "parse email header fields")


def test_concept_graph_flags_present_but_unlinked_concepts():
    graph = ConceptGraph()
    graph.add(["socket", "timeout"])
    graph.add(["json", "decoder"])
    assert not graph.conflicts(["socket", "timeout", "retry"])  # linked, plus a new one
    assert graph.conflicts(["socket", "json"])  # both known, never together
    assert not graph.conflicts(["fresh", "ideas"])


def test_run_selects_recovers_and_registers(smoke_base):
    ctx = InMemoryRunContext(dataset=small_corpus(30))
    run(
        ctx,
        PASERParams(
            model=str(smoke_base.path),
            pool_per_capability=4,
            embedder="tfidf",
            clusters=2,
            calibration_windows=2,
            seq_len=32,
            max_len=96,
            budget=0.5,
        ),
    )
    (name,) = ctx.models
    meta = json.loads((ctx.load_model(name) / "crucible-model.json").read_text())
    assert meta["method"] == "paser" and meta["selected"] >= 1
    selection = json.loads(ctx.artifacts["selection.json"][1])
    assert (
        sum(selection["budgets"].values()) <= selection["budget"] and len(selection["selected"]) <= selection["budget"]
    )
    assert 0 < ctx.latest("heldout_nll")
