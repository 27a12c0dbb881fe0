"""Patch-parallel DDIM sampling of the mini-DiT across processes (torch.distributed, gloo on CPU):
full synchronous exchange, DistriFusion's stale all-gather, and PCPP's partial neighbour exchange.

The image's patch rows are split into N horizontal strips of L tokens; rank k computes ε for strip k,
ε is all-gathered every step and every rank steps the scheduler on the full x_t. Only self-attention
crosses strips (`models.diffusion.dit`), so the modes differ in which K, V a strip attends to:

* `sync`: fresh K, V of every strip, all-gathered per layer — the single-process result.
* `distrifusion` (Li et al., "DistriFusion", CVPR 2024, §4.1): own fresh K, V plus the other strips'
  *stale* K, V from the previous step; this step's K, V are all-gathered for the next step (the
  reference overlaps that with compute; here it is synchronous, which changes time, not numerics).
* `pcpp` (PCPP, "Partially Conditioned Patch Parallelism for Accelerated Diffusion Model
  Inference"): K, V go only to the two neighbouring ranks, and strip k attends to tokens
  [max(0, kL − ⌊pL⌋), min(NL, (k+1)L + ⌊pL⌋)) — its own fresh K, V and the adjacent p-portion of its
  neighbours' stale ones (the reference's `portion`, default 0.3; like the reference we send whole
  neighbour strips, so bytes do not depend on p; outside warm-up p is capped at 1).
The first `warmup` steps are synchronous in DistriFusion and PCPP (PCPP still restricts them to its
key range, so warm-up ≥ steps with p ≥ N − 1 is exactly `sync`).

Every tensor a rank receives is counted in `Comm`: bytes and messages, K/V and ε apart, so the
claim is measured as communication volume; time is not the claim here (2 shared CPU cores).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

from models.diffusion.dit import DiTConfig, MiniDiT
from models.diffusion.model import training_scheduler

Mode = Literal["sync", "distrifusion", "pcpp"]


@dataclass
class CommStats:
    kv_bytes: int = 0
    eps_bytes: int = 0
    messages: int = 0


class Comm:
    """Collectives over the default process group (or none when world = 1), counting received bytes."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.stats = CommStats()

    def _count(self, t: torch.Tensor, n: int, kind: str) -> None:
        if kind == "kv":
            self.stats.kv_bytes += n * t.numel() * t.element_size()
        else:
            self.stats.eps_bytes += n * t.numel() * t.element_size()
        self.stats.messages += n

    def all_gather(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        if self.world == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        self._count(t, self.world - 1, kind)
        return out

    def neighbours(self, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send `t` to ranks k−1 and k+1 and receive theirs (None at the image border)."""
        peers = [r for r in (self.rank - 1, self.rank + 1) if 0 <= r < self.world]
        got = {r: torch.empty_like(t) for r in peers}
        ops = [dist.P2POp(dist.isend, t.contiguous(), r) for r in peers] + [
            dist.P2POp(dist.irecv, got[r], r) for r in peers
        ]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for _ in peers:
            self._count(t, 1, "kv")
        return got.get(self.rank - 1), got.get(self.rank + 1)


def key_range(rank: int, world: int, tokens: int, portion: float) -> tuple[int, int]:
    """PCPP's keys for strip `rank` of `world` strips of `tokens` tokens each."""
    extra = math.floor(portion * tokens)
    return max(0, rank * tokens - extra), min(world * tokens, (rank + 1) * tokens + extra)


@dataclass(frozen=True)
class ParallelSpec:
    mode: Mode = "pcpp"
    world: int = 2
    portion: float = 0.3
    warmup: int = 1
    steps: int = 20


class StripAttention:
    """The `attend` callback of one rank: builds the K, V a strip sees under the mode, and exchanges."""

    def __init__(self, comm: Comm, spec: ParallelSpec, tokens: int):
        self.comm, self.spec, self.tokens = comm, spec, tokens
        self.stale: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh = True

    def _own(self) -> slice:
        return slice(self.comm.rank * self.tokens, (self.comm.rank + 1) * self.tokens)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        spec, own, world = self.spec, self._own(), self.comm.world
        if self.fresh:
            kv = torch.cat(self.comm.all_gather(torch.stack([k, v]), "kv"), dim=3)
            keys, values = kv[0], kv[1]
            self.stale[layer] = (keys, values)
            portion = spec.portion if spec.mode == "pcpp" else world
        else:
            old_k, old_v = self.stale[layer]
            keys, values = old_k.clone(), old_v.clone()
            keys[:, :, own], values[:, :, own] = k, v
            fresh_kv = torch.stack([k, v])
            if spec.mode == "distrifusion":
                parts = self.comm.all_gather(fresh_kv, "kv")
                self.stale[layer] = tuple(torch.cat([p[i] for p in parts], dim=2) for i in range(2))
                portion = world
            else:
                left, right = self.comm.neighbours(fresh_kv)
                new_k, new_v = old_k.clone(), old_v.clone()
                for r, got in ((self.comm.rank - 1, left), (self.comm.rank + 1, right)):
                    if got is not None:
                        s = slice(r * self.tokens, (r + 1) * self.tokens)
                        new_k[:, :, s], new_v[:, :, s] = got[0], got[1]
                new_k[:, :, own], new_v[:, :, own] = k, v
                self.stale[layer] = (new_k, new_v)
                portion = min(spec.portion, 1.0)
        lo, hi = key_range(self.comm.rank, world, self.tokens, portion)
        return F.scaled_dot_product_attention(q, keys[:, :, lo:hi], values[:, :, lo:hi])


def initial_noise(seeds: list[int]) -> torch.Tensor:
    from models.diffusion.sampling import initial_noise as per_seed

    return per_seed(seeds, (3, 16, 16))


@torch.no_grad()
def sample_rank(model: MiniDiT, comm: Comm, spec: ParallelSpec, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """One rank's DDIM loop (ε-prediction, η = 0); every rank returns the same full final images."""
    grid = model.config.grid
    if grid % spec.world:
        raise ValueError(f"{grid} patch rows do not split into {spec.world} strips")
    rows = grid // spec.world
    scheduler = DDIMScheduler.from_config(training_scheduler().config)
    scheduler.set_timesteps(spec.steps)
    x = initial_noise(seeds)
    attention = StripAttention(comm, spec, rows * grid)
    px = rows * model.config.patch
    for i, t in enumerate(scheduler.timesteps):
        attention.fresh = spec.mode == "sync" or i < spec.warmup
        strip = x[:, :, comm.rank * px : (comm.rank + 1) * px]
        eps_strip = model.forward_rows(strip, t.view(1), labels, comm.rank * rows, attention)
        eps = torch.cat(comm.all_gather(eps_strip, "eps"), dim=2)
        x = scheduler.step(eps, t, x).prev_sample
    return x


@torch.no_grad()
def sample_single(model: MiniDiT, labels: torch.Tensor, seeds: list[int], steps: int) -> torch.Tensor:
    """The single-process reference: the whole image, full attention (what `sync` must reproduce)."""
    scheduler = DDIMScheduler.from_config(training_scheduler().config)
    scheduler.set_timesteps(steps)
    x = initial_noise(seeds)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.view(1), labels), t, x).prev_sample
    return x


@dataclass
class ParallelResult:
    images: torch.Tensor  # model space, rank 0's copy
    stats: list[CommStats] = field(default_factory=list)  # per rank
    agree: bool = True  # every rank ended with the same images

    @property
    def kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.stats)

    @property
    def eps_bytes(self) -> int:
        return sum(s.eps_bytes for s in self.stats)


