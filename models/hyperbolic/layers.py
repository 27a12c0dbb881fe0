"""Hyperbolic layers on the Poincaré ball: MLR, Möbius linear, HNN++ Poincaré FC and convolution, batch norm.

- Hyperbolic MLR (Ganea et al., "Hyperbolic Neural Networks", NeurIPS 2018, Eq. 25): the logit of class k
  is the signed, scaled distance to a gyroplane through p_k with normal a_k,
  logit_k(x) = (λ_{p_k}‖a_k‖/√c)·asinh(2√c⟨(−p_k) ⊕_c x, a_k⟩ / ((1 − c‖(−p_k) ⊕_c x‖²)‖a_k‖)),
  so logit_k(p_k) = 0. `ganea_mlr` is this form (Hyp-OC's head, with p_k on the ball).
- HNN++ (Shimizu, Mukuta & Harada, "Hyperbolic Neural Networks++", ICLR 2021, Eqs. 6-7) reparametrises the
  same gyroplane by an unconstrained z_k ∈ ℝⁿ and a scalar r_k (p_k = exp₀(r_k ẑ_k), a_k = sech²(√c r_k) z_k):
  v_k(x) = (2‖z_k‖/√c)·asinh(√c λ_x⟨x, ẑ_k⟩cosh(2√c r_k) − (λ_x − 1)sinh(2√c r_k)),  λ_x = 2/(1 − c‖x‖²).
  `hyperplane_distances` computes it with this λ_x; the Poincaré ResNet code
  (github.com/maxvanspengler/poincare-resnet, `linreg.py`) writes λ_x = 2(1 − c‖x‖²), which is not the
  conformal factor; hypll (the same authors' library) and this module use 2/(1 − c‖x‖²).
- Poincaré FC (HNN++ Eq. 9): w_k = sinh(√c v_k(x))/√c, y = w/(1 + √(1 + c‖w‖²)) — inside the ball for any w.
  With the identity initialisation of Poincaré ResNet (van Spengler, Berkhout & Mettes, ICCV 2023, §4.1),
  z = ½I (the ½ cancels the 2 in v_k) and r = 0, a square layer is exactly the identity:
  v_k = asinh(√c λ_x x_k)/√c, w = λ_x x, and w/(1 + √(1 + c λ_x²‖x‖²)) = x. The HNN++ initialisation
  is z ~ N(0, (2nm)⁻¹), r = 0 (n inputs, m outputs), under which activations shrink towards the origin
  layer after layer.
- Poincaré convolution (HNN++ §3.3, β-concatenation): the k×k receptive field of C_in channels is
  concatenated in the tangent space at 0 after scaling by B(n/2, ½)/B(n_i/2, ½) (n = k²C_in, n_i = C_in,
  B the beta function), mapped to the ball by exp₀, and passed through a Poincaré FC (k²C_in → C_out).
  Identity init as in the reference code: z = ½·eye(k²C_in, C_out).
- Möbius linear (Ganea et al. Eq. 26 and §3.2): M ⊗_c x = exp₀(M log₀ x), plus a bias b ∈ B_c by Möbius
  addition (HypAD's head; b = exp₀(b_tangent) here, reconstructed).
- Poincaré batch norm (Lou et al., "Differentiable Iterative Hyperbolic Batch Norm", ICML 2020 (arXiv:2003.00335),
  Alg. 2; midpoint variant of Poincaré ResNet §4.2): with the batch mean m (gyro-midpoint, or the
  Fréchet mean) and Fréchet variance σ_B² = mean_i d_c(m, x_i)²,
  y_i = exp_μ(√(σ²/(σ_B² + ε))·PT_{m→μ}(log_m x_i)), learnable μ = exp₀(b) and σ². As in both reference
  implementations, batch statistics are used at evaluation too (no running averages).

Activations between layers are tangent vectors at the origin, as in the reference ResNet: each layer maps
its input to the ball with exp₀ and its output back with log₀, a bijection of the ball, so the network is
ball-valued throughout while ReLU and average pooling act on log₀ coordinates.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.special import beta
from torch import nn

from models.hyperbolic.ball import MIN_NORM, PoincareBall

Init = Literal["identity", "gaussian"]


def hyperplane_distances(
    x: torch.Tensor, z: torch.Tensor, r: torch.Tensor | None, c: float, dim: int = -1
) -> torch.Tensor:
    """HNN++ v_k(x) for every k: x [..., n] on the ball (`dim` its vector axis), z [n, m], r [m]."""
    x = x.movedim(dim, -1)
    sqrt_c = math.sqrt(c)
    lam = 2.0 / (1.0 - c * x.pow(2).sum(-1, keepdim=True)).clamp_min(MIN_NORM)
    z_norm = z.norm(dim=0).clamp_min(MIN_NORM)
    inner = sqrt_c * lam * (x @ z) / z_norm
    if r is not None:
        two_r = 2.0 * sqrt_c * r
        inner = inner * torch.cosh(two_r) - (lam - 1.0) * torch.sinh(two_r)
    return (2.0 * z_norm / sqrt_c * torch.asinh(inner)).movedim(-1, dim)


def poincare_fc(x: torch.Tensor, z: torch.Tensor, r: torch.Tensor | None, c: float, dim: int = -1) -> torch.Tensor:
    """HNN++ Poincaré fully connected layer: y = w/(1 + √(1 + c‖w‖²)), w = sinh(√c v(x))/√c.

    √c·v is clamped to ±15 against float overflow of sinh² (reconstructed; there y is already within 1e-6 of
    the boundary)."""
    sqrt_c = math.sqrt(c)
    w = torch.sinh((sqrt_c * hyperplane_distances(x, z, r, c, dim)).clamp(-15.0, 15.0)) / sqrt_c
    return w / (1.0 + (1.0 + c * w.pow(2).sum(dim, keepdim=True)).sqrt())


def ganea_mlr(x: torch.Tensor, p: torch.Tensor, a: torch.Tensor, ball: PoincareBall) -> torch.Tensor:
    """Ganea et al.'s MLR logits [B, K] for x [B, n], gyroplane points p [K, n] on the ball, normals a [K, n]."""
    c, sqrt_c = ball.c, math.sqrt(ball.c)
    u = ball.mobius_add(-p.unsqueeze(0), x.unsqueeze(1))  # [B, K, n]
    a_norm = a.norm(dim=-1).clamp_min(MIN_NORM)
    num = 2.0 * sqrt_c * (u * a).sum(-1)
    den = (1.0 - c * u.pow(2).sum(-1)).clamp_min(MIN_NORM) * a_norm
    return ball.lambda_x(p, keepdim=False) * a_norm / sqrt_c * torch.asinh(num / den)


