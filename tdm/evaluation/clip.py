"""Evaluation of real (non-toy) teachers in a CLIP model's embedding space: CLIPScore (prompt adherence)
and the Fréchet distance between two image sets' CLIP features (student vs teacher); docs/method.md §7.

Preprocessing is pure torch (no PIL, no torchvision): resize the shorter side with antialiased bicubic
interpolation, center crop, normalise with the checkpoint's mean/std, as CLIP's own image processor does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError, first_line
from .base import EvalRow, Evaluator, GateCheck, Metric
from .fid import feature_stats, frechet_distance

#: OpenAI CLIP's normalisation (used when the checkpoint has no preprocessor_config.json).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: CLIPScore weight w (Hessel et al. 2021 use 2.5; torchmetrics and most diffusion papers use 100).
CLIP_SCORE_WEIGHT = 100.0


def _size_value(value, *keys) -> int | None:
    """An int from a preprocessor size field: an int, or a dict such as {"shortest_edge": 224} or
    {"height": 224, "width": 224}."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for key in keys:
            if value.get(key) is not None:
                return int(value[key])
    return None


def _load_preprocessor_config(model: str) -> dict | None:
    """preprocessor_config.json of a local directory or hub repo, or None when it has none."""
    local = Path(model)
    if local.is_dir():
        f = local / "preprocessor_config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from transformers.utils import cached_file

        f = cached_file(model, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - no preprocessor config: fall back to the model config
        return None
    return json.loads(Path(f).read_text()) if f else None


def clip_score_from_features(img_feats: torch.Tensor, txt_feats: torch.Tensor,
                             weight: float = CLIP_SCORE_WEIGHT) -> float:
    """CLIPScore (Hessel et al. 2021, eq. 1): mean over pairs i of w * max(cos(E_I_i, E_C_i), 0), with
    w = 100 as in torchmetrics' CLIPScore. Features (N, D) need not be normalised; row i of each is a pair."""
    if img_feats.shape != txt_feats.shape or img_feats.ndim != 2:
        raise ValueError(f"clip score: need matching (N, D) features, got {tuple(img_feats.shape)} "
                         f"and {tuple(txt_feats.shape)}")
    if img_feats.shape[0] == 0:
        raise ValueError("clip score: no pairs")
    cos = F.cosine_similarity(img_feats.double(), txt_feats.double(), dim=1)
    return float((weight * cos.clamp(min=0)).mean())


class ClipEvaluator(Evaluator):
    """A CLIP model (transformers CLIPModel + tokenizer) for CLIPScore and FD in CLIP feature space.

    model: a hub id or a local directory saved with save_pretrained."""

    kind = "clip"
    metrics = (Metric("clip_score", "CLIP score"), Metric("fid_vs_teacher", "FD vs teacher", ".4f"))

    def __init__(self, model: str, device="cpu", dtype=torch.float32):
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        model = str(model)
        try:
            local = Path(model).expanduser()
            if (local.is_absolute() or model.startswith((".", "~"))) and not local.exists():
                raise FileNotFoundError(f"no such directory: {str(local)!r}")
            ref = str(local) if local.exists() else model  # local directory (with ~ expanded) or hub id
            config = AutoConfig.from_pretrained(ref)
            if getattr(config, "model_type", None) != "clip":
                raise ValueError(f"model_type is {getattr(config, 'model_type', None)!r}, not 'clip'")
            self.model = CLIPModel.from_pretrained(ref, dtype=dtype, use_safetensors=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(ref)
        except Exception as e:  # noqa: BLE001 - one clear error naming the config key
            raise InputError(f"eval.clip_model: cannot load {model!r}: {first_line(e)}") from e
        self.name = model
        self.device = torch.device(device)
        self.dtype = dtype

        image_size = int(self.model.config.vision_config.image_size)
        pre = _load_preprocessor_config(ref) or {}
        self.crop_size = _size_value(pre.get("crop_size"), "height", "shortest_edge", "width") or image_size
        self.resize_size = _size_value(pre.get("size"), "shortest_edge", "height", "width") or self.crop_size
        mean = pre.get("image_mean") or OPENAI_CLIP_MEAN
        std = pre.get("image_std") or OPENAI_CLIP_STD
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        max_pos = int(self.model.config.text_config.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", max_pos) or max_pos
        self.max_length = min(max_pos, int(tok_max))
        self._identity = {"evaluator": "clip", "model": model, "resize": self.resize_size, "crop": self.crop_size}

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) floats in [0, 1], C in {1, 3} -> (B, 3, S, S) normalised pixel values:
        shorter side resized to the resize size (antialiased bicubic), center crop, clamp, normalise."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"clip eval: images must be (B, 1|3, H, W), got {tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        size = (new_short, new_long) if h <= w else (new_long, new_short)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        c = self.crop_size
        h, w = x.shape[-2:]
        if h < c or w < c:  # resize size below crop size (unusual configs): zero-pad as CLIP's processor does
            ph, pw = max(c - h, 0), max(c - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = x.shape[-2:]
        top, left = (h - c) // 2, (w - c) // 2
        x = x[..., top:top + c, left:left + c].clamp(0, 1)
        return (x - self.mean) / self.std

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, D) L2-normalised projected image embeddings (float32, CPU)."""
        out = []
        for i in range(0, images.shape[0], batch_size):
            pixels = self.preprocess(images[i:i + batch_size]).to(self.device, self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        if not out:
            raise ValueError("clip eval: no images")
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) L2-normalised projected text embeddings (float32, CPU); prompts truncated to CLIP's length."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            tok = self.tokenizer(prompts[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        if not out:
            raise ValueError("clip eval: no prompts")
        return F.normalize(torch.cat(out), dim=-1)

    # ------------------------------------------------------------------ metrics
    def clip_score(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """CLIPScore (Hessel et al. 2021): mean over pairs of 100 * max(cos(image_i, text_i), 0),
        w = 100 as in torchmetrics. images[i] is paired with prompts[i]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images.shape[0] != len(prompts):
            raise ValueError(f"clip score: {images.shape[0]} images but {len(prompts)} prompts")
        return clip_score_from_features(self.image_features(images), self.text_features(prompts))

    def fid(self, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
        """Fréchet distance between the two sets' CLIP image features ("FD in CLIP feature space", as in
        Kynkäänniemi et al. 2023 and Stein et al. 2023). Uses the projected, L2-normalised embeddings (the
        space CLIPScore lives in), so values are on a much smaller scale than Inception FID; statistics in
        float64. Each set needs at least 2 images (a covariance)."""
        for name, imgs in (("images_a", images_a), ("images_b", images_b)):
            if imgs.shape[0] < 2:
                raise ValueError(f"clip fid: {name} has {imgs.shape[0]} image(s); need at least 2")
        return frechet_distance(*feature_stats(self.image_features(images_a)),
                                *feature_stats(self.image_features(images_b)))

    # ------------------------------------------------------------------ the Evaluator interface
    def score(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None) -> dict[str, float]:
        """CLIP score, and the FD to the reference teacher's samples (0 for the reference itself)."""
        return {"clip_score": self.clip_score(images, prompts),
                "fid_vs_teacher": 0.0 if reference is None else self.fid(images, reference)}

    def gate_checks(self, student: EvalRow, reference: EvalRow, teacher_ddim: EvalRow,  # noqa: ARG002 - interface
                    gate_config) -> list[GateCheck]:
        return [GateCheck("clip_score_drop", reference.metrics["clip_score"] - student.metrics["clip_score"],
                          gate_config.max_clip_score_drop),
                GateCheck("fid_vs_teacher", student.metrics["fid_vs_teacher"], gate_config.max_fid_vs_teacher)]


def evaluate_against_teacher(student_images: torch.Tensor, teacher_images: torch.Tensor, prompts: Sequence[str],
                             evaluator: ClipEvaluator) -> dict:
    """Student vs teacher on the same prompts: FD between their CLIP features and each one's CLIPScore."""
    return {
        "fid_vs_teacher": evaluator.fid(student_images, teacher_images),
        "clip_score_student": evaluator.clip_score(student_images, prompts),
        "clip_score_teacher": evaluator.clip_score(teacher_images, prompts),
    }


def frame_consistency(features: torch.Tensor) -> float:
    """Mean cosine similarity x 100 of consecutive frames' CLIP embeddings, features (N, F, D) with F >= 2
    (docs/method.md eq. 7.3): 100 for a still video."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"frame consistency: need (N, F >= 2, D) features, got {tuple(features.shape)}")
    cos = F.cosine_similarity(features[:, 1:].double(), features[:, :-1].double(), dim=-1)
    return float(100.0 * cos.mean())


class VideoClipEvaluator(ClipEvaluator):
    """Real video teachers: per-frame CLIP score, CLIP-space FD over frames between the model's and the
    reference teacher's videos, and frame-to-frame CLIP consistency."""

    kind = "clip-video"
    metrics = ClipEvaluator.metrics + (Metric("frame_consistency", "frame consistency"),)
    grid_images, grid_nrow = 8, 4

    def __init__(self, model: str, device="cpu", dtype=torch.float32):
        super().__init__(model, device, dtype)
        self._identity["evaluator"] = "clip-video"

    def score(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None) -> dict[str, float]:
        """videos (N, F, C, H, W) in [0, 1] for `prompts`; `reference` the reference teacher's videos."""
        if images.ndim != 5:
            raise ValueError(f"video clip eval: videos must be (N, F, C, H, W), got {tuple(images.shape)}")
        n, frames = images.shape[:2]
        feats = self.image_features(images.flatten(0, 1))
        text = self.text_features(prompts).repeat_interleave(frames, 0)
        out = {"clip_score": clip_score_from_features(feats, text), "fid_vs_teacher": 0.0,
               "frame_consistency": frame_consistency(feats.view(n, frames, -1))}
        if reference is not None:
            ref = self.image_features(reference.flatten(0, 1))
            out["fid_vs_teacher"] = frechet_distance(*feature_stats(feats), *feature_stats(ref))
        return out
