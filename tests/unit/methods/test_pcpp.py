"""PCPP / DistriFusion invariants: one strip is the single-process sampler, full conditioning (sync, or
warm-up over all steps with p ≥ N − 1) is the single-process output, and the bytes each mode moves
are the closed-form counts (PCPP/DistriFusion = neighbour links / (N − 1) per rank after warm-up)."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.dit import DiTConfig, MiniDiT
from models.diffusion.patch_parallel import (
    Comm,
    ParallelSpec,
    expected_kv_bytes,
    key_range,
    sample_parallel,
    sample_rank,
    sample_single,
)

torch.set_num_threads(1)
CONFIG = DiTConfig(width=16, depth=2, heads=2)


@pytest.fixture(scope="module")
def model() -> MiniDiT:
    torch.manual_seed(0)
    m = MiniDiT(CONFIG)
    with torch.no_grad():  # adaLN-Zero starts as the identity; perturb so attention matters
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


LABELS, SEEDS = torch.tensor([3, 7]), [11, 12]


def test_one_strip_is_the_single_process_sampler_exactly(model):
    for mode in ("sync", "distrifusion", "pcpp"):
        spec = ParallelSpec(mode=mode, world=1, portion=0.3, warmup=1, steps=4)
        out = sample_rank(model, Comm(0, 1), spec, LABELS, SEEDS)
        assert torch.equal(out, sample_single(model, LABELS, SEEDS, 4)), mode


def test_key_range_follows_the_portion_formula():
    assert key_range(0, 4, 16, 0.3) == (0, 20) and key_range(1, 4, 16, 0.3) == (12, 36)
    assert key_range(3, 4, 16, 0.3) == (44, 64) and key_range(2, 4, 16, 0.0) == (32, 48)
    assert all(key_range(k, 4, 16, 3.0) == (0, 64) for k in range(4))


def test_full_conditioning_across_processes_equals_the_single_process_output(model):
    single = sample_single(model, LABELS, SEEDS, 3)
    sync = sample_parallel(model, ParallelSpec(mode="sync", world=2, steps=3), LABELS, SEEDS)
    assert sync.agree
    torch.testing.assert_close(sync.images, single, atol=1e-5, rtol=1e-5)
    full = sample_parallel(model, ParallelSpec(mode="pcpp", world=4, portion=3.0, warmup=3, steps=3), LABELS, SEEDS)
    assert full.agree
    torch.testing.assert_close(full.images, single, atol=1e-5, rtol=1e-5)
    # warm-up over every step: PCPP moves what DistriFusion's all-gather does
    assert full.kv_bytes == expected_kv_bytes(ParallelSpec("distrifusion", 4, 0.3, 3, 3), 2, CONFIG)


def test_bytes_match_the_closed_form_and_pcpp_sends_to_neighbours_only(model):
    spec_df = ParallelSpec("distrifusion", 4, 0.3, 1, 3)
    spec_pc = ParallelSpec("pcpp", 4, 0.3, 1, 3)
    df = sample_parallel(model, spec_df, LABELS, SEEDS)
    pc = sample_parallel(model, spec_pc, LABELS, SEEDS)
    assert df.agree and pc.agree
    assert df.kv_bytes == expected_kv_bytes(spec_df, 2, CONFIG)
    assert pc.kv_bytes == expected_kv_bytes(spec_pc, 2, CONFIG)
    per_layer_step = expected_kv_bytes(ParallelSpec("sync", 4, steps=1), 2, CONFIG)
    # after the one warm-up step: 6 neighbour links of 12 rank pairs at N = 4
    assert (pc.kv_bytes - per_layer_step) * 12 == (df.kv_bytes - per_layer_step) * 6
    assert df.eps_bytes == pc.eps_bytes == 3 * 4 * 3 * 2 * 3 * 4 * 16 * 4  # steps·N(N−1)·B·C·strip px·4 B
    assert [s.kv_bytes for s in pc.stats][0] < [s.kv_bytes for s in pc.stats][1]  # border ranks have one peer
    assert not torch.allclose(df.images, pc.images)


def test_pcpp_job_logs_bytes_and_fidelity():
    from models.context import InMemoryRunContext
    from models.methods.diffusion.pcpp import PCPPParams, run
    from models.registry import registered_spec

    spec, ctx = registered_spec(run), InMemoryRunContext()
    assert spec.invoke(ctx, PCPPParams(world=2, steps=2, per_class=1, smoke=True))
    assert ctx.latest("kv_bytes") > 0 and ctx.latest("psnr_vs_single") > 0
    assert "pcpp_samples.png" in ctx.artifacts
    with pytest.raises(ValueError):
        spec.invoke(ctx, PCPPParams(world=3, smoke=True))
