"""Poincaré ResNet: a residual network on the Poincaré ball from the pixels on.

Paper: Max van Spengler, Erwin Berkhout & Pascal Mettes, "Poincaré ResNet", ICCV 2023. Reference code:
https://github.com/maxvanspengler/poincare-resnet (`models/resnets/hyperbolic.py`, `models/nn/modules/`), and
the authors' library hypll (https://github.com/maxvanspengler/hyperbolic_learning_library).

Every layer is hyperbolic (curvature −c, c = 0.1); the layers are those of `models.hyperbolic.layers`
(equations there), activations travel as tangent vectors at the origin (log₀ of ball points):

- Poincaré convolution (HNN++, Shimizu et al. ICLR 2021): β-concatenate the k×k receptive field, exp₀,
  Poincaré FC  y = w/(1 + √(1 + c‖w‖²)),  w_k = sinh(√c v_k(x))/√c,
  v_k(x) = (2‖z_k‖/√c)·asinh(√c λ_x⟨x, ẑ_k⟩cosh(2√c r_k) − (λ_x − 1)sinh(2√c r_k)),  λ_x = 2/(1 − c‖x‖²).
  The reference repository writes λ_x = 2(1 − c‖x‖²) in `linreg.py`; this module uses the conformal factor
  2/(1 − c‖x‖²), as hypll does.
- Identity initialisation (§4.1): z = ½·eye(k²C_in, C_out), r = 0, under which a square Poincaré FC is exactly
  the identity, against HNN++'s z ~ N(0, (2nm)⁻¹), under which activations collapse to the origin with depth.
- Poincaré midpoint batch norm (§4.2): batch mean by the closed-form gyro-midpoint
  m = Σγ_i²x_i/(Σγ_i² − n/2), m ← γ_m m/(1 + γ_m), γ_i² = 1/(1 − c‖x_i‖²), instead of the iterative Fréchet
  mean (Lou et al. 2020); then y_i = exp_μ(√(σ²/(σ_B² + ε))·PT_{m→μ}(log_m x_i)).
- Residual connection f(x) ⊕_c x (Möbius addition, "fr" order), ReLU on log₀ coordinates, average pooling of
  log₀ coordinates, and a Poincaré MLR head (the HNN++ v_k(x) as logits).

Defaults: ResNet-8 (one block per group, depth 6n + 2) with channels (4, 8, 16), c = 0.1, identity init,
midpoint BN, geoopt's Riemannian Adam at lr 1e-3 with weight decay 1e-4 (the paper's optimizer settings), 15
epochs, batch 64, on 8×8 digits — a CPU-sized stand-in for the paper's ResNet-20/32 with (8, 16, 32) channels
trained 500 epochs on CIFAR. Deviations: the reference maps the skip branch with exp₀ along the last (width)
axis (`dim=-1`) of an NCHW map; here the Möbius addition acts on the channel vector of each pixel, as the
paper describes. No hand-written backward (the paper's third contribution, a memory saving): autograd suffices
at this size. Batch statistics are used at evaluation too, as in the reference code.

The Euclidean twin has the same topology with `nn.Conv2d`, `nn.BatchNorm2d`, addition and a linear head,
trained with the same optimizer and budget.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.context import RunContext
from models.datasets import Dataset, load_builtin
from models.hyperbolic import (
    HyperbolicMLR,
    PoincareBall,
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareLinear,
    riemannian_adam,
)
from models.hyperbolic.disc import poincare_disc_figure, to_disc
from models.hyperbolic.layers import Init
from models.nn.losses import CrossEntropy
from models.params import EpochTrainingParams, ResumableParams
from models.plots import curves_figure
from models.registry import method
from models.reproduction import Comparison, Outcome, reproduction, seeds_for, sweep
from models.training import (
    ClassificationData,
    HelperRunContext,
    SGDSchedule,
    accuracy,
    classification_data,
    fit_classifier,
)

BatchNormMean = Literal["midpoint", "frechet"]


class PoincareResNetParams(EpochTrainingParams, ResumableParams):
    channels: tuple[int, int, int] = Field((4, 8, 16), description="channels of the three residual groups")
    blocks: int = Field(1, ge=1, le=9, description="residual blocks per group (depth 6·blocks + 2: 1 → ResNet-8)")
    curvature: float = Field(0.1, gt=0.0, le=10.0, description="c of the ball B_c (curvature −c; paper: 0.1)")
    init: Init = Field("identity", description="Poincaré conv init: ½·identity (the paper) or HNN++ Gaussian")
    batch_norm: BatchNormMean = Field("midpoint", description="batch-norm mean: gyro-midpoint (paper) or Fréchet")
    euclidean: bool = Field(False, description="train the Euclidean twin (same topology, Euclidean layers)")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Riemannian Adam learning rate (paper: 1e-3)")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, description="weight decay (paper: 1e-4)")
    epochs: int = Field(15, ge=1, le=500, description="passes over the training split")
    checkpoint_every: int = Field(5, ge=0, le=500, description="save a checkpoint every N epochs (0: never)")


# -- the networks -------------------------------------------------------------------------------


class PoincareBlock(nn.Module):
    """conv-BN-ReLU-conv-BN on the ball, then f(x) ⊕_c x (x through a 1×1 Poincaré conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, ball: PoincareBall, init: Init, bn: BatchNormMean):
        super().__init__()
        self.ball = ball
        self.conv1 = PoincareConv2d(cin, cout, 3, ball, stride=stride, padding=1, init=init)
        self.bn1 = PoincareBatchNorm2d(cout, ball, bn)
        self.conv2 = PoincareConv2d(cout, cout, 3, ball, padding=1, init=init)
        self.bn2 = PoincareBatchNorm2d(cout, ball, bn)
        self.skip = PoincareConv2d(cin, cout, 1, ball, stride=stride, init=init) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        res = self.skip(x) if self.skip is not None else x
        out = self.ball.mobius_add(self.ball.expmap0(f, dim=1), self.ball.expmap0(res, dim=1), dim=1)
        return F.relu(self.ball.logmap0(self.ball.project(out, dim=1), dim=1))


class EuclideanBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(f + (self.skip(x) if self.skip is not None else x))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, three groups (stride 1, 2, 2), average pool, head: Poincaré or Euclidean throughout."""

    def __init__(self, params: PoincareResNetParams, in_channels: int, num_classes: int):
        super().__init__()
        c0, widths = params.channels[0], params.channels
        self.ball = PoincareBall(params.curvature)
        blocks: list[nn.Module] = []
        cin = c0
        for g, cout in enumerate(widths):
            for b in range(params.blocks):
                stride = 2 if g > 0 and b == 0 else 1
                blocks.append(
                    EuclideanBlock(cin, cout, stride)
                    if params.euclidean
                    else PoincareBlock(cin, cout, stride, self.ball, params.init, params.batch_norm)
                )
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        if params.euclidean:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0))
            self.head: nn.Module = nn.Linear(cin, num_classes)
        else:
            self.stem = nn.Sequential(
                PoincareConv2d(in_channels, c0, 3, self.ball, padding=1, init=params.init),
                PoincareBatchNorm2d(c0, self.ball, params.batch_norm),
            )
            self.head = HyperbolicMLR(cin, num_classes, self.ball)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate features (log₀ coordinates for the Poincaré network)."""
        return self.blocks(F.relu(self.stem(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# -- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RiemannianAdamSchedule(SGDSchedule):
    """A constant learning rate with geoopt's Riemannian Adam (the paper's optimizer)."""

    milestones: tuple[float, ...] = ()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return riemannian_adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class TrainedResNet:
    model: ResNet
    data: ClassificationData
    history: list[dict[str, float]]
    test_acc: float


def train_resnet(ctx: RunContext, params: PoincareResNetParams) -> TrainedResNet:
    ds = ctx.dataset
    if ds is None or ds.kind != "image-class":
        raise ValueError("poincare-resnet needs an 'image-class' dataset")
    data = classification_data(ds).to(ctx.device)
    if data.x_train.dim() != 4:
        raise ValueError(f"poincare-resnet needs images [N, C, H, W], got {data.input_shape}")
    torch.manual_seed(ctx.seed)
    model = ResNet(params, data.x_train.shape[1], data.num_classes).to(ctx.device)
    schedule = RiemannianAdamSchedule(
        params.epochs,
        params.batch_size,
        params.lr,
        weight_decay=params.weight_decay,
        checkpoint_every=params.checkpoint_every,
    )
    # oneDNN's convolution backward (weights) corrupts the heap for the twin's few-channel convs when its ISA is
    # capped at AVX2 (torch 2.13, DNNL_MAX_CPU_ISA=AVX2 as `crucible reproduce` pins it): use ATen's own kernels
    with torch.backends.mkldnn.flags(enabled=False):
        history = fit_classifier(ctx, model, CrossEntropy(), data, schedule)
        test_acc = accuracy(model, data.x_test, data.y_test)
    ctx.log(params.epochs, test_acc=test_acc)
    return TrainedResNet(model, data, history, test_acc)


# -- norms through depth -------------------------------------------------------------------------


@torch.no_grad()
def norms_through_depth(
    x: torch.Tensor, ball: PoincareBall, init: Init, depth: int = 20, kind: Literal["fc", "conv"] = "fc"
) -> list[float]:
    """Mean ball norm ‖exp₀(h_l)‖ after each of `depth` freshly initialised Poincaré layers (no BN, no skip):
    square FC layers on the flattened images, or 3×3 convolutions (the first from the image's channels)."""
    h, norms = (x.flatten(1) if kind == "fc" else x), []
    width = 16
    for layer in range(depth):
        if kind == "fc":
            h = PoincareLinear(h.shape[1], h.shape[1], ball, init)(h)
        else:
            h = PoincareConv2d(h.shape[1] if layer == 0 else width, width, 3, ball, padding=1, init=init)(h)
        points = ball.expmap0(h if kind == "fc" else h.movedim(1, -1))
        norms.append(points.norm(dim=-1).mean().item())
    return norms


def batch_norm_seconds(model: ResNet, x: torch.Tensor, mean: BatchNormMean, repeats: int = 5) -> float:
    """Median wall time of forward + backward of the stem's batch norm on the stem conv's output for `x`."""
    with torch.no_grad():
        h = model.stem[0](x)
    bn = PoincareBatchNorm2d(h.shape[1], model.ball, mean)
    times = []
    for _ in range(repeats + 1):
        inp = h.clone().requires_grad_()
        start = time.perf_counter()
        bn(inp).square().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def embedding_figure(trained: TrainedResNet, title: str):
    """The test split's pooled features on the Poincaré disc (see `models.hyperbolic.disc`), one colour per class."""
    model, ball = trained.model, trained.model.ball
    model.eval()
    with torch.no_grad():
        points = ball.expmap0(model.features(trained.data.x_test))
    disc = to_disc(points, ball)
    y = trained.data.y_test.numpy()
    return poincare_disc_figure({str(k): disc[y == k] for k in range(int(y.max()) + 1)}, ball.radius, title)


@method(
    "poincare-resnet",
    family="structured",
    task="train",
    datasets=("image-class",),
    params=PoincareResNetParams,
    paper="Poincaré ResNet",
    tiny={"epochs": 3, "channels": (2, 2, 2), "checkpoint_every": 0},
)
def run(ctx: RunContext, params: PoincareResNetParams) -> None:
    """Train a Poincaré ResNet (or its Euclidean twin); log test accuracy, save learning curves, the test
    embeddings on the Poincaré disc, and register the weights."""
    trained = train_resnet(ctx, params)
    epochs = list(range(1, len(trained.history) + 1))
    panels = {k: {"train": (epochs, [row[k] for row in trained.history])} for k in ("train_loss", "val_acc")}
    ctx.save_artifact("curves.png", curves_figure(panels, "epoch", title="poincare-resnet"), kind="plot")
    if not params.euclidean:
        ctx.save_artifact("poincare_disc.png", embedding_figure(trained, "test embeddings"), kind="plot")
    from safetensors.torch import save_file

    folder = ctx.workdir / "model"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(folder / "model.safetensors"))
    ctx.register_model(f"poincare-resnet-{ctx.job_id}", folder, params.model_dump(mode="json"))


# -- reproduction -------------------------------------------------------------------------------

ARMS: dict[str, dict] = {
    "Poincaré ResNet-8": {},
    "Fréchet batch norm": {"batch_norm": "frechet"},
    "Gaussian init": {"init": "gaussian"},
    "Euclidean twin": {"euclidean": True},
}
SMOKE_ARMS = ("Poincaré ResNet-8", "Euclidean twin")


@reproduction(
    "poincare-resnet",
    claim="identity init keeps activation norms through 20 Poincaré FC layers (last/first in [0.5, 2]) where "
    "HNN++'s Gaussian init collapses them (< 0.1); a Poincaré ResNet-8 is within 2 points of its Euclidean twin "
    "on digits; midpoint batch norm is faster than Fréchet batch norm, with accuracy within 2 points of it",
    metric="test accuracy",
    direction="higher",
    baseline="Euclidean twin",
)
def reproduce(ctx: RunContext, seed: int, smoke: bool) -> Outcome:
    """Per seed: the norm probe (20 fresh Poincaré FC layers, and 20 3×3 Poincaré convs, on 256 training
    digits, identity vs Gaussian init), the Poincaré ResNet-8 and its Euclidean twin trained with the same
    budget (accuracy within 2 points, by the harness's noise rule), and the stem batch norm's forward+backward
    time with midpoint vs Fréchet mean on the trained network's stem activations of one batch."""
    ds = load_builtin("digits")
    seeds = seeds_for(seed, smoke)
    budget = {"epochs": 1, "checkpoint_every": 0} if smoke else {"checkpoint_every": 0}
    arms = SMOKE_ARMS if smoke else tuple(ARMS)
    acc: dict[str, list[float]] = {name: [] for name in arms}
    ratios: dict[str, list[float]] = {}
    bn_seconds: dict[str, list[float]] = {"midpoint": [], "frechet": []}
    curves: dict[str, list[float]] = {}
    trained_first = None
    for s in sweep(ctx, seeds, lambda s: f"seed {s}"):
        x = _probe_inputs(ds)
        for kind in ("fc", "conv"):
            for init in ("identity", "gaussian"):
                torch.manual_seed(s)
                norms = norms_through_depth(x, PoincareBall(0.1), init, kind=kind)
                ratios.setdefault(f"{kind} {init}", []).append(norms[-1] / norms[0])
                curves.setdefault(f"{kind} {init}", norms)
        for name in arms:
            params = PoincareResNetParams(**ARMS[name], **budget)
            trained = train_resnet(HelperRunContext(ctx, s, ds), params)
            acc[name].append(trained.test_acc)
            if name == "Poincaré ResNet-8":
                torch.manual_seed(s)
                for mean in bn_seconds:
                    bn_seconds[mean].append(batch_norm_seconds(trained.model, trained.data.x_train[:64], mean))
                trained_first = trained_first or trained
    _save_figures(ctx, curves, trained_first, seed)
    norms_hold = all(0.5 <= r <= 2.0 for r in ratios["fc identity"]) and all(r < 0.1 for r in ratios["fc gaussian"])
    mean_ratio = {k: statistics.fmean(v) for k, v in ratios.items()}
    note = (
        f"last/first norm ratio at depth 20: FC identity {mean_ratio['fc identity']:.3g}, FC Gaussian "
        f"{mean_ratio['fc gaussian']:.3g}; 3×3 conv identity {mean_ratio['conv identity']:.3g}, conv Gaussian "
        f"{mean_ratio['conv gaussian']:.3g} (the reference's eye(9·C_in, C_out) conv init keeps only C_out of the "
        f"9·C_in β-scaled patch coordinates, so plain conv stacks shrink too; the ResNet's skips carry the norm). "
        f"Accuracy: "
        + ", ".join(f"{n} {statistics.fmean(v):.3f}" for n, v in acc.items())
        + f"; stem BN fwd+bwd: midpoint {statistics.fmean(bn_seconds['midpoint']) * 1e3:.1f} ms, Fréchet "
        f"{statistics.fmean(bn_seconds['frechet']) * 1e3:.1f} ms (means over {len(seeds)} seed(s))"
    )
    ours = acc["Poincaré ResNet-8"]
    frechet_check = (
        (
            Comparison(
                "accuracy within 2 points of Fréchet batch norm", ours, acc["Fréchet batch norm"], "higher", -0.02
            ),
        )
        if "Fréchet batch norm" in acc
        else ()
    )
    return Outcome(
        ours=ours,
        baseline=acc["Euclidean twin"],
        margin=-0.02,
        holds=norms_hold,
        checks=(
            Comparison(
                "stem batch-norm seconds, midpoint vs Fréchet", bn_seconds["midpoint"], bn_seconds["frechet"], "lower"
            ),
            *frechet_check,
        ),
        note=note,
        details={"norm_ratio_depth20": ratios, "test_acc": acc, "batch_norm_seconds": bn_seconds},
    )


def _probe_inputs(ds: Dataset) -> torch.Tensor:
    return torch.as_tensor(ds.splits["train"]["x"][:256], dtype=torch.float32)


def _save_figures(ctx: RunContext, curves: dict[str, list[float]], trained: TrainedResNet | None, seed: int) -> None:
    layers = list(range(1, 21))
    panel = {name: (layers, norms) for name, norms in curves.items()}
    fig = curves_figure({"mean ‖x‖ on the ball": panel}, "layer", logy=True, title=f"norms through depth, seed {seed}")
    ctx.save_artifact("poincare_resnet_norms.png", fig, kind="plot")
    if trained is not None:
        ctx.save_artifact(
            "poincare_resnet_disc.png", embedding_figure(trained, f"digits test embeddings, seed {seed}"), kind="plot"
        )
