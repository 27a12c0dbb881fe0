"""Warm models of the serving process: each deployment's model is loaded once and reused.

`DeploymentManager.get(deployment)` returns the loaded model, loading it on first use (or after a
restart) under a per-deployment lock, so concurrent first requests load it once. Each loaded model
carries its own `lock`: one generation at a time per model (CPU-friendly, and a model's forward with
a KV cache is not re-entrant state-wise), while different deployments run in parallel. Every
request's mutable state (the sampling generator, the KV cache, APG's momentum) is created per
request, so requests never see each other's state. `evict` drops a deleted deployment's weights.

The warm models share a memory budget (`CRUCIBLE_SERVING_MEMORY_BYTES`, counted as the bytes of their
parameters and buffers): loading one past it unloads the least recently used others, idle ones first,
and an unloaded deployment loads again on its next request. A request holding a model keeps it alive
until it ends, so eviction never pulls weights from under a generation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.engines import attention_config, resolve_device
from serving.loaded import Loaded
from serving.ppd import ppd_engine


def use_sparse_attention(model: Any, engine: dict[str, Any], deployment_id: str) -> None:
    """Register the engine's HiP / HyperAttention config under a per-deployment name and switch the model's
    prefill attention to it (decoding steps stay exact, so the KV cache and generation loop are unchanged)."""
    config = attention_config(engine)
    if config is None:
        return
    if engine["attention"] == "hip":
        from models.llm.attention.hip import register_hip as register
    else:
        from models.llm.attention.hyperattention import register_hyperattention as register
    model.set_attn_implementation(register(config, name=f"{engine['attention']}-{deployment_id or 'adhoc'}"))


def load(kind: str, folder: Path, engine: dict[str, Any], deployment_id: str = "") -> Loaded:
    """Load a folder of the given kind (raises the kits' folder errors for the caller to map)."""
    from models.diffusion.model import load_parts
    from models.llm.folder import load_folder

    if kind == "llm":
        lm = load_folder(folder, dtype=engine.get("dtype", "float32"))
        lm.model.to(resolve_device(engine))
        use_sparse_attention(lm.model, engine, deployment_id)
        loaded = Loaded(deployment_id, kind, engine, llm=lm)
        if engine.get("decoding") == "ppd":
            ppd_engine(loaded)  # PPD's hardware-aware tree size is measured here, at load, not in a request
        return loaded
    parts = load_parts(folder)
    if not any(folder.joinpath("unet").glob("*.safetensors")):
        raise FileNotFoundError("unet/ has no safetensors weights")
    return Loaded(deployment_id, kind, engine, diffusion=parts.to(resolve_device(engine)))


def loaded_bytes(loaded: Loaded) -> int:
    """Bytes of a warm model's parameters and buffers (what keeping it warm costs)."""
    modules: list[Any] = []
    if loaded.llm is not None:
        modules.append(loaded.llm.model)
    if loaded.diffusion is not None:
        modules += [v for v in vars(loaded.diffusion).values() if hasattr(v, "parameters") and hasattr(v, "buffers")]
    total = 0
    for module in modules:
        seen: set[int] = set()
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class DeploymentManager:
    def __init__(self, budget_bytes: int | None = None) -> None:
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self._bytes: dict[str, int] = {}
        self._loading: dict[str, threading.Lock] = {}
        self.budget = budget_bytes
        self.evictions = 0

    def put(self, loaded: Loaded) -> None:
        size = loaded_bytes(loaded)
        with self._lock:
            self._loaded[loaded.deployment_id] = loaded
            self._loaded.move_to_end(loaded.deployment_id)
            self._bytes[loaded.deployment_id] = size
            self._fit(keep=loaded.deployment_id)

    def _fit(self, keep: str) -> None:
        """Unload least recently used models (idle before busy) until the warm ones fit the budget."""
        if self.budget is None:
            return
        while sum(self._bytes.values()) > self.budget:
            others = [d for d in self._loaded if d != keep]
            idle = [d for d in others if not self._loaded[d].lock.locked()]
            victim = (idle or others or [None])[0]
            if victim is None:
                return  # the one model alone is over the budget: it stays (creation checks the size)
            self._loaded.pop(victim)
            self._bytes.pop(victim, None)
            self.evictions += 1

    def get(self, deployment_id: str, loader: Callable[[], Loaded]) -> Loaded:
        with self._lock:
            hit = self._loaded.get(deployment_id)
            if hit is not None:
                self._loaded.move_to_end(deployment_id)
                return hit
            gate = self._loading.setdefault(deployment_id, threading.Lock())
        with gate:  # one loader per deployment; the others wait and then find it loaded
            with self._lock:
                hit = self._loaded.get(deployment_id)
            if hit is None:
                hit = loader()
                hit.deployment_id = deployment_id
                self.put(hit)
        return hit

    def peek(self, deployment_id: str) -> Loaded | None:
        """The warm model of a deployment, if it is in memory (without loading it or touching its LRU place)."""
        with self._lock:
            return self._loaded.get(deployment_id)

    def evict(self, deployment_id: str) -> bool:
        with self._lock:
            self._loading.pop(deployment_id, None)
            self._bytes.pop(deployment_id, None)
            return self._loaded.pop(deployment_id, None) is not None

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def memory(self) -> dict[str, int]:
        """Bytes of each warm deployment's model."""
        with self._lock:
            return dict(self._bytes)
