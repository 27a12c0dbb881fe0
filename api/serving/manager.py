"""Warm models of the serving process: each deployment's model is loaded once and reused.

`DeploymentManager.get(deployment)` returns the loaded model, loading it on first use (or after a
restart) under a per-deployment lock, so concurrent first requests load it once. Each loaded model
carries its own `lock`: one generation at a time per model (CPU-friendly, and a model's forward with
a KV cache is not re-entrant state-wise), while different deployments run in parallel. Every
request's mutable state (the sampling generator, the KV cache, APG's momentum) is created per
request, so requests never see each other's state. `evict` drops a deleted deployment's weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.serving.engines import attention_config, resolve_device
from api.serving.loaded import Loaded
from api.serving.ppd import ppd_engine


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


class DeploymentManager:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, Loaded] = {}
        self._loading: dict[str, threading.Lock] = {}

    def put(self, loaded: Loaded) -> None:
        with self._lock:
            self._loaded[loaded.deployment_id] = loaded

    def get(self, deployment_id: str, loader: Callable[[], Loaded]) -> Loaded:
        with self._lock:
            hit = self._loaded.get(deployment_id)
            if hit is not None:
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

    def evict(self, deployment_id: str) -> bool:
        with self._lock:
            self._loading.pop(deployment_id, None)
            return self._loaded.pop(deployment_id, None) is not None

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)
