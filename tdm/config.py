"""One typed, validated configuration for a distillation run.

Every constant of the paper or the official demo is a named field here, with its default and the
published value in the description. Unknown keys are errors. The resolved config is logged to
MLflow and stored in every checkpoint and exported model.

Sources of the "paper" and "demo" values: docs/method.md §6 (settings and where they come from).
The command line over this schema is `tdm.cli`.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError, validation_message


class Section(BaseModel):
    # no config field takes inf or NaN: they pass a `ge=0` bound and fail late (or never: NaN < x is False)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _safe_name(name: str | None) -> str | None:
    """Run and model names: one path segment (checkpoints live under <storage>/<name>) that MLflow's search
    filters take as a quoted literal: letters, digits, '.', '_', '-', starting with a letter or digit, no
    '..', at most 128 characters."""
    if name is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name):
        raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, no "
                         "'..', at most 128 characters)")
    return name


SafeName = Annotated[str, AfterValidator(_safe_name)]


def _reserved_alias(alias: str) -> str:
    """MLflow reserves the alias `latest` and aliases of the form v<digits> (version references)."""
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"{alias!r} is reserved by MLflow (latest and v<number> name versions); choose another alias")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", alias):
        raise ValueError(f"{alias!r}: letters, digits, '_' and '-' only")
    return alias


def grid_problem(grid: Sequence[float], num_steps: int) -> str | None:
    """Why `grid` is not a K-step student grid (K timesteps, strictly descending, all > 0), or None."""
    if len(grid) != num_steps:
        return f"has {len(grid)} entries for K={num_steps}"
    if any(a <= b for a, b in zip(grid, grid[1:])) or grid[-1] <= 0:
        return f"must be strictly descending and > 0, got {grid} for K={num_steps}"
    return None


class TeacherConfig(Section):
    uri: str = Field("toy", description="Teacher: 'toy' (the embedded digits teacher, trained and registered on first "
                     "use), 'toy-video' (the embedded moving-digits video teacher, likewise), a local diffusers "
                     "directory, a Hugging Face hub id, an s3:// prefix, or models:/<name>@<alias>.")
    negative_prompt: str = Field("", description="Prompt of the unconditional CFG branch (empty = unconditional).")


class ToyConfig(Section):
    """Training of the embedded toy teacher (used only when teacher.uri is 'toy')."""

    model_name: SafeName = Field("tdm-toy-teacher",
                            description="Registered model name of the toy teacher.")
    train_steps: int = Field(1000, ge=1, description="Optimizer steps of the toy teacher's diffusion training.")
    channels: tuple[int, int] = Field((24, 48), description="UNet channels of the toy teacher's two levels "
                                      "(8x8 and 4x4, cross-attention at 4x4); multiples of 8.")
    batch_size: int = Field(128, ge=1, description="Toy teacher training batch size.")
    lr: float = Field(2e-3, gt=0, description="Toy teacher learning rate (AdamW, cosine decay).")
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="Probability of dropping the caption during teacher "
                               "training, so the teacher also learns the unconditional score for CFG.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the toy teacher's weights.")
    holdout_fraction: float = Field(0.4, gt=0, lt=1, description="Fraction of the digits held out from the teacher; "
                                    "the evaluation classifier is trained on them.")
    seed: int = Field(0, description="Seed of the toy teacher's training and data split.")
    retrain: bool = Field(False, description="Train a new toy teacher version even if one is registered.")

    @model_validator(mode="after")
    def _channels(self):
        if any(c < 8 or c % 8 for c in self.channels):
            raise ValueError(f"channels must be positive multiples of 8, got {self.channels}")
        return self


class ToyVideoConfig(Section):
    """Training of the embedded toy video teacher (used only when teacher.uri is 'toy-video'): a tiny
    WanTransformer3DModel in pixel space on moving digits (tdm.toy.video)."""

    model_name: SafeName = Field("tdm-toy-video-teacher",
                            description="Registered model name of the toy video teacher.")
    train_steps: int = Field(4000, ge=1, description="Optimizer steps of the toy video teacher's flow training "
                             "(6,000 until 2026-12-07; README, \"the toy video teacher\").")
    heads: int = Field(4, ge=1, description="Attention heads of the toy video transformer.")
    head_dim: int = Field(32, ge=6, description="Width of each head; Wan's 3D rotary embedding gives height and "
                          "width 2*(head_dim//6) channels each, so narrow heads barely see where a patch is.")
    patch: int = Field(4, ge=1, description="Spatial patch of the transformer (pixels per token side; 16 must "
                       "be a multiple).")
    patch_frames: int = Field(5, ge=1, description="Temporal patch of the transformer (frames per token; 5 must be "
                              "a multiple). 5: each token holds a 4x4 region over the whole clip, so the digit's "
                              "shape and its motion sit inside one token (README, 'the toy video teacher').")
    layers: int = Field(2, ge=1, description="Transformer blocks of the toy video teacher.")
    batch_size: int = Field(64, ge=1, description="Toy video teacher training batch size.")
    lr: float = Field(3e-3, gt=0, description="Toy video teacher learning rate (AdamW, cosine decay).")
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="Probability of dropping the caption during teacher "
                               "training (the unconditional score for CFG).")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the toy video teacher's weights.")
    holdout_fraction: float = Field(0.4, gt=0, lt=1, description="Fraction of the digits held out from the teacher; "
                                    "the evaluation classifier is trained on them.")
    seed: int = Field(0, description="Seed of the toy video teacher's training and data split.")
    retrain: bool = Field(False, description="Train a new toy video teacher version even if one is registered.")
    classifier_epochs: int = Field(8, ge=1, le=100, description="Epochs of the evaluation's motion classifier "
                                   "(trained on the held-out digits each job; it defines the FID space, so FIDs "
                                   "are comparable only at equal epochs). Not part of the teacher's identity.")

    @model_validator(mode="after")
    def _patches(self):
        # the toy's fixed geometry (tdm.toy.motion: FRAMES, CANVAS); tests/test_config.py checks they agree
        if 16 % self.patch:
            raise ValueError(f"patch must divide the toy's 16-pixel canvas (1, 2, 4, 8 or 16), got {self.patch}")
        if 5 % self.patch_frames:
            raise ValueError(f"patch_frames must divide the toy's 5 frames (1 or 5), got {self.patch_frames}")
        return self


class VideoConfig(Section):
    """Geometry of a video teacher's samples (image teachers: leave unset). None = what the teacher's model
    directory records, else the family's release geometry (Wan 2.1: 81 frames of 480x832 at 16 fps;
    CogVideoX: 49 frames of 480x720 at 8 fps)."""

    frames: Optional[int] = Field(None, ge=1, description="Frames per video (Wan and CogVideoX: 1 + a multiple "
                                  "of 4, their VAEs' temporal compression).")
    height: Optional[int] = Field(None, ge=1, description="Frame height in pixels (a multiple of VAE x patch: 16).")
    width: Optional[int] = Field(None, ge=1, description="Frame width in pixels (a multiple of VAE x patch: 16).")
    fps: Optional[float] = Field(None, gt=0, description="Frame rate of exported and served videos.")

    def overrides(self) -> dict:
        """The geometry entries set here (tdm.backbones.load_backbone's `video`)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class StudentConfig(Section):
    num_steps: int = Field(4, ge=1, description="K, the student's number of sampling steps (paper: 4). With "
                           "step_set, the default step count of the exported student.")
    step_set: Optional[list[int]] = Field(None, description="TDM-unify (sampling-steps-aware objective, eq. 8): "
                                          "the step counts drawn per iteration, e.g. 1,2,4; the student and fake "
                                          "score are conditioned on K. None = plain fixed-K TDM.")
    step_probs: Optional[list[float]] = Field(None, description="Sampling probabilities of step_set (default uniform).")
    t_start: Optional[int] = Field(None, ge=1, description="T_start, top of the uniform grid t_i = round(T_start*i/K) "
                                   "(default: the teacher's last timestep, 999; demo README: 899).")
    timesteps: Optional[list[int] | dict[int, list[int]]] = Field(
        None, description="Explicit descending grid of K timesteps, e.g. 999,856,665,399; overrides the uniform "
        "grid. With step_set (TDM-unify): a mapping {K: grid}, e.g. '{\"2\": [999, 399]}'; step counts not in "
        "it use the uniform grid.")
    finetune: Literal["full", "lora"] = Field("full", description="How the student and the fake score are "
                                              "trained: 'full' = two full trainable copies of the teacher (the "
                                              "paper's main models); 'lora' = two LoRA adapters on one frozen base, "
                                              "the teacher being the base with adapters off (one copy of the "
                                              "weights; the paper's released models).")
    lora_rank: int = Field(64, ge=1, description="LoRA rank r of both adapters (official BLADE config: 64; SD3.5 "
                           "release: 32).")
    lora_alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha (scale alpha/r); none = lora_rank.")
    lora_targets: Optional[list[str]] = Field(None, description="peft target_modules of the adapters; none = the "
                                              "backbone family's default (attention, feed-forward and, for UNets, "
                                              "resnet convolutions: the LCM-LoRA set).")

    @property
    def unify(self) -> bool:
        return self.step_set is not None and len(self.step_set) > 1

    @property
    def steps(self) -> list[int]:
        """All step counts the student is trained for."""
        return sorted(self.step_set) if self.step_set else [self.num_steps]

    @property
    def explicit_grids(self) -> dict[int, list[int]]:
        """The grids given by `timesteps`, keyed by K ({} = all uniform)."""
        if self.timesteps is None:
            return {}
        if isinstance(self.timesteps, dict):
            return {k: list(v) for k, v in self.timesteps.items()}
        return {self.num_steps: list(self.timesteps)}


def embedded_scale(teacher_guidance: str, guidance_scale: float) -> float:
    """The scale fed to a guidance-embedding network (docs/method.md §9): guidance_scale under 'embedded', 1
    under 'cfg' (the value of the stock pipelines' guidance_scale=1 call)."""
    return guidance_scale if teacher_guidance == "embedded" else 1.0


def embedded_guidance_refused(teacher: str) -> ConfigError:
    """The refusal of loss.teacher_guidance embedded for a teacher network that takes no guidance scale."""
    return ConfigError(f"loss.teacher_guidance: 'embedded' feeds the guidance scale to the network, and this "
                       f"teacher ({teacher}) takes none (a guidance-distilled one such as FLUX.1-dev does); use 'cfg'")


class LossConfig(Section):
    guidance_scale: float = Field(2.0, ge=1.0, description="CFG scale of the teacher in the TDM target, diffusers "
                                  "convention uncond + s*(cond - uncond), 1 = no guidance; baked into the student. "
                                  "Paper: 3.5 (SD1.5, PixArt), 8 (SDXL); demo README 4.5; toy default 2.")
    teacher_guidance: Literal["cfg", "embedded"] = Field("cfg", description="How the teacher applies guidance_scale "
                                                         "in the TDM target: 'cfg' = two batched passes (cond, "
                                                         "uncond); 'embedded' = one pass with the scale fed to a "
                                                         "guidance-distilled network (FLUX.1-dev), which the "
                                                         "student then also receives (docs/method.md §9).")
    interval: Literal["separate", "to_terminal"] = Field("separate", description="Diffusion interval of tau: "
                                                         "'separate' = [t_{k-1}, t_k) (disjoint, paper), "
                                                         "'to_terminal' = [t_{k-1}, t_K).")
    randmid: bool = Field(False, description="Randomise the intermediate level r ~ U[t_{k-1}, t_k - randmid_margin) "
                          "(demo --use_randmid; not in the paper).")
    randmid_margin: float = Field(20, ge=0, description="Upper margin of randmid (demo: 20 timesteps).")
    margin_low: float = Field(20, ge=0, description="tau >= margin_low (demo: 20 timesteps).")
    margin_high: float = Field(10, ge=0, description="tau < upper end - margin_high (demo: 10 timesteps).")
    snr_gamma: Optional[float] = Field(5.0, gt=0, description="Min-SNR gamma of the fake-score loss weight "
                                       "min(SNR(tau), gamma) (demo: 5); none = SNR weight (eps-MSE).")
    importance_weight: bool = Field(True, description="Tempered importance weight of the fake-score loss (eq. 7; "
                                    "ablation without it: 29.27 vs 31.35 HPS).")
    importance_weight_max: Optional[float] = Field(None, gt=0, description="Clip of the importance weight "
                                                   "(FastVideo: 10); none = no clip (demo).")
    generator_loss: Literal["huber", "huber_vector", "mse"] = Field("huber", description="Generator regression: "
                                                                    "'huber' element-wise pseudo-Huber (demo), "
                                                                    "'huber_vector' (paper), 'mse'.")
    huber_c: Optional[float] = Field(None, gt=0, description="Pseudo-Huber c; none = 1e-3 for 'huber' (demo) and "
                                     "0.00054*sqrt(d) for 'huber_vector' (paper, d = latent size).")
    normalize: bool = Field(True, description="Divide the generator loss by the per-sample DMD normaliser "
                            "mean|x0 - x0_real| (demo).")
    resample_for_generator: bool = Field(True, description="Draw fresh (k, r, tau, z) for the generator step "
                                         "(demo); false reuses the fake step's.")
    last_step_weight: float = Field(1.0, gt=0, le=100, description="Relative weight of the student's last step "
                                    "(trajectory point k = 1, which lands on clean samples) when drawing k; 1 = "
                                    "uniform over the K points (paper, demo). 3 makes half the batch train the last "
                                    "step (README, 'the toy video teacher').")


class OptimConfig(Section):
    lr_student: float = Field(5e-5, gt=0, description="Student learning rate. Paper: 2e-6 (SD1.5, PixArt), "
                              "1e-6 (SDXL); demo: lr/5. Toy default 5e-5 (toy-video: 2.5e-5).")
    lr_fake: float = Field(2e-4, gt=0, description="Fake-score learning rate (paper: 5-10x the student's; "
                           "2e-5 for SD1.5/PixArt). Toy default 2e-4.")
    betas: tuple[float, float] = Field((0.0, 0.999), description="AdamW betas (paper: 0, 0.999; demo: 0, 0.95).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (demo: 0.01).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Gradient-norm clip of both networks (paper: 1.0; the "
                                       "demo clips the student only); none = no clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up steps of both networks.")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="LR after warm-up for both networks: "
                                                       "'constant' (demo's fake score) or 'cosine' decay to 0 at "
                                                       "train.max_steps (settles the final iterate).")
    step_embedding_lr_scale: float = Field(20.0, gt=0, description="TDM-unify: LR multiplier of the zero-initialised "
                                           "step-count embeddings of student and fake score (not in the paper; "
                                           "toy: 20 gave @4 FID 9.2 vs 11.1 at 1).")
    fake_updates_per_step: int = Field(1, ge=1, description="Fake-score updates per student update (paper: 1; "
                                       "DMD2: 5-10). Toy: 2 at the default lr_fake diverged after ~1000 "
                                       "iterations.")

    @model_validator(mode="after")
    def _betas(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class TrainConfig(Section):
    max_steps: int = Field(600, ge=1, description="Distillation iterations (paper: 500 for PixArt).")
    batch_size: int = Field(64, ge=1, description="Global batch of prompts per iteration: the same for any worker "
                            "count; split over workers x grad_accum_steps micro-batches.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per worker and iteration (gradient "
                                  "accumulation); each network still steps once per iteration.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast of the network calls "
                                                           "(GPU only); fp16 adds loss scaling. TDM math stays fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass of the "
                                         "trainable networks (less memory, ~30% more compute).")
    gradient_checkpointing_every: int = Field(1, ge=1, le=64, description="With gradient_checkpointing: "
                                              "recompute every n-th block only (selective activation "
                                              "checkpointing; 1 = every block, 2 = half of them).")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="Data parallelism: ddp (every worker holds full "
                                             "roles) or fsdp (FSDP2: parameters, gradients, optimizer states "
                                             "and EMA sharded per block over the workers). docs/scaling.md.")
    fsdp_cpu_offload: bool = Field(False, description="train.strategy fsdp: keep sharded parameters, "
                                   "gradients and optimizer states in CPU memory between uses.")
    gpu_memory_gb: Optional[float] = Field(None, gt=0, description="Memory of one worker's GPU: a run whose "
                                           "estimated per-worker memory (pipelines/distill.py --plan) exceeds it "
                                           "is refused before any work, naming the changes that would fit.")
    seed: int = Field(0, description="Seed of all distillation randomness (per-step and per-rank streams).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes (Ray's placement-group strategies): PACK fills "
        "nodes first, STRICT_SPREAD puts each worker on its own node (one worker per GPU node).")
    cpus_per_worker: Optional[float] = Field(None, gt=0, description="CPUs per worker (default: all of a local "
                                             "machine's CPUs divided among the workers, else 1).")
    ema_decay: Optional[float] = Field(0.99, gt=0, lt=1, description="EMA decay of the student; evaluation and "
                                       "export use the EMA weights. none = off (the demo's default).")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")
    storage_path: Optional[str] = Field(None, description="Checkpoint storage: a local directory or "
                                        "s3://bucket/prefix; none = $TDM_HOME/runs.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts from the last checkpoint before giving up.")
    max_nonfinite_steps: int = Field(20, ge=1, description="Iterations in a row with a non-finite loss or gradient "
                                     "(their updates are skipped) before the run stops with an error.")
    log_every: int = Field(10, ge=1, description="Steps between metric flushes to MLflow.")
    sample_every: int = Field(100, ge=1, description="Steps between fixed-noise sample grids in MLflow.")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="Seconds between MLflow system-metrics "
                                             "samples (CPU, memory, GPU) of each node.")
    tracking_buffer_mb: int = Field(256, ge=1, description="Bound of the MLflow writes (metrics, sample grids, "
                                    "checkpoint records) rank 0 holds while the tracking server is unreachable; "
                                    "past it the oldest sample grids, then the oldest metrics, are dropped "
                                    "(counted). docs/architecture.md, 'Tracking outages'.")
    tracking_grace_s: float = Field(300.0, ge=0, description="At the end of training, seconds to wait for an "
                                    "unreachable tracking server before the unsent writes are saved next to the "
                                    "checkpoints (the same command run again sends them, then registers).")
    ray_address: Optional[str] = Field(None, description="Ray cluster address; none = $RAY_ADDRESS or a new local "
                                       "Ray instance.")


