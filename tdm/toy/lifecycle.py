"""The embedded toy teachers' registry life cycle: the digits teacher (teacher.uri 'toy', settings toy.*)
and the moving-digits video teacher ('toy-video', settings toy_video.*) are trained and registered as
`<model_name>@champion` the first time a job needs them, then reused while their training settings stay
the same."""
from __future__ import annotations

import tempfile
import time

from .. import __version__
from ..config import TDMConfig, ToyConfig, ToyVideoConfig
from ..console import log

ToySettings = ToyConfig | ToyVideoConfig


def toy_settings(cfg: TDMConfig) -> ToySettings:
    """The training settings of the run's toy teacher (cfg.toy_kind must be set)."""
    return cfg.toy_video if cfg.toy_kind == "toy-video" else cfg.toy


def toy_prompts(kind: str) -> list[str]:
    """The captions a toy teacher was trained on: its default prompt set."""
    if kind == "toy-video":
        from .motion import VIDEO_CAPTIONS

        return list(VIDEO_CAPTIONS)
    from .data import CAPTIONS

    return list(CAPTIONS)


def toy_scheduler_config(kind: str) -> dict:
    """A toy teacher's diffusers scheduler config."""
    if kind == "toy-video":
        from .video_teacher import SCHEDULER_CONFIG as VIDEO

        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **VIDEO}
    from .teacher import SCHEDULER_CONFIG

    return dict(SCHEDULER_CONFIG)


def toy_network(cfg: TDMConfig):
    """(network, latent shape) of the run's toy teacher, randomly initialised from its settings: what the
    memory planner (tdm.plan) counts, without training the teacher."""
    toy = toy_settings(cfg)
    if isinstance(toy, ToyVideoConfig):
        from .video_teacher import build_toy_video_backbone

        backbone = build_toy_video_backbone(toy.seed, toy.heads, toy.layers, toy.patch, toy.head_dim, toy.patch_frames)
    else:
        from .teacher import build_toy_backbone

        backbone = build_toy_backbone(toy.seed, tuple(toy.channels))
    return backbone.network, tuple(backbone.latent_shape)


def toy_config_key(toy: ToySettings) -> str:
    """Identity of a toy teacher's training settings (all but the registry name, retrain and the evaluation
    classifier's epochs)."""
    return toy.model_dump_json(exclude={"model_name", "retrain", "classifier_epochs"})


def _train(toy: ToySettings, out_dir: str) -> dict:
    common = dict(train_steps=toy.train_steps, batch_size=toy.batch_size, lr=toy.lr, cfg_dropout=toy.cfg_dropout,
                  ema_decay=toy.ema_decay, holdout_fraction=toy.holdout_fraction, seed=toy.seed)
    if isinstance(toy, ToyVideoConfig):
        from .video_teacher import train_toy_video_teacher

        return train_toy_video_teacher(out_dir, heads=toy.heads, head_dim=toy.head_dim, patch=toy.patch,
                                       layers=toy.layers, patch_frames=toy.patch_frames, **common)
    from .teacher import train_toy_teacher

    return train_toy_teacher(out_dir, channels=tuple(toy.channels), **common)


def _train_and_register(toy: ToySettings, teacher_steps: int, guidance_scale: float, tracking_uri: str) -> str:
    """(Ray task) Train a toy teacher, log it as a pyfunc model, register it, set alias champion."""
    import mlflow

    from ..backbones import load_backbone
    from ..spec import teacher_spec
    from ..tracking import get_or_create_experiment, log_pipeline_model, register, use_tracking_uri

    use_tracking_uri(tracking_uri)
    exp = get_or_create_experiment(toy.model_name)
    prefix = "toy_video" if isinstance(toy, ToyVideoConfig) else "toy"
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=exp, run_name="toy-teacher") as run:
        mlflow.log_params({f"{prefix}.{k}": v for k, v in toy.model_dump(mode="json").items()})
        t0 = time.perf_counter()
        metrics = _train(toy, tmp)
        mlflow.log_metrics({**metrics, "train_seconds": time.perf_counter() - t0})
        spec = teacher_spec(load_backbone(tmp), num_steps=teacher_steps, guidance_scale=guidance_scale)
        spec.save(tmp)
        info = log_pipeline_model(tmp, spec)
        tags = {**spec.registry_tags(), "tdm_version": __version__, "toy_config": toy_config_key(toy),
                "holdout_fraction": toy.holdout_fraction, "seed": toy.seed, "run_id": run.info.run_id}
        mv = register(info.model_uri, toy.model_name, tags, alias="champion")
    return f"models:/{toy.model_name}/{mv.version}"


def ensure_toy_teacher(cfg: TDMConfig, tracking_uri: str, num_cpus: float) -> str:
    """models:/<model_name>/<version> of the run's toy teacher's champion, training and registering it (in
    a Ray task the size of the training job) on first use or when its settings changed."""
    import ray
    from mlflow.exceptions import MlflowException

    from ..tracking import resolve_model_version

    toy = toy_settings(cfg)
    if not toy.retrain:
        try:
            mv = resolve_model_version(f"models:/{toy.model_name}@champion")
            if mv.tags.get("toy_config") == toy_config_key(toy):
                log(f"toy teacher: reusing {toy.model_name} version {mv.version}")
                return f"models:/{toy.model_name}/{mv.version}"
            log(f"toy teacher: {toy.model_name}@champion was trained with other settings")
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise  # the registry failed (not "no such model"): never a reason to train a teacher again
    log(f"toy teacher: training {toy.model_name} ({toy.train_steps} steps; once, then reused)")
    task = ray.remote(num_cpus=num_cpus)(_train_and_register)
    return ray.get(task.remote(toy, cfg.eval.teacher_steps, cfg.loss.guidance_scale, tracking_uri))
