"""Riemannian Adam (Bécigneul & Ganea, "Riemannian Adaptive Optimization Methods", ICLR 2019), from geoopt.

Points declared as `geoopt.ManifoldParameter` move along the ball's geodesics (retraction by exp_x and
transport of the moments); every other parameter gets Adam's update. One change to geoopt's class: after
`load_state_dict` each parameter's step count is an int again. torch's loader turns it into a float32 tensor,
and geoopt's bias correction 1 − β^step then rounds in float32 instead of float64, so a resumed run would
drift from an uninterrupted one in the last bits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import geoopt
import torch


class RiemannianAdam(geoopt.optim.RiemannianAdam):
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = int(state["step"].item())


def riemannian_adam(
    params: Iterable[torch.nn.Parameter], lr: float = 1e-3, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    return RiemannianAdam(params, lr=lr, weight_decay=weight_decay)