class EvalConfig(Section):
    enabled: bool = Field(True, description="Evaluate after training (required for the quality gate).")
    num_samples: int = Field(2000, ge=10, description="Samples per evaluated sampler.")
    seed: int = Field(10_000, description="Seed of the evaluation noise (sample i uses seed + i).")
    teacher_steps: int = Field(50, ge=1, description="Steps of the teacher reference sampler.")
    student_steps: Optional[list[int]] = Field(None, description="Student step counts to evaluate (default 1, 2, K).")
    batch_size: int = Field(500, ge=1, description="Evaluation batch size.")
    clip_model: Optional[str] = Field(None, description="Real teachers: CLIP model (hub id or directory, e.g. "
                                      "openai/clip-vit-large-patch14) for the CLIP score and the Frechet distance "
                                      "between student and teacher samples in CLIP feature space.")


class GateConfig(Section):
    """Quality gate for the `champion` alias (all must hold)."""

    max_fid_ratio_teacher: float = Field(1.0, gt=0, description="student@K FID <= this x teacher's "
                                         "teacher_steps FID at the same guidance.")
    max_adherence_drop: float = Field(1.0, ge=0, description="student@K prompt adherence >= teacher's minus this "
                                      "(percentage points).")
    max_fid_ratio_teacher_ddim: float = Field(0.5, gt=0, description="student@K FID <= this x teacher DDIM@K FID.")
    max_consistency_drop: float = Field(0.0, ge=0, description="Toy video: student@K temporal consistency (same "
                                        "digit in every frame, %) >= teacher's minus this (percentage points).")
    max_clip_score_drop: float = Field(1.0, ge=0, description="Real teachers: student@K CLIP score >= teacher's "
                                       "teacher_steps CLIP score minus this.")
    max_fid_vs_teacher: Optional[float] = Field(None, gt=0, description="Real teachers: Frechet distance (CLIP "
                                                "space) between student@K and teacher samples <= this; none = "
                                                "not gated, only reported.")