def _worker(rank: int, folder: str, spec_json: str, config_json: str) -> None:
    """Entry point of one spawned rank: gloo through a file store (no ports), results to `folder`."""
    torch.set_num_threads(1)
    root = Path(folder)
    spec = ParallelSpec(**json.loads(spec_json))
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=spec.world)
    try:
        config = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(config_json).items()})
        model = MiniDiT(config)
        model.load_state_dict(load_file(str(root / "model.safetensors")))
        inputs = load_file(str(root / "inputs.safetensors"))
        comm = Comm(rank, spec.world)
        x = sample_rank(model.eval(), comm, spec, inputs["labels"], inputs["seeds"].tolist())
        save_file({"images": x.contiguous()}, str(root / f"rank{rank}.safetensors"))
        (root / f"rank{rank}.json").write_text(json.dumps(asdict(comm.stats)))
    finally:
        dist.destroy_process_group()


def sample_parallel(model: MiniDiT, spec: ParallelSpec, labels: torch.Tensor, seeds: list[int]) -> ParallelResult:
    """Run `spec.world` processes (torch.multiprocessing, forked; gloo) and collect rank 0's images and
    every rank's communication counts."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="crucible-pcpp-") as tmp:
        root = Path(tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
        save_file({"labels": labels.contiguous(), "seeds": torch.tensor(seeds)}, str(root / "inputs.safetensors"))
        # fork: the ranks inherit the imported modules (a spawned interpreter re-imports torch and diffusers,
        # which on a loaded 2-core machine costs a minute per rank)
        mp.start_processes(
            _worker,
            args=(tmp, json.dumps(asdict(spec)), json.dumps(asdict(model.config))),
            nprocs=spec.world,
            join=True,
            start_method="fork",
        )
        images = [load_file(str(root / f"rank{r}.safetensors"))["images"] for r in range(spec.world)]
        stats = [CommStats(**json.loads((root / f"rank{r}.json").read_text())) for r in range(spec.world)]
    return ParallelResult(images[0], stats, all(torch.equal(images[0], im) for im in images[1:]))


def expected_kv_bytes(spec: ParallelSpec, batch: int, config: DiTConfig) -> int:
    """Total K/V bytes received by all ranks: every warm-up (or `sync`) layer all-gathers N−1 strips per
    rank; afterwards DistriFusion still does, PCPP receives only from its 1 or 2 neighbours."""
    n = spec.world
    tokens = config.grid * config.grid // n
    per_strip = 2 * batch * tokens * config.width * 4  # K and V, float32
    fresh_steps = spec.steps if spec.mode == "sync" else min(spec.warmup, spec.steps)
    partners = n * (n - 1) if spec.mode != "pcpp" else 2 * (n - 1)  # neighbour links, both directions
    return config.depth * per_strip * (fresh_steps * n * (n - 1) + (spec.steps - fresh_steps) * partners)
