"""SquareHead (Kurtic et al. 2023): the loss is zero iff hidden states match and invariant to joint scaling,
KL is a divergence, masked weights stay zero through fine-tuning, and the job resumes exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from models.context import InMemoryRunContext
from models.llm.compression.oneshot import prune_model
from models.llm.compression.pruning import SparsityPattern
from models.llm.data import fixed_windows
from models.llm.distillation import FinetuneSchedule, LossWeights, finetune, kl_loss, squarehead_loss
from models.methods.llm_compression.squarehead import SquareHeadParams, run
from tests.unit.llm_fixtures import small_corpus
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


def hidden(seed: int, layers: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 8, generator=g) * (10.0**i) for i in range(layers)]


def test_squarehead_loss_is_zero_iff_every_layer_matches():
    teacher = hidden(0)
    assert squarehead_loss(teacher, [t.clone() for t in teacher]).item() == 0.0
    for layer in range(3):
        student = [t.clone() for t in teacher]
        student[layer][0, 0, 0] += 1e-3
        assert squarehead_loss(student, teacher).item() > 0.0


def test_squarehead_loss_is_invariant_to_joint_scaling_and_normalises_each_layer():
    student, teacher = hidden(1), hidden(2)
    base = squarehead_loss(student, teacher)
    for c in (1e-3, 7.0, 1e4):
        torch.testing.assert_close(squarehead_loss([c * s for s in student], [c * t for t in teacher]), base)
    # layers of very different scale weigh alike: each term is a relative error
    torch.testing.assert_close(squarehead_loss([2 * t for t in teacher], teacher), torch.tensor(3.0))


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 4, 11)
    assert kl_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_loss(logits + torch.randn_like(logits), logits).item() > 0.0


def test_masked_weights_stay_zero_through_fine_tuning(smoke_base):
    teacher = smoke_base.model
    student = copy.deepcopy(teacher)
    windows = torch.randint(0, teacher.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = prune_model(student, windows, SparsityPattern.parse("2:4"), "sparsegpt", batch_size=2)
    stream = torch.randint(0, teacher.config.vocab_size, (500,), generator=torch.Generator().manual_seed(1))
    before = {n: p.clone() for n, p in student.named_parameters()}
    history = finetune(
        InMemoryRunContext(),
        student,
        teacher,
        stream,
        LossWeights(1.0, 0.5, 1.0),
        masks,
        FinetuneSchedule(steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1),
    )
    assert len(history) == 3 and {"ce", "kl", "sq"} <= set(history[0])
    modules = dict(student.named_modules())
    for name, keep in masks.items():
        weight = modules[name].weight
        assert torch.all(weight[~keep] == 0) and torch.all((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2)
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert all(p.grad is None or not p.requires_grad for p in teacher.parameters())


def test_squarehead_from_identical_teacher_has_zero_feature_loss(smoke_base):
    windows = fixed_windows(torch.arange(64) % smoke_base.model.config.vocab_size, 16)
    out = smoke_base.model(input_ids=windows, output_hidden_states=True)
    assert squarehead_loss(out.hidden_states[1:], [h.detach() for h in out.hidden_states[1:]]).item() == 0.0


def test_squarehead_layers_are_the_block_outputs_then_the_final_normed_state(smoke_base):
    """The hidden states the loss compares (`hidden_states[1:]`, as the reference): blocks 1 … L−1's outputs and,
    last, the final RMSNorm of block L's output (transformers 5 returns it in place of the raw block output)."""
    model = smoke_base.model
    layers = model.model.layers
    outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in layers
    ]
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    for hook in hooks:
        hook.remove()
    assert len(hidden) == len(layers) == len(outputs)
    for h, out in zip(hidden[:-1], outputs[:-1]):
        torch.testing.assert_close(h, out)
    with torch.no_grad():
        torch.testing.assert_close(hidden[-1], model.model.norm(outputs[-1]))
    assert not torch.allclose(hidden[-1], outputs[-1])


def fast_params(**overrides) -> SquareHeadParams:
    return SquareHeadParams(
        **{
            "calibration_windows": 2,
            "seq_len": 16,
            "eval_windows": 2,
            "steps": 4,
            "batch_size": 2,
            "train_tokens": 2000,
            "checkpoint_every": 2,
            "sparsity": "0.7",
            **overrides,
        }
    )


def test_run_registers_the_sparse_student_with_lineage_and_resumes_exactly(smoke_base):
    params = fast_params(model=str(smoke_base.path))
    whole, crashed, resumed = interrupted_and_resumed(run, small_corpus(), params, seed=3, stop_after=3)
    assert crashed.load_checkpoint().step == 2 and not crashed.models
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("val_ppl") == whole.latest("val_ppl")
    (name,) = whole.models
    meta = json.loads((whole.load_model(name) / "crucible-model.json").read_text())
    assert meta["method"] == "squarehead" and meta["parent"] == str(smoke_base.path) and meta["sparsity"] == "0.7"
    assert meta["metrics"]["packed_bytes"] < meta["metrics"]["packed_bytes_parent"]


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_squarehead_prunes_and_tunes_gpt_neox_and_gpt2_keeping_the_sparsity(arch, tmp_path, monkeypatch):
    """One-shot pruning and hidden-state distillation walk any decoder stack: GPT-NeoX's fused attention and
    GPT-2's Conv1D linears keep their 2:4 pattern through the fine-tuning steps."""
    from models.llm.compression.calibration import block_linears, weight_matrix
    from models.llm.folder import decoder_layers, load_folder
    from tests.unit.causal_folders import tiny_causal_folder

    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path / "home"))
    ctx = InMemoryRunContext(dataset=small_corpus())
    folder = tiny_causal_folder(tmp_path / arch, arch)
    params = SquareHeadParams(
        model=str(folder),
        sparsity="2:4",
        calibration_windows=2,
        seq_len=32,
        eval_windows=2,
        steps=2,
        batch_size=2,
        train_tokens=1000,
        checkpoint_every=0,
    )
    run(ctx, params)
    (name,) = ctx.models
    pruned = load_folder(ctx.load_model(name)).model
    for block in decoder_layers(pruned):
        for linear in block_linears(block).values():
            rows = weight_matrix(linear).reshape(weight_matrix(linear).shape[0], -1, 4)
            assert torch.all((rows != 0).sum(-1) <= 2)
