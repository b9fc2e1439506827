"""One evaluation path for every teacher (docs/architecture.md, "Evaluation and the gate").

The plan is the same whatever the teacher: the teacher's reference sampler (`eval.teacher_steps` steps
with CFG), the teacher's own deterministic sampler at the student's K, and the student at each of its
evaluated step counts, all on the same prompts with the same seeds (sample i uses seed + i). One
sampling loop generates each row's images; the `Evaluator` scores them (`toy.DigitEvaluator`: FID and
adherence; `clip.ClipEvaluator`: CLIP score and CLIP-space FD to the reference) and names the checks
of the one gate. Teacher rows of a cacheable evaluator are cached on disk, keyed by the teacher's
immutable identity, so later distillations of the same teacher skip them.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..console import log, progress
from .base import EvalRow, Evaluator, GateCheck, Metric, gate

__all__ = ["EvalResult", "EvalRow", "Evaluator", "GateCheck", "Metric", "Sampler", "evaluation_plan", "gate",
           "run_evaluation", "sample_all"]


@dataclass(frozen=True)
class Sampler:
    """A row of the plan: which model samples, with how many steps and which guidance."""

    name: str
    model: str          # "teacher" | "student"
    steps: int
    guidance_scale: float


def evaluation_plan(cfg) -> list[Sampler]:
    """Reference teacher, teacher DDIM at K, then the student at every evaluated step count it supports
    (a TDM-unify student only at the step counts it was trained for)."""
    e, K, g = cfg.eval, cfg.student.num_steps, cfg.loss.guidance_scale
    plan = [Sampler(f"teacher@{e.teacher_steps}", "teacher", e.teacher_steps, g),
            Sampler(f"teacher_ddim@{K}", "teacher", K, g)]
    return plan + [Sampler(f"student@{k}", "student", k, g) for k in cfg.eval_student_steps
                   if not cfg.student.unify or k in cfg.student.steps]


def sample_all(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, batch_size: int,
               desc: str = "") -> tuple[torch.Tensor, float]:
    """Images (N, C, H, W) in [0, 1] for every prompt, in batches, sample i seeded seeds[i]; and the wall
    time per image in ms."""
    out = []
    t0 = time.perf_counter()
    for i in progress(range(0, len(prompts), batch_size), desc=desc):
        out.append(pipe(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                        seeds=list(seeds[i:i + batch_size])).cpu())
    return torch.cat(out), (time.perf_counter() - t0) * 1000 / len(prompts)


@dataclass
class EvalResult:
    rows: dict[str, EvalRow]
    grids: dict[str, torch.Tensor]      # the first images of every row, for the sample grids
    passed: bool
    gate: dict[str, float]              # gate/<check> values and gate/passed_<check> flags
    evaluator: Evaluator


def _cache_key(teacher_key: str, evaluator: Evaluator, sampler: Sampler, prompts: Sequence[str], seed: int) -> str:
    blob = json.dumps({"teacher": teacher_key, "evaluator": evaluator.identity, "name": sampler.name,
                       "steps": sampler.steps, "guidance": sampler.guidance_scale, "prompts": list(prompts),
                       "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cached_row(cache_dir: Path, key: str) -> tuple[EvalRow, torch.Tensor] | None:
    from safetensors.torch import load_file

    row_file, img_file = cache_dir / f"{key}.json", cache_dir / f"{key}.safetensors"
    if not (row_file.is_file() and img_file.is_file()):
        return None
    return EvalRow.from_dict(json.loads(row_file.read_text())), load_file(str(img_file))["grid"]


def _store_row(cache_dir: Path, key: str, row: EvalRow, grid: torch.Tensor) -> None:
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"grid": grid.contiguous()}, str(cache_dir / f"{key}.safetensors"))
    (cache_dir / f"{key}.json").write_text(json.dumps(row.to_dict()))


def run_evaluation(plan: Sequence[Sampler], models: dict, evaluator: Evaluator, prompts: Sequence[str], seed: int,
                   batch_size: int, student_steps: int, gate_config, cache_dir: Path | None = None,
                   teacher_key: str | None = None) -> EvalResult:
    """Evaluate every sampler of `plan` with `models` ({"teacher": pipe, "student": pipe}) on `prompts`
    (sample i seeded seed + i), then gate student@`student_steps` against plan[0] (the reference) and
    teacher_ddim@`student_steps`. Teacher rows are cached under `cache_dir` when the evaluator allows it
    and `teacher_key` (the teacher's immutable identity) is given."""
    seeds = [seed + i for i in range(len(prompts))]
    cache = cache_dir if (evaluator.cacheable and cache_dir is not None and teacher_key) else None
    rows: dict[str, EvalRow] = {}
    grids: dict[str, torch.Tensor] = {}
    reference: torch.Tensor | None = None
    for i, s in enumerate(plan):
        pipe = models[s.model]
        key = _cache_key(teacher_key, evaluator, s, prompts, seed) if cache is not None and s.model == "teacher" \
            else None
        hit = _cached_row(cache, key) if key is not None else None
        if hit is None:
            images, latency = sample_all(pipe, prompts, seeds, s.steps, s.guidance_scale, batch_size, desc=s.name)
            nfe = s.steps * (2 if pipe.kind == "teacher" and s.guidance_scale != 1.0 else 1)
            row = EvalRow(s.name, pipe.kind, s.steps, s.guidance_scale, nfe, latency,
                          evaluator.score(images, prompts, reference))
            grid = images[:evaluator.grid_images]
            if key is not None:
                _store_row(cache, key, row, grid)
            if i == 0:
                reference = images
        else:
            row, grid = hit
        rows[s.name], grids[s.name] = row, grid
        shown = ", ".join(f"{m.key} {row.metrics[m.key]:{m.fmt}}" for m in evaluator.metrics)
        log(f"eval {s.name}: {shown}" + (" (cached)" if hit is not None else ""))
    checks = evaluator.gate_checks(rows[f"student@{student_steps}"], rows[plan[0].name],
                                   rows[f"teacher_ddim@{student_steps}"], gate_config)
    passed, gate_metrics = gate(checks)
    return EvalResult(rows, grids, passed, gate_metrics, evaluator)
