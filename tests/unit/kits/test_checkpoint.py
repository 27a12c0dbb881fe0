import pickle

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointFormatError, decode_checkpoint, encode_checkpoint


def test_model_and_optimizer_state_round_trip_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 7,
        "rng": torch.get_rng_state(),
        "lam": np.arange(5, dtype=np.float32),
        "pair": (1, "a"),
    }
    ckpt = decode_checkpoint(encode_checkpoint(state, step=42))
    assert ckpt.step == 42 and ckpt.state["epoch"] == 7 and ckpt.state["pair"] == (1, "a")
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.state["model"][k], v)
    assert isinstance(ckpt.state["lam"], np.ndarray) and np.array_equal(ckpt.state["lam"], state["lam"])
    restored = torch.optim.AdamW(model.parameters(), lr=1.0)
    restored.load_state_dict(ckpt.state["optimizer"])  # int-keyed optimizer state survives
    assert restored.param_groups[0]["lr"] == 3e-4
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("blob", [b"", b"garbage" * 10, pickle.dumps({"x": 1})])
def test_malformed_or_pickled_checkpoints_are_refused(blob):
    with pytest.raises(CheckpointFormatError):
        decode_checkpoint(blob)


def test_plain_safetensors_without_crucible_metadata_is_refused():
    from safetensors.torch import save

    with pytest.raises(CheckpointFormatError, match="metadata"):
        decode_checkpoint(save({"w": torch.zeros(2)}))


def test_unserialisable_state_names_its_path():
    with pytest.raises(TypeError, match="/opt/fn"):
        encode_checkpoint({"opt": {"fn": object()}}, step=0)
