"""Rays, stratified samples and the volume renderer of NeRF (Mildenhall et al., ECCV 2020), for small images.

Cameras sit on a sphere of radius r looking at the origin (azimuth, elevation in degrees; y is up); a pinhole
with focal length f (in pixels) shoots one ray through each pixel centre. Along a ray the interval [near, far] is
cut into S equal bins with one sample per bin, uniformly placed in training (stratified) and at the bin centre
for evaluation. Given densities σ_i ≥ 0 and colours c_i at the samples and the bin widths δ_i,

    α_i = 1 − exp(−σ_i δ_i),   T_i = Π_{j<i} (1 − α_j),   w_i = T_i α_i,   C = Σ_i w_i c_i,

on a black background; Σ_i w_i = 1 − T_final ≤ 1 is the ray's opacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rays:
    origins: torch.Tensor  # [R, 3]
    directions: torch.Tensor  # [R, 3], unit length

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, index: torch.Tensor | slice) -> Rays:
        return Rays(self.origins[index], self.directions[index])


def look_at(azimuth_deg: float, elevation_deg: float, radius: float) -> torch.Tensor:
    """[3, 4] camera-to-world (columns: right, up, backward, position) for a camera looking at the origin."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    position = torch.tensor(
        [radius * math.cos(el) * math.sin(az), radius * math.sin(el), radius * math.cos(el) * math.cos(az)]
    )
    backward = position / position.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), backward)
    right = right / right.norm()
    up = torch.linalg.cross(backward, right)
    return torch.stack([right, up, backward, position], dim=1)


def camera_rays(camera_to_world: torch.Tensor, size: int, focal: float) -> Rays:
    """One ray per pixel centre of a size×size image, row-major from the top left."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    local = torch.stack([u / focal, -v / focal, -torch.ones_like(u)], dim=-1).reshape(-1, 3)
    directions = local @ camera_to_world[:, :3].T
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return Rays(camera_to_world[:, 3].expand_as(directions), directions)


def stratified_depths(
    count: int, samples: int, near: float, far: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[count, S] sample depths, one per bin: uniform within the bin with a generator, else the bin centre."""
    width = (far - near) / samples
    starts = near + width * torch.arange(samples, dtype=torch.float32)
    if generator is None:
        return (starts + width / 2).expand(count, -1)
    return starts + width * torch.rand(count, samples, generator=generator)


def sample_points(rays: Rays, depths: torch.Tensor) -> torch.Tensor:
    """[R, S, 3] points along each ray at the given depths."""
    return rays.origins[:, None, :] + depths[..., None] * rays.directions[:, None, :]


def bin_widths(depths: torch.Tensor, far: float) -> torch.Tensor:
    """δ_i = t_{i+1} − t_i, the last sample's reaching to `far`."""
    return torch.cat([depths[:, 1:] - depths[:, :-1], far - depths[:, -1:]], dim=-1)


def render_weights(density: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """[R, S] w_i = T_i α_i from densities σ ≥ 0 and bin widths δ."""
    alpha = 1 - torch.exp(-density * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1] + 1e-10], dim=-1), -1)
    return alpha * transmittance


def composite(weights: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """[R, 3]: Σ_i w_i c_i over a black background."""
    return (weights[..., None] * colours).sum(dim=-2)