#: teacher.uri of the embedded toys
TOY_TEACHERS = ("toy", "toy-video")
#: what teacher.uri toy-video changes in the defaults (values given explicitly win)
TOY_VIDEO_DEFAULTS: dict[str, dict[str, Any]] = {
    "registry": {"model_name": "tdm-video-student"},
    "train": {"max_steps": 300, "batch_size": 32},
    # half the image toy's student rate: at 5e-5 the student's frames disagreed more often (consistency 96.4 %
    # against 97.8 %, teacher 99.2 %; README, "the toy video teacher")
    "optim": {"lr_student": 2.5e-5},
    # the last step (sigma 0.5 -> clean) is where the student's frames came to disagree: train it on half the
    # batch (README, "the toy video teacher": consistency 97.8 -> 99.3 % with the grid below)
    "loss": {"last_step_weight": 3.0},
}
#: the toy video student's 4-step grid, ending at t = 100 (sigma 0.25) rather than the uniform 250, so the
#: last step has less to decide; applied only when the student section names no step count or grid of its own
TOY_VIDEO_GRID: dict[str, Any] = {"num_steps": 4, "timesteps": [1000, 750, 500, 100]}


class RegistryConfig(Section):
    experiment: str = Field("tdm", description="MLflow experiment.")
    model_name: SafeName = Field("tdm-student", description="Registered model name of the student "
                            "(default 'tdm-video-student' for teacher.uri toy-video).")
    alias: Annotated[str, AfterValidator(_reserved_alias)] = Field(
        "champion", description="Alias set on a version that passes the gate (not `latest` or v<number>, which "
                                "MLflow reserves).")


