"""`Loaded`: a model held warm for one deployment, with the state its engines derive from it once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the ML stacks load with the first deployment, not with the API
    from models.diffusion.model import DiffusionParts
    from models.llm.folder import CausalLM


@dataclass
class Loaded:
    """A model held warm for one deployment."""

    deployment_id: str
    kind: str
    engine: dict[str, Any]
    llm: CausalLM | None = None
    diffusion: DiffusionParts | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: int = 0  # requests running on or waiting for this model (admission in api.routes.deployments)
    # per-request generations waiting for `lock`: the batch scheduler lets them in before its next step (a lock
    # released and re-taken at once by the same thread would starve them)
    waiters: list[object] = field(default_factory=list)
    derived: dict[str, Any] = field(
        default_factory=dict
    )  # what engines compute once per warm model (PPD tree, KV config)

    @property
    def context_length(self) -> int:
        assert self.llm is not None
        config = self.llm.model.config
        return int(getattr(config, "max_position_embeddings", 0) or self.llm.tokenizer.model_max_length)
