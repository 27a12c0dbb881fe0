"""A procedural 3-D scene and its ground-truth views: three coloured spheres and a box inside [−1.2, 1.2]³.

Density is a sigmoid of the signed distance to the nearest surface, σ(x) = σ_max · sigmoid(−sdf(x)/ε) (σ_max = 60,
ε = 0.02: a soft but opaque shell), and colour is that of the nearest primitive. The views are rendered by the
same volume renderer the fields use (`models.fields.rendering`), at 256 samples per ray (bin centres), from 40
cameras at radius 3 around the origin (azimuths and elevations drawn once from a fixed seed; the first 32 views
train, the last 8 test). They depend on nothing but this module, so they are computed once per process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from models.fields.rendering import (
    Rays,
    bin_widths,
    camera_rays,
    composite,
    look_at,
    render_weights,
    sample_points,
    stratified_depths,
)

BOUND = 1.2
CAMERA_RADIUS = 3.0
NEAR, FAR = CAMERA_RADIUS - 1.6, CAMERA_RADIUS + 1.6
IMAGE_SIZE = 32
FOCAL = IMAGE_SIZE / 2 / 0.45  # a 48° field of view
VIEWS, TRAIN_VIEWS = 40, 32
DENSITY_MAX, SHARPNESS = 60.0, 0.02

SPHERES = (  # centre, radius, colour
    ((-0.55, -0.05, 0.25), 0.38, (0.9, 0.2, 0.15)),
    ((0.5, 0.1, -0.35), 0.32, (0.2, 0.75, 0.3)),
    ((0.05, 0.55, 0.45), 0.26, (0.2, 0.35, 0.9)),
)
BOX = ((0.1, -0.55, -0.1), (0.6, 0.12, 0.45), (0.95, 0.8, 0.2))  # centre, half-extents, colour

Field = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # world points [..., 3] → (σ [...], rgb [..., 3])


def signed_distances(points: torch.Tensor) -> torch.Tensor:
    """[..., 4]: the signed distance to each primitive (spheres, then the box)."""
    out = [(points - torch.tensor(centre)).norm(dim=-1) - radius for centre, radius, _ in SPHERES]
    centre, half, _ = BOX
    q = (points - torch.tensor(centre)).abs() - torch.tensor(half)
    out.append(q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0))
    return torch.stack(out, dim=-1)


def scene_field(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The analytic scene as a field: density from the nearest surface, colour of the nearest primitive."""
    distances = signed_distances(points)
    nearest, which = distances.min(dim=-1)
    colours = torch.tensor([c for *_, c in SPHERES] + [BOX[2]])
    return DENSITY_MAX * torch.sigmoid(-nearest / SHARPNESS), colours[which]


def render(field: Field, rays: Rays, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[R, 3] colours of the rays through `field` (stratified with a generator, bin centres without)."""
    depths = stratified_depths(len(rays), samples, NEAR, FAR, generator)
    density, colour = field(sample_points(rays, depths))
    return composite(render_weights(density, bin_widths(depths, FAR)), colour)


@dataclass(frozen=True)
class SceneViews:
    poses: torch.Tensor  # [V, 3, 4] camera-to-world
    images: torch.Tensor  # [V, S·S, 3]

    def rays(self, views: range | list[int]) -> tuple[Rays, torch.Tensor]:
        """The rays of the given views and their ground-truth colours, concatenated."""
        rays = [camera_rays(self.poses[v], IMAGE_SIZE, FOCAL) for v in views]
        origins = torch.cat([r.origins for r in rays])
        directions = torch.cat([r.directions for r in rays])
        return Rays(origins, directions), torch.cat([self.images[v] for v in views])

    @property
    def train(self) -> range:
        return range(TRAIN_VIEWS)

    @property
    def test(self) -> range:
        return range(TRAIN_VIEWS, VIEWS)


def random_pose(generator: torch.Generator) -> torch.Tensor:
    """A camera on the viewing sphere: azimuth U(0°, 360°), elevation U(5°, 60°)."""
    azimuth, elevation = torch.rand(2, generator=generator).tolist()
    return look_at(360 * azimuth, 5 + 55 * elevation, CAMERA_RADIUS)


@lru_cache(maxsize=1)
def scene_views(samples: int = 256) -> SceneViews:
    generator = torch.Generator().manual_seed(0)
    poses = torch.stack([random_pose(generator) for _ in range(VIEWS)])
    with torch.no_grad():
        images = torch.stack([render(scene_field, camera_rays(p, IMAGE_SIZE, FOCAL), samples) for p in poses])
    return SceneViews(poses, images)


def to_unit_cube(points: torch.Tensor) -> torch.Tensor:
    """World points in [−BOUND, BOUND]³ → [0, 1]³, the grids' and encodings' domain."""
    return (points + BOUND) / (2 * BOUND)
