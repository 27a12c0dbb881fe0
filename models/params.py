"""Params mixins: the schedule fields every training family shares, declared once.

A family's params class subclasses these and redeclares a field only where its defaults or bounds
differ (pydantic keeps a redeclared field's place in the JSON schema), so `lr`, `batch_size`,
`weight_decay`, `epochs`/`steps` and `checkpoint_every` mean the same thing, under the same names, in
every method's params.

`checkpoint_every` lives in its own mixin, `ResumableParams`, because it is a promise: a method whose
params carry it saves a checkpoint every that many epochs or steps and, resumed from the last one,
ends with the same weights and metrics as a run that was never interrupted (the contract suite
checks it for every such method). A loop whose optimizer keeps state a checkpoint cannot hold (a
projector object, say) does not offer it rather than offer a resume that drifts.
"""

from __future__ import annotations

from pydantic import Field

from models.registry import MethodParams


class TrainingScheduleParams(MethodParams):
    """Optimizer fields of any training run."""

    lr: float = Field(1e-3, gt=0.0, le=10.0, description="(peak) learning rate")
    batch_size: int = Field(64, ge=1, le=8192, description="examples per optimizer step")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="weight decay")


class EpochTrainingParams(TrainingScheduleParams):
    """A schedule counted in passes over the training split."""

    epochs: int = Field(30, ge=1, le=1000, description="passes over the training split")


class StepTrainingParams(TrainingScheduleParams):
    """A schedule counted in optimizer steps (language-model training samples windows, not epochs)."""

    steps: int = Field(300, ge=1, le=1_000_000, description="optimizer steps")


class ResumableParams(MethodParams):
    """For a run that checkpoints and resumes exactly (see the module docstring)."""

    checkpoint_every: int = Field(
        0, ge=0, le=1_000_000, description="save a resumable checkpoint every N epochs or steps (0: never)"
    )
