"""A PPD deployment's decoding state: its prompt tokens and the candidate tree sized for this machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.loaded import Loaded


@dataclass
class PPDEngine:
    """A deployment's parallel prompt decoding: its trained prompt tokens and the candidate tree it verifies, sized
    for this machine (`tree_nodes`; a model whose ppd job measured no acceptance rates uses the chain)."""

    prompts: Any
    tree: Any
    tree_nodes: int
    choice: Any = None  # the hardware-aware TreeChoice (latencies per size), when rates were available


def ppd_engine(loaded: Loaded) -> PPDEngine:
    """Read once per warm model: the prompt tokens from the folder and, from the acceptance rates the ppd job
    measured, the sparse tree of the size that maximises expected tokens/s given the verification latency
    measured here, at load (PPD's hardware-aware tree size)."""
    from models.llm.parallel_prompt import PROMPTS_FILE, load_prompts
    from models.llm.prompt_tree import chain_tree, hardware_aware_tree

    assert loaded.llm is not None
    if "ppd" not in loaded.derived:
        prompts, rates = load_prompts(loaded.llm.path / PROMPTS_FILE)
        if rates is None or prompts.count == 0:
            loaded.derived["ppd"] = PPDEngine(prompts, chain_tree(prompts.count), prompts.count)
        else:
            choice = hardware_aware_tree(
                loaded.llm.model, rates[: prompts.count], context=min(128, max(1, loaded.context_length // 2))
            )
            loaded.derived["ppd"] = PPDEngine(prompts, choice.tree, choice.nodes, choice)
    return loaded.derived["ppd"]
