"""Checkpoint encoding: any nested state (tensors, arrays, plain values) ⇄ one safetensors file.

Tensors go into the safetensors payload under their path in the state tree; everything else (the
tree's shape, ints, floats, strings, optimizer hyper-parameters, dicts with int keys) goes into a
JSON skeleton stored in the file's metadata. Loading therefore never unpickles anything, which is
the point: checkpoints may come from users.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.provenance import file_digest, note_input

SKELETON_KEY = "crucible.state"
FORMAT_KEY = "crucible.format"
FORMAT = "crucible-checkpoint/1"


class CheckpointFormatError(ValueError):
    """A checkpoint file that is not a Crucible safetensors checkpoint, or is damaged."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    state: dict[str, Any]


def _encode(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[path] = node.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(node, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(node)).clone()
        return {"__ndarray__": path}
    if isinstance(node, Mapping):
        if all(isinstance(k, str) for k in node):
            return {"__map__": {k: _encode(v, f"{path}/{k}", tensors) for k, v in node.items()}}
        # optimizer state_dicts key their state by int parameter index
        return {"__pairs__": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]
        return {"__tuple__": items} if isinstance(node, tuple) else items
    if isinstance(node, (np.integer, np.floating, np.bool_)):
        return node.item()
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(
        f"checkpoint state at {path or '/'} has a {type(node).__name__}; "
        "use tensors, arrays, numbers, strings, lists and dicts"
    )


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy()
    if "__map__" in node:
        return {k: _decode(v, tensors) for k, v in node["__map__"].items()}
    if "__pairs__" in node:
        return {k: _decode(v, tensors) for k, v in node["__pairs__"]}
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    raise CheckpointFormatError(f"unknown node in checkpoint skeleton: {sorted(node)}")


def encode_checkpoint(state: Mapping[str, Any], step: int) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(dict(state), "", tensors)
    metadata = {FORMAT_KEY: FORMAT, SKELETON_KEY: json.dumps({"step": int(step), "state": skeleton})}
    return st_save(tensors, metadata=metadata)


def decode_checkpoint(blob: bytes) -> Checkpoint:
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"not a safetensors file: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    if metadata.get(FORMAT_KEY) != FORMAT or SKELETON_KEY not in metadata:
        raise CheckpointFormatError(f"safetensors file lacks the {FORMAT} metadata")
    try:
        body = json.loads(metadata[SKELETON_KEY])
        return Checkpoint(step=int(body["step"]), state=_decode(body["state"], tensors))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"damaged checkpoint skeleton: {exc}") from exc


def trained_once(path: Path, model: torch.nn.Module, train: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`model` with the weights cached at `path` (safetensors), or `train()`'s result, then cached there.

    For the small helper models a method family trains once per cache folder (an evaluation classifier, a base
    network): the file is written to a `.partial` name and renamed, so a crash never leaves a half file that
    the next run would load."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        model.load_state_dict(load_file(str(path)))
        note_input(path.name, file_digest(path))
        return model.eval()
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(path)
    note_input(path.name, file_digest(path))
    return model
