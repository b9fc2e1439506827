"""Evaluation of the embedded toy: FID in a digit classifier's feature space and prompt adherence (that
classifier's accuracy against the requested digit). The classifier is trained on the digits held out
from the teacher; the FID reference is all 1,797 real digits (docs/method.md §7).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..toy.data import CAPTIONS, caption_label, load_digits_tensors
from .base import EvalRow, Evaluator, GateCheck, Metric
from .fid import feature_stats, frechet_distance


def eval_prompts(n: int) -> list[str]:
    """Balanced prompts: sample i asks for digit i % 10."""
    return [CAPTIONS[i % 10] for i in range(n)]


class HeldOutClassifierEvaluator(Evaluator):
    """What the toys' evaluators share: a classifier trained on the data held out from the teacher, whose
    features give the FID space against `real` samples; deterministic in (holdout_fraction, seed) and the
    further settings a subclass passes to `_setup`."""

    cacheable = True

    def _setup(self, name: str, classifier, classifier_info: dict, real: torch.Tensor, holdout_fraction: float,
               seed: int, **identity) -> None:
        """`identity`: further settings that change the classifier, hence the FID space (cached teacher rows
        hold only for an equal identity)."""
        self.classifier, self.classifier_info = classifier, classifier_info
        with torch.no_grad():
            self.ref = feature_stats(self.classifier.features(real))
        self._identity = {"evaluator": name, "holdout_fraction": holdout_fraction, "seed": seed, **identity}

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    def info(self) -> dict:
        return {**self._identity, **self.classifier_info}


class DigitEvaluator(HeldOutClassifierEvaluator):
    """FID and adherence for the toy, from a classifier trained on the digits held out from the teacher."""

    kind = "digits"
    metrics = (Metric("fid", "FID"), Metric("adherence", "adherence %", ".1f"))
    grid_images, grid_nrow, grid_scale = 100, 10, 4

    def __init__(self, holdout_fraction: float, seed: int):
        from ..toy.classifier import train_classifier

        x, _ = load_digits_tensors()
        self._setup("digits-classifier", *train_classifier(holdout_fraction, seed), x, holdout_fraction, seed)

    @torch.no_grad()
    def score_labels(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """images (N, 1, 8, 8) in [0, 1]; labels (N,) requested digits."""
        x = images.float().cpu() * 2 - 1
        feats = self.classifier.features(x)
        adherence = (self.classifier.head(feats).argmax(1) == labels).float().mean().item() * 100
        return {"fid": frechet_distance(*feature_stats(feats), *self.ref), "adherence": adherence}

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              reference: torch.Tensor | None) -> dict[str, float]:  # noqa: ARG002 - FID is against real digits
        labels = [caption_label(p) for p in prompts]
        if None in labels:
            raise ValueError("digits evaluation: every prompt must be one of the toy's captions")
        return self.score_labels(images, torch.tensor(labels))

    def gate_checks(self, student: EvalRow, reference: EvalRow, teacher_ddim: EvalRow, gate_config) -> list[GateCheck]:
        return fid_adherence_checks(student, reference, teacher_ddim, gate_config)


def fid_adherence_checks(student: EvalRow, reference: EvalRow, teacher_ddim: EvalRow, gate_config) -> list[GateCheck]:
    """The toys' gate: student@K FID against the reference teacher's and the teacher's own K-step sampler's,
    and its adherence against the reference's."""
    s, t, d = student.metrics, reference.metrics, teacher_ddim.metrics
    return [GateCheck("fid_ratio_teacher", s["fid"] / t["fid"], gate_config.max_fid_ratio_teacher),
            GateCheck("adherence_drop", t["adherence"] - s["adherence"], gate_config.max_adherence_drop),
            GateCheck("fid_ratio_teacher_ddim", s["fid"] / d["fid"], gate_config.max_fid_ratio_teacher_ddim)]