def init_hyperplanes(z: torch.Tensor, init: Init) -> None:
    """z = ½·eye(n, m) (identity, Poincaré ResNet) or N(0, (2nm)⁻¹) (HNN++)."""
    n, m = z.shape
    with torch.no_grad():
        if init == "identity":
            z.copy_(0.5 * torch.eye(n, m, dtype=z.dtype))
        else:
            z.normal_(0.0, (2.0 * n * m) ** -0.5)


class HyperbolicMLR(nn.Module):
    """Class logits v_k(x) (HNN++ form of Ganea's MLR) of tangent-at-0 inputs [B, n] (`on_ball`: ball points)."""

    def __init__(self, in_features: int, num_classes: int, ball: PoincareBall, on_ball: bool = False):
        super().__init__()
        self.ball, self.on_ball = ball, on_ball
        self.z = nn.Parameter(torch.empty(in_features, num_classes))
        self.r = nn.Parameter(torch.zeros(num_classes))
        init_hyperplanes(self.z, "gaussian")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.on_ball else self.ball.expmap0(x)
        return hyperplane_distances(x, self.z, self.r, self.ball.c)


class PoincareLinear(nn.Module):
    """HNN++ Poincaré FC between tangent-at-0 vectors [..., n] → [..., m] (identity or Gaussian init)."""

    def __init__(self, in_features: int, out_features: int, ball: PoincareBall, init: Init = "identity"):
        super().__init__()
        self.ball = ball
        self.z = nn.Parameter(torch.empty(in_features, out_features))
        self.r = nn.Parameter(torch.zeros(out_features))
        init_hyperplanes(self.z, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = poincare_fc(self.ball.expmap0(x), self.z, self.r, self.ball.c)
        return self.ball.logmap0(self.ball.project(y))


class MobiusLinear(nn.Module):
    """Ganea's Möbius linear layer on ball points: exp₀(M log₀ x) ⊕_c exp₀(b)."""

    def __init__(self, in_features: int, out_features: int, ball: PoincareBall, bias: bool = True):
        super().__init__()
        self.ball = ball
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ball.project(self.ball.expmap0(self.linear(self.ball.logmap0(x))))
        if self.bias is not None:
            y = self.ball.project(self.ball.mobius_add(y, self.ball.expmap0(self.bias)))
        return y


class PoincareConv2d(nn.Module):
    """HNN++ Poincaré convolution of tangent-at-0 feature maps [B, C_in, H, W] → [B, C_out, H', W']."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ball: PoincareBall,
        stride: int = 1,
        padding: int = 0,
        init: Init = "identity",
    ):
        super().__init__()
        self.ball, self.out_channels = ball, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        n = kernel_size * kernel_size * in_channels
        self.beta_scale = float(beta(n / 2, 0.5) / beta(in_channels / 2, 0.5))  # β-concatenation
        self.z = nn.Parameter(torch.empty(n, out_channels))
        self.r = nn.Parameter(torch.zeros(out_channels))
        init_hyperplanes(self.z, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out_h = (h + 2 * self.padding - self.kernel_size) // self.stride + 1
        out_w = (w + 2 * self.padding - self.kernel_size) // self.stride + 1
        patches = F.unfold(x * self.beta_scale, self.kernel_size, padding=self.padding, stride=self.stride)
        y = poincare_fc(self.ball.expmap0(patches.transpose(1, 2)), self.z, self.r, self.ball.c)
        y = self.ball.logmap0(self.ball.project(y))  # [B, L, C_out]
        return y.transpose(1, 2).reshape(b, self.out_channels, out_h, out_w)


class PoincareBatchNorm2d(nn.Module):
    """Poincaré batch norm over batch and pixels of tangent-at-0 maps [B, C, H, W]; mean by midpoint or Fréchet."""

    def __init__(self, channels: int, ball: PoincareBall, mean: Literal["midpoint", "frechet"] = "midpoint"):
        super().__init__()
        self.ball, self.mean = ball, mean
        self.bias = nn.Parameter(torch.zeros(channels))  # μ = exp₀(bias)
        self.var = nn.Parameter(torch.tensor(1.0))  # σ²

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        points = self.ball.expmap0(x.permute(0, 2, 3, 1).reshape(-1, ch))
        m = self.ball.midpoint(points) if self.mean == "midpoint" else self.ball.frechet_mean(points)
        var = self.ball.frechet_variance(points, m)
        mu = self.ball.expmap0(self.bias)
        v = self.ball.transp(m, mu, self.ball.logmap(m, points)) * (self.var / (var + 1e-6)).sqrt()
        y = self.ball.logmap0(self.ball.project(self.ball.expmap(mu, v)))
        return y.reshape(b, h, w, ch).permute(0, 3, 1, 2)