class DataConfig(Section):
    prompts: Optional[list[str]] = Field(None, description="Training prompts; none = the teacher's own prompt set "
                                         "(the ten digit captions for the toy).")
    prompt_source: Optional[str] = Field(None, description="Where the prompts are: a .txt file (one per line), "
                                         ".jsonl or .parquet (column prompt_column), a local directory of such "
                                         "files, or an s3://bucket/prefix (object or prefix).")
    prompt_column: str = Field("prompt", description="Column / JSON key of the prompts in .jsonl and .parquet.")
    max_prompts: Optional[int] = Field(None, ge=1, description="Use only the first N prompts of the source.")
    embedding_cache: bool = Field(True, description="Cache the text embeddings of the prompt set on disk "
                                  "($TDM_HOME/cache/embeddings), keyed by teacher and prompts, so the text "
                                  "encoders run once per node and prompt set, not every step or restart.")


class TDMConfig(Section):
    name: Optional[SafeName] = Field(None, description="Run name: the key of checkpoints and of "
                                "the MLflow run (letters, digits, '.', '_', '-'). Running "
                                "again with the same name resumes. none = a new timestamped name.")
    teacher: TeacherConfig = TeacherConfig()
    toy: ToyConfig = ToyConfig()
    toy_video: ToyVideoConfig = ToyVideoConfig()
    video: VideoConfig = VideoConfig()
    student: StudentConfig = StudentConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="before")
    @classmethod
    def _toy_video_defaults(cls, data: Any):
        # the toy video job registers its student apart from the image toy's and, its network costing more
        # per sample, trains on a smaller batch for fewer iterations, weights and places its last step, unless
        # told otherwise (TOY_VIDEO_DEFAULTS, TOY_VIDEO_GRID)
        if isinstance(data, dict) and isinstance(data.get("teacher"), dict) and \
                data["teacher"].get("uri") == "toy-video":
            data = dict(data)
            for section, values in TOY_VIDEO_DEFAULTS.items():
                given = data.get(section) or {}
                if isinstance(given, dict):
                    data[section] = {**values, **given}
            student = data.get("student") or {}
            if isinstance(student, dict) and not {"num_steps", "step_set", "timesteps", "t_start"} & student.keys():
                data["student"] = {**TOY_VIDEO_GRID, **student}
        return data

    @property
    def toy_kind(self) -> str | None:
        """'toy' or 'toy-video' when the teacher is an embedded toy, else None."""
        return self.teacher.uri if self.teacher.uri in TOY_TEACHERS else None

    @model_validator(mode="after")
    def _cross_checks(self):
        s = self.student
        if s.step_set is not None:
            if not s.step_set or any(k < 1 for k in s.step_set) or len(set(s.step_set)) != len(s.step_set):
                raise ValueError(f"student.step_set must be distinct step counts >= 1, got {s.step_set}")
            if s.num_steps not in s.step_set:
                raise ValueError(f"student.num_steps ({s.num_steps}) must be one of student.step_set {s.step_set}")
        if s.step_probs is not None:
            if s.step_set is None or len(s.step_probs) != len(s.step_set):
                raise ValueError("student.step_probs needs student.step_set of the same length")
            if any(p < 0 for p in s.step_probs) or sum(s.step_probs) <= 0:
                raise ValueError(f"student.step_probs must be non-negative with a positive sum, got {s.step_probs}")
        if isinstance(s.timesteps, list) and s.unify:
            raise ValueError("student.timesteps: with student.step_set give a mapping {K: grid}, e.g. "
                             "'{\"2\": [999, 399]}'")
        for k, grid in s.explicit_grids.items():
            if k not in s.steps:
                raise ValueError(f"student.timesteps: K={k} is not a trained step count {s.steps}")
            problem = grid_problem(grid, k)
            if problem:
                raise ValueError(f"student.timesteps {problem}")
        t = self.train
        if t.batch_size % (t.num_workers * t.grad_accum_steps):
            raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by train.num_workers x "
                             f"train.grad_accum_steps ({t.num_workers} x {t.grad_accum_steps})")
        if t.mixed_precision != "no" and not t.use_gpu:
            raise ValueError(f"train.mixed_precision={t.mixed_precision} needs train.use_gpu (CPU runs in fp32)")
        if t.strategy == "fsdp" and t.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision=fp16 is not supported with train.strategy fsdp (its loss scaler "
                             "does not handle sharded gradients); use bf16")
        if t.fsdp_cpu_offload and (t.strategy != "fsdp" or not t.use_gpu):
            raise ValueError("train.fsdp_cpu_offload needs train.strategy fsdp and train.use_gpu (it keeps GPU "
                             "shards in host memory; a CPU run has them there already)")
        if t.gradient_checkpointing_every > 1 and not t.gradient_checkpointing:
            raise ValueError("train.gradient_checkpointing_every needs train.gradient_checkpointing true")
        if self.data.prompts is not None and not [p for p in self.data.prompts if p.strip()]:
            raise ValueError("data.prompts is empty")
        if self.data.prompts is not None and self.data.prompt_source is not None:
            raise ValueError("give data.prompts or data.prompt_source, not both")
        if self.toy_kind is None and self.eval.enabled and self.eval.clip_model is None:
            raise ValueError("eval.clip_model is required to evaluate a non-toy teacher (a CLIP model hub id or "
                             "directory), or set eval.enabled false")
        if self.toy_kind is not None and self.video.overrides():
            raise ValueError(f"video.{next(iter(self.video.overrides()))}: the embedded toys have a fixed geometry "
                             f"(toy-video: 5 frames of 16x16); leave video.* unset")
        if self.eval.student_steps is not None and any(k < 1 for k in self.eval.student_steps):
            raise ValueError(f"eval.student_steps must be >= 1, got {self.eval.student_steps}")
        return self

    @property
    def eval_student_steps(self) -> list[int]:
        steps = self.eval.student_steps or [1, 2, self.student.num_steps]
        return sorted(set(steps))

    def to_flat_dict(self) -> dict[str, Any]:
        """{'section.field': value} for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(data: dict | None = None) -> TDMConfig:
    """Validate a nested dict into a TDMConfig; raises ConfigError naming the field."""
    try:
        return TDMConfig.model_validate(data or {})
    except ValidationError as e:
        teacher = (data or {}).get("teacher")
        bad = teacher_uri_problem(teacher.get("uri") if isinstance(teacher, dict) else None)
        if bad:  # the most basic error first: a teacher that cannot exist, before a missing option
            raise ConfigError(f"teacher.uri: {bad}") from None
        raise ConfigError(validation_message(e, "config key")) from None


#: a Hugging Face hub id: org/name
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(uri: str) -> bool:
    """Whether a teacher.uri that is not an existing path names a hub model (org/name) rather than a path."""
    return bool(HUB_ID.match(uri)) and not uri.startswith((".", "/", "~"))


#: models:/<name>@<alias> or models:/<name>/<version>
REGISTRY_URI = re.compile(r"^models:/[^/@]+(@[^/@]+|/\d+)$")
#: a URI scheme (s3:, http:, gs:, ...) at the start of a location
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def teacher_uri_problem(uri: object) -> str | None:
    """What is wrong with teacher.uri on its face, before anything is read: a registry URI or s3:// location
    that is malformed, an unsupported scheme, or a local path (not a toy or hub id) that does not exist:
    what tdm.teacher.resolve_teacher would refuse first. None when it may be resolved."""
    from pathlib import Path

    if not isinstance(uri, str) or uri in TOY_TEACHERS:
        return None
    if uri.startswith("models:/"):
        return None if REGISTRY_URI.match(uri) else \
            f"{uri!r} is not models:/<name>@<alias> or models:/<name>/<version>"
    if uri.startswith("s3://"):
        return None if uri.removeprefix("s3://").split("/", 1)[0] else f"{uri!r} names no bucket (s3://bucket/prefix)"
    if SCHEME.match(uri) and not Path(uri).expanduser().exists():
        return f"{uri!r}: only a toy, a local directory, a hub id, s3://bucket/prefix and models:/ are supported"
    if not is_hub_id(uri) and not Path(uri).expanduser().exists():
        return f"path does not exist: {uri}"
    return None
