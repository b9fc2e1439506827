"""Evaluation of the embedded toy video teacher (docs/method.md §7): a motion classifier trained on the
digits held out from the teacher gives the FID space (its video features; the reference is every real
digit moving in all four directions), adherence (digit and direction both right) and temporal
consistency (the classifier reads the same digit in every frame).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..toy.motion import VIDEO_CAPTIONS, caption_target, moving_digits
from .base import EvalRow, GateCheck, Metric
from .fid import feature_stats, frechet_distance
from .toy import HeldOutClassifierEvaluator, fid_adherence_checks


def video_eval_prompts(n: int) -> list[str]:
    """Balanced prompts: sample i asks for caption i % 40 (every digit in every direction)."""
    return [VIDEO_CAPTIONS[i % len(VIDEO_CAPTIONS)] for i in range(n)]


def temporal_consistency(frame_digits: torch.Tensor) -> float:
    """Percentage of videos whose per-frame digit predictions (N, F) are all the same."""
    return float((frame_digits == frame_digits[:, :1]).all(1).float().mean()) * 100


class MotionEvaluator(HeldOutClassifierEvaluator):
    """FID, adherence and temporal consistency for the toy video teacher and its students."""

    kind = "moving-digits"
    metrics = (Metric("fid", "FID"), Metric("adherence", "adherence %", ".1f"),
               Metric("consistency", "consistency %", ".1f"))
    grid_images, grid_nrow, grid_scale = 40, 8, 4

    def __init__(self, holdout_fraction: float, seed: int, epochs: int):
        from ..toy.video_classifier import train_motion_classifier

        real, _, _ = moving_digits(torch.arange(1797))
        self._setup("motion-classifier", *train_motion_classifier(holdout_fraction, seed, epochs), real,
                    holdout_fraction, seed, epochs=epochs)

    @torch.no_grad()
    def score_targets(self, videos: torch.Tensor, digits: torch.Tensor, directions: torch.Tensor) -> dict[str, float]:
        """videos (N, F, 1, 16, 16) in [0, 1]; the requested digits and directions (N,)."""
        x = videos.float().cpu().permute(0, 2, 1, 3, 4) * 2 - 1
        feats = self.classifier.features(x)
        right = (self.classifier.digit_head(feats).argmax(1) == digits) & \
            (self.classifier.direction_head(feats).argmax(1) == directions)
        return {"fid": frechet_distance(*feature_stats(feats), *self.ref),
                "adherence": float(right.float().mean()) * 100,
                "consistency": temporal_consistency(self.classifier.frame_digits(x).argmax(-1))}

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              reference: torch.Tensor | None) -> dict[str, float]:  # noqa: ARG002 - FID is against real videos
        targets = [caption_target(p) for p in prompts]
        if None in targets:
            raise ValueError("moving-digits evaluation: every prompt must be one of the toy video captions")
        t = torch.tensor(targets)
        return self.score_targets(images, t[:, 0], t[:, 1])

    def gate_checks(self, student: EvalRow, reference: EvalRow, teacher_ddim: EvalRow, gate_config) -> list[GateCheck]:
        drop = reference.metrics["consistency"] - student.metrics["consistency"]
        return fid_adherence_checks(student, reference, teacher_ddim, gate_config) + \
            [GateCheck("consistency_drop", drop, gate_config.max_consistency_drop)]
