"""The Poincaré ball of curvature −c: the maps every hyperbolic layer is written in (checked against geoopt).

B_c = {x ∈ ℝⁿ : c‖x‖² < 1}, conformal factor λ_x = 2/(1 − c‖x‖²) (Ganea, Bécigneul & Hofmann, "Hyperbolic
Neural Networks", NeurIPS 2018, §2):

- Möbius addition  x ⊕_c y = ((1 + 2c⟨x,y⟩ + c‖y‖²)x + (1 − c‖x‖²)y) / (1 + 2c⟨x,y⟩ + c²‖x‖²‖y‖²);
- exp/log maps at 0  exp₀(v) = tanh(√c‖v‖)·v/(√c‖v‖),  log₀(y) = artanh(√c‖y‖)·y/(√c‖y‖),
  and at x  exp_x(v) = x ⊕_c (tanh(√c λ_x‖v‖/2)·v/(√c‖v‖)),  log_x(y) = (2/(√c λ_x))·artanh(√c‖u‖)·u/‖u‖,
  u = (−x) ⊕_c y;
- distance  d_c(x, y) = (2/√c)·artanh(√c‖(−x) ⊕_c y‖), which tends to 2‖x − y‖ as c → 0;
- parallel transport  PT_{x→y}(v) = gyr[y, −x](v)·λ_x/λ_y.

Written here in plain torch (geoopt's own functions are TorchScript, whose profiling executor re-optimises
a graph after its first calls and changes float rounding mid-run, which would break bit-exact resumption)
and checked against geoopt (`geoopt.PoincareBall`, Kochurov, Karimov & Kozlukov 2020,
https://github.com/geoopt/geoopt) in float64 by the tests; `PoincareBall.geoopt` is that manifold, for
`geoopt.ManifoldParameter`s updated by Riemannian Adam. Projection keeps ‖x‖ ≤ (1 − ε)/√c with geoopt's
margins (ε = 4e-3 in float32, 1e-5 in float64). Also here:

- `clip`, the feature clipping of Guo et al., "Clipped Hyperbolic Classifiers Are Super-Hyperbolic
  Classifiers" (CVPR 2022): x ← min(1, r/‖x‖)·x in the tangent space before exp₀, which keeps points a
  margin away from the boundary (Hyp-OC uses r = 2 at c = 0.1);
- `midpoint`, the gyro-midpoint (Ungar; the Poincaré midpoint of van Spengler et al., "Poincaré ResNet",
  ICCV 2023, §4.2): with γ_i² = 1/(1 − c‖x_i‖²),  m = Σ_i γ_i² x_i / (Σ_i γ_i² − n/2),  then
  m ← m/(1 + √(1 − c‖m‖²)) (= γ_m m/(1 + γ_m)); a closed form, one pass, no iterations;
- `frechet_mean`, the Fréchet mean argmin_m Σ_i d_c(m, x_i)², from hypll (`hypll.manifolds.poincare_ball.
  math.stats.frechet_mean`, https://github.com/maxvanspengler/hyperbolic_learning_library): the fixed-point
  iteration of Lou et al., "Differentiable Iterative Hyperbolic Batch Norm" (ICML 2020), with its
  implicit-function backward; the slower mean that midpoint batch norm replaces;
- `frechet_variance`  σ² = (1/n)Σ_i d_c(m, x_i)².
"""

from __future__ import annotations

import geoopt
import torch

MIN_NORM = 1e-15
BALL_EPS = {torch.float32: 4e-3, torch.float64: 1e-5}


def _norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.norm(dim=dim, keepdim=True).clamp_min(MIN_NORM)


