"""Built-in evaluation: FID in a digit classifier's feature space, prompt adherence (that classifier's
accuracy against the requested digit), and latency per image, for the teacher's reference sampler,
teacher DDIM at the student's K, and the student at several step counts; plus the quality gate.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .progress import progress
from .toy.data import CAPTIONS, load_digits_tensors


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) (Heusel et al. 2017, eq. 6)."""
    import scipy.linalg

    covmean, _ = scipy.linalg.sqrtm(cov1 @ cov2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as in pytorch-fid
        off = np.eye(cov1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + off) @ (cov2 + off))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * covmean.real))


class DigitEvaluator:
    """FID and adherence for the toy: a classifier trained on the digits held out from the teacher;
    the FID reference is all 1,797 real digits in its penultimate feature space."""

    def __init__(self, holdout_fraction: float, seed: int):
        from .toy.classifier import train_classifier

        self.classifier, self.info = train_classifier(holdout_fraction, seed)
        x, _ = load_digits_tensors()
        with torch.no_grad():
            self.ref = feature_stats(self.classifier.features(x))
        self.identity = {"evaluator": "digits-classifier", "holdout_fraction": holdout_fraction, "seed": seed}

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """images (N, 1, 8, 8) in [0, 1]; labels (N,) requested digits."""
        x = images.float().cpu() * 2 - 1
        feats = self.classifier.features(x)
        adherence = (self.classifier.head(feats).argmax(1) == labels).float().mean().item() * 100
        return {"fid": frechet_distance(*feature_stats(feats), *self.ref), "adherence": adherence}


@dataclass
class EvalRow:
    name: str           # e.g. "student@4", "teacher@50", "teacher_ddim@4"
    model: str          # student | teacher
    steps: int
    guidance_scale: float
    nfe: int            # network evaluations per image (CFG counts twice)
    fid: float
    adherence: float
    latency_ms: float   # wall time per image, batched generation


def eval_prompts(n: int) -> tuple[list[str], torch.Tensor]:
    """Balanced prompts: sample i asks for digit i % 10."""
    labels = torch.arange(n) % 10
    return [CAPTIONS[i] for i in labels.tolist()], labels


def generate_all(pipe, prompts: Sequence[str], steps: int, guidance: float, seed: int, batch_size: int,
                 desc: str) -> tuple[torch.Tensor, float]:
    """Images for all prompts (sample i seeded seed + i) and the wall time per image in ms."""
    out = []
    t0 = time.perf_counter()
    for i in progress(range(0, len(prompts), batch_size), desc=desc):
        chunk = prompts[i:i + batch_size]
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance,
                        seeds=range(seed + i, seed + i + len(chunk))))
    return torch.cat(out), (time.perf_counter() - t0) * 1000 / len(prompts)


def evaluate_pipeline(pipe, evaluator: DigitEvaluator, name: str, steps: int, guidance: float, num_samples: int,
                      seed: int, batch_size: int) -> tuple[EvalRow, torch.Tensor]:
    """One table row plus the first 100 images (for the sample grid)."""
    prompts, labels = eval_prompts(num_samples)
    images, latency = generate_all(pipe, prompts, steps, guidance, seed, batch_size, desc=name)
    s = evaluator.score(images, labels)
    nfe = steps * (2 if pipe.kind == "teacher" and guidance != 1.0 else 1)
    return EvalRow(name, pipe.kind, steps, guidance, nfe, s["fid"], s["adherence"], latency), images[:100]


def teacher_cache_key(teacher_identity: dict, evaluator: DigitEvaluator, **params) -> str:
    blob = json.dumps({"teacher": teacher_identity, "evaluator": evaluator.identity, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_teacher_cached(teacher_pipe, evaluator, cache_dir: Path | None, teacher_identity: dict, **kw):
    """Teacher rows are deterministic for a given teacher, evaluator, sampler and seeds: cache them
    (row + grid) so later distillations of the same teacher skip the 50-step reference run."""
    if cache_dir is not None:
        key = teacher_cache_key(teacher_identity, evaluator, name=kw["name"], steps=kw["steps"],
                                guidance=kw["guidance"], n=kw["num_samples"], seed=kw["seed"])
        row_file, img_file = cache_dir / f"{key}.json", cache_dir / f"{key}.pt"
        if row_file.is_file() and img_file.is_file():
            return EvalRow(**json.loads(row_file.read_text())), torch.load(img_file), True
    row, images = evaluate_pipeline(teacher_pipe, evaluator, **kw)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(images, img_file)
        row_file.write_text(json.dumps(asdict(row)))
    return row, images, False


def gate(rows: dict[str, EvalRow], K: int, teacher_steps: int, g) -> tuple[bool, dict]:
    """The champion gate: student@K vs teacher@teacher_steps (FID, adherence) and vs teacher DDIM@K (FID)."""
    s, t, d = rows[f"student@{K}"], rows[f"teacher@{teacher_steps}"], rows[f"teacher_ddim@{K}"]
    checks = {
        "fid_ratio_teacher": s.fid / t.fid,
        "adherence_drop": t.adherence - s.adherence,
        "fid_ratio_teacher_ddim": s.fid / d.fid,
    }
    passed = {
        "fid_ratio_teacher": checks["fid_ratio_teacher"] <= g.max_fid_ratio_teacher,
        "adherence_drop": checks["adherence_drop"] <= g.max_adherence_drop,
        "fid_ratio_teacher_ddim": checks["fid_ratio_teacher_ddim"] <= g.max_fid_ratio_teacher_ddim,
    }
    return all(passed.values()), {"gate/" + k: v for k, v in checks.items()} | {
        "gate/passed_" + k: float(v) for k, v in passed.items()}
