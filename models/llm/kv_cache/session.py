"""A compressed KV cache for any caller of a model's forward (the serving generation loop included), unchanged.

`kv_session(model, press=..., projection=...)` makes every forward that would start a fresh cache (`cache` None,
`use_cache` not False) start ours instead — a `CompressedCache` compressed at prefill by `press` (EMS), or a
`ProjectedCache` under MatryoshkaKV attention — and records the caches it handed out, so the caller can report
their KV bytes. A forward pre-hook does the injection, so loops like `models.llm.generation.generate_tokens` need
no change. Everything is undone on exit (the serving engine holds the model's lock for the whole session).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from models.llm.kv_cache.cache import CompressedCache
from models.llm.kv_cache.matryoshka import KVProjection, ProjectedCache, projected
from models.llm.kv_cache.press import Press, compressing


@contextmanager
def kv_session(
    model: nn.Module, press: Press | None = None, projection: tuple[KVProjection, Any, Any] | None = None
) -> Iterator[list[Any]]:
    """Yields the list of caches the model's forwards start (newest last)."""
    caches: list[Any] = []

    def make() -> Any:
        if projection is not None:
            return ProjectedCache(projection[0])
        return CompressedCache() if press is not None else DynamicCache(config=model.config)

    def inject(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if kwargs.get("cache", kwargs.get("past_key_values")) is None and kwargs.get("use_cache") is not False:
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = make()
            caches.append(kwargs["cache"])
        return args, kwargs

    with ExitStack() as stack:
        if projection is not None:
            proj, rank_k, rank_v = projection
            saved = proj.rank_k.clone(), proj.rank_v.clone()
            proj.to(next(model.parameters()).device)
            proj.set_ranks(torch.as_tensor(rank_k), torch.as_tensor(rank_v))
            stack.callback(proj.set_ranks, *saved)
            stack.enter_context(projected(model, proj))
        stack.enter_context(compressing(model, press))
        handle = model.register_forward_pre_hook(inject, with_kwargs=True)
        stack.callback(handle.remove)
        yield caches
