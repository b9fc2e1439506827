"""What every evaluator shares: the row of the results table, the metric columns, and the quality gate.

An `Evaluator` scores a batch of generated images (its metrics, e.g. FID and adherence for the toy, CLIP
score and CLIP-space Fréchet distance for real teachers) and says which checks gate the student. The
sampling loop that feeds it is one for all evaluators (`tdm.evaluation.run_evaluation`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class Metric:
    """A column of the results table: its key in rows and MLflow (eval/<row>/<key>), header and format."""

    key: str
    header: str
    fmt: str = ".2f"


@dataclass(frozen=True)
class EvalRow:
    """One sampler of the results table (e.g. "student@4", "teacher@50", "teacher_ddim@4")."""

    name: str
    model: str              # student | teacher
    steps: int
    guidance_scale: float
    nfe: int                # network evaluations per image (CFG counts twice)
    latency_ms: float       # wall time per image, batched generation
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat, JSON-able: name, model, steps, guidance_scale, nfe, each metric, latency_ms."""
        return {"name": self.name, "model": self.model, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "nfe": self.nfe, **self.metrics, "latency_ms": self.latency_ms}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalRow":
        fixed = ("name", "model", "steps", "guidance_scale", "nfe", "latency_ms")
        return cls(**{k: d[k] for k in fixed}, metrics={k: float(v) for k, v in d.items() if k not in fixed})


@dataclass(frozen=True)
class GateCheck:
    """value <= limit must hold; limit None means reported, not gated."""

    name: str
    value: float
    limit: float | None

    @property
    def passed(self) -> bool:
        return self.limit is None or self.value <= self.limit


def gate(checks: Sequence[GateCheck]) -> tuple[bool, dict[str, float]]:
    """The verdict (all checks pass) and its metrics: gate/<name> (the value) and gate/passed_<name> (1/0)."""
    metrics = {f"gate/{c.name}": float(c.value) for c in checks}
    metrics |= {f"gate/passed_{c.name}": float(c.passed) for c in checks}
    return all(c.passed for c in checks), metrics


class Evaluator(ABC):
    """Scores generated images; one subclass per kind of teacher (the toy, real text-to-image models)."""

    #: what the evaluator is, for tables and logs ("digits", "clip")
    kind: str
    #: the metrics `score` returns, in table order
    metrics: tuple[Metric, ...]
    #: sample grid logged per row: how many images, per row, upscaled how much
    grid_images: int = 16
    grid_nrow: int = 4
    grid_scale: int = 1
    #: whether teacher rows may be cached across runs: a row's scores depend only on the evaluator's identity,
    #: the teacher, the sampler, the prompts and the seeds, and never on the reference images
    cacheable: bool = False

    @property
    @abstractmethod
    def identity(self) -> dict:
        """What determines the evaluator's scores (part of the teacher-row cache key)."""

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None) -> dict[str, float]:
        """Metrics of images (N, C, H, W) in [0, 1] generated for `prompts`; `reference` is the reference
        sampler's images (None when scoring the reference itself)."""

    @abstractmethod
    def gate_checks(self, student: EvalRow, reference: EvalRow, teacher_ddim: EvalRow, gate_config) -> list[GateCheck]:
        """The checks that decide the champion alias: student@K against the reference teacher row and the
        teacher's own sampler at K (`tdm.config.GateConfig` holds the limits)."""

    def info(self) -> dict:
        """Anything worth logging next to the table (e.g. the classifier's accuracy)."""
        return dict(self.identity)
