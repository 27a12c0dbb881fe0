"""Hyperbolic core: the Poincaré ball (geoopt) and the layers hyperbolic methods build on.

`PoincareBall` (ops), `models.hyperbolic.layers` (MLR, Möbius linear, HNN++ FC/conv, batch norm) and
`riemannian_adam` (`models.hyperbolic.optim`), geoopt's Riemannian Adam (Bécigneul & Ganea, ICLR 2019), which
updates points declared as `geoopt.ManifoldParameter` along the ball's geodesics and every other parameter as
Adam does.
"""

from __future__ import annotations

from models.hyperbolic.ball import PoincareBall
from models.hyperbolic.layers import (
    HyperbolicMLR,
    MobiusLinear,
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareLinear,
    ganea_mlr,
    hyperplane_distances,
    poincare_fc,
)
from models.hyperbolic.optim import RiemannianAdam, riemannian_adam

__all__ = [
    "HyperbolicMLR",
    "MobiusLinear",
    "PoincareBall",
    "PoincareBatchNorm2d",
    "PoincareConv2d",
    "PoincareLinear",
    "RiemannianAdam",
    "ganea_mlr",
    "hyperplane_distances",
    "poincare_fc",
    "riemannian_adam",
]