def _sq(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.pow(2).sum(dim=dim, keepdim=True)


def _artanh(x: torch.Tensor) -> torch.Tensor:
    eps = 1e-7 if x.dtype == torch.float32 else 1e-15
    return torch.atanh(x.clamp(-1 + eps, 1 - eps))


class PoincareBall:
    """B_c with the operations above; `c` > 0 (geoopt's `PoincareBall(c)`, curvature −c)."""

    def __init__(self, c: float = 1.0):
        if c <= 0:
            raise ValueError(f"curvature c must be positive, got {c}")
        self.c = float(c)
        self.geoopt = geoopt.PoincareBall(c=torch.tensor(self.c, dtype=torch.float64))

    @property
    def radius(self) -> float:
        return self.c**-0.5

    def lambda_x(self, x: torch.Tensor, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
        return 2.0 / (1.0 - self.c * x.pow(2).sum(dim=dim, keepdim=keepdim)).clamp_min(MIN_NORM)

    def mobius_add(self, x: torch.Tensor, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
        c = self.c
        x2, y2, xy = _sq(x, dim), _sq(y, dim), (x * y).sum(dim, keepdim=True)
        num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
        return num / (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(MIN_NORM)

    def expmap0(self, v: torch.Tensor, dim: int = -1) -> torch.Tensor:
        sqrt_c_norm = self.c**0.5 * _norm(v, dim)
        return torch.tanh(sqrt_c_norm) * v / sqrt_c_norm

    def logmap0(self, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
        sqrt_c_norm = self.c**0.5 * _norm(y, dim)
        return _artanh(sqrt_c_norm) * y / sqrt_c_norm

    def expmap(self, x: torch.Tensor, v: torch.Tensor, dim: int = -1) -> torch.Tensor:
        sqrt_c_norm = self.c**0.5 * _norm(v, dim)
        step = torch.tanh(sqrt_c_norm * self.lambda_x(x, dim) / 2) * v / sqrt_c_norm
        return self.mobius_add(x, step, dim)

    def logmap(self, x: torch.Tensor, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
        u = self.mobius_add(-x, y, dim)
        sqrt_c_norm = self.c**0.5 * _norm(u, dim)
        return 2 / (self.c**0.5 * self.lambda_x(x, dim)) * _artanh(sqrt_c_norm) * u / _norm(u, dim)

    def dist(self, x: torch.Tensor, y: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
        d = 2 / self.c**0.5 * _artanh(self.c**0.5 * self.mobius_add(-x, y, dim).norm(dim=dim, keepdim=True))
        return d if keepdim else d.squeeze(dim)

    def gyration(self, u: torch.Tensor, v: torch.Tensor, w: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """gyr[u, v]w = ⊖(u ⊕ v) ⊕ (u ⊕ (v ⊕ w)), in Ungar's closed form."""
        c = self.c
        u2, v2, uv = _sq(u, dim), _sq(v, dim), (u * v).sum(dim, keepdim=True)
        uw, vw = (u * w).sum(dim, keepdim=True), (v * w).sum(dim, keepdim=True)
        a = -c * c * uw * v2 + c * vw + 2 * c * c * uv * vw
        b = -c * c * vw * u2 - c * uw
        d = 1 + 2 * c * uv + c * c * u2 * v2
        return w + 2 * (a * u + b * v) / d.clamp_min(MIN_NORM)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Parallel transport of v from T_xB to T_yB: gyr[y, −x]v · λ_x/λ_y."""
        return self.gyration(y, -x, v, dim) * self.lambda_x(x, dim) / self.lambda_x(y, dim)

    def project(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Pull points back to ‖x‖ ≤ (1 − ε)/√c (a no-op for points already inside that radius)."""
        max_norm = (1 - BALL_EPS.get(x.dtype, 4e-3)) / self.c**0.5
        norm = _norm(x, dim)
        return torch.where(norm > max_norm, x / norm * max_norm, x)

    def clip(self, v: torch.Tensor, r: float, dim: int = -1) -> torch.Tensor:
        """Feature clipping in the tangent space at 0: v ← min(1, r/‖v‖)·v (Guo et al. 2022)."""
        norm = v.norm(dim=dim, keepdim=True).clamp_min(MIN_NORM)
        return v * (r / norm).clamp(max=1.0)

    def midpoint(self, x: torch.Tensor, batch_dim: int = 0, dim: int = -1) -> torch.Tensor:
        """The gyro-midpoint of the points along `batch_dim` (closed form, see the module docstring)."""
        gamma_sq = 1.0 / (1.0 - self.c * x.pow(2).sum(dim=dim, keepdim=True)).clamp_min(MIN_NORM)
        m = (gamma_sq * x).sum(dim=batch_dim) / (gamma_sq.sum(dim=batch_dim) - x.shape[batch_dim] / 2)
        return m / (1.0 + (1.0 - self.c * m.pow(2).sum(dim=dim, keepdim=True)).clamp_min(0.0).sqrt())

    def frechet_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The Fréchet mean of the points x [n, d] (hypll's solver and backward)."""
        from hypll.manifolds.poincare_ball.math.stats import frechet_mean

        return frechet_mean(x, torch.tensor(self.c, dtype=x.dtype, device=x.device), vec_dim=-1, batch_dim=0)

    def frechet_variance(self, x: torch.Tensor, m: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self.dist(x, m.unsqueeze(0), dim=dim).pow(2).mean(0)
