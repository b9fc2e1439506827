"""Every check that can run before Ray starts or anything is created in MLflow, so a bad input fails
in seconds with one line naming its field (tdm.errors.ConfigError), never after training.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import SCHEME, TDMConfig, embedded_guidance_refused
from .errors import ConfigError, first_line, redact
from .spec import TeacherRef


def run_prompts(cfg: TDMConfig) -> list[str]:
    """The training prompts; errors name data.prompts / data.prompt_source."""
    from .sources import load_prompts

    if cfg.data.prompt_source:
        return load_prompts(cfg.data.prompt_source, cfg.data.prompt_column, "data.prompt_source", cfg.data.max_prompts)
    if cfg.data.prompts is not None:
        return [p for p in cfg.data.prompts if p.strip()][:cfg.data.max_prompts]
    if cfg.toy_kind is not None:
        from .toy.lifecycle import toy_prompts

        return toy_prompts(cfg.toy_kind)
    raise ConfigError("data.prompts or data.prompt_source is required for a non-toy teacher")


def teacher_scheduler_config(teacher: TeacherRef | None, tracking_uri: str | None = None,
                             toy_kind: str | None = None) -> dict:
    """The teacher's diffusers scheduler config (None: the embedded toy `toy_kind`'s). A hub teacher is asked
    for that one file at its pinned commit; the others are materialised (downloaded once per node) and read."""
    from diffusers import DDPMScheduler

    from .teacher import teacher_dir
    from .toy.lifecycle import toy_scheduler_config

    if teacher is None:
        return toy_scheduler_config(toy_kind or "toy")
    try:
        if teacher.kind == "hub":
            from huggingface_hub import constants

            return dict(DDPMScheduler.load_config(teacher.location, subfolder="scheduler", revision=teacher.revision,
                                                  cache_dir=constants.HF_HUB_CACHE,
                                                  local_files_only=constants.HF_HUB_OFFLINE))
        return dict(DDPMScheduler.load_config(teacher_dir(teacher, tracking_uri), subfolder="scheduler"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.uri: {teacher.location} has no readable scheduler/ config "
                          f"({first_line(e)})") from None


def teacher_pipeline_class(teacher: TeacherRef | None, tracking_uri: str | None = None) -> str | None:
    """The `_class_name` of the teacher's model_index.json (None: the embedded toy), read like its scheduler;
    InputError naming teacher.uri when no adapter (tdm.backbones.ADAPTERS) supports it."""
    if teacher is None:
        return None
    from .backbones import adapter_for

    index = teacher_model_index(teacher, tracking_uri)
    adapter_for(index)   # a pipeline class without an adapter: refused here, not inside every worker
    return index.get("_class_name")


def teacher_location(teacher: TeacherRef, tracking_uri: str | None = None) -> str:
    """Where the teacher's files are read from: a hub id (config files only are fetched) or a local directory
    (a registry or S3 teacher is materialised once per node)."""
    from .teacher import teacher_dir

    return teacher.location if teacher.kind == "hub" else str(teacher_dir(teacher, tracking_uri))


def teacher_model_index(teacher: TeacherRef, tracking_uri: str | None = None) -> dict:
    """The teacher's model_index.json; ConfigError naming teacher.uri when it cannot be read."""
    from diffusers import DiffusionPipeline

    try:
        if teacher.kind == "hub":
            from huggingface_hub import constants

            return dict(DiffusionPipeline.load_config(teacher.location, revision=teacher.revision,
                                                      cache_dir=constants.HF_HUB_CACHE,
                                                      local_files_only=constants.HF_HUB_OFFLINE))
        return dict(DiffusionPipeline.load_config(teacher_location(teacher, tracking_uri)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.uri: {teacher.location} has no readable model_index.json "
                          f"({first_line(e)})") from None


def memory_plan(cfg: TDMConfig, teacher: TeacherRef | None, tracking_uri: str | None = None, check: bool = True):
    """The per-worker tdm.plan.MemoryPlan of `cfg` (teacher None: the embedded toy, planned from its builder)
    and, when train.gpu_memory_gb is set, ConfigError naming it if the plan does not fit, with the single
    changes that would."""
    from .plan import GIB, config_tokens, fitting_changes, meta_network, plan_config, size

    if teacher is None:
        from .toy.lifecycle import toy_network
        net, latent = toy_network(cfg)
    else:
        net = meta_network(teacher_location(teacher, tracking_uri), teacher_model_index(teacher, tracking_uri))
        latent = config_tokens(net)
    plan = plan_config(cfg, net, latent)
    budget = cfg.train.gpu_memory_gb
    if check and budget is not None and plan.total > budget * GIB:
        fixes = fitting_changes(cfg, net, latent, budget * GIB)
        raise ConfigError(f"train.gpu_memory_gb: this plan needs {size(plan.total)} per worker, "
                          f"{budget:g} GiB given; " + (f"fits with {', or '.join(fixes)}" if fixes else
                                                       "no single change fits: combine --train.strategy fsdp with "
                                                       "more workers, LoRA and checkpointing") +
                          " (pipelines/distill.py --plan prints the estimate)")
    return plan


def check_video(cfg: TDMConfig, teacher: TeacherRef | None, pipeline_class: str | None,
                tracking_uri: str | None = None) -> None:
    """A video teacher's geometry (video.* over what its directory records over its family's default) must
    be one its VAE and patch size can make; an image teacher takes no video.*. Read from configs only."""
    import json

    from .backbones import ADAPTERS, VideoBackbone
    from .backbones.video import recorded_shape
    from .teacher import teacher_dir

    video = cfg.video.overrides()
    adapter = ADAPTERS.get(pipeline_class or "")
    if teacher is None or adapter is None:
        return  # the toys (their geometry is fixed: TDMConfig refuses video.*), or load_backbone's own error
    if not issubclass(adapter, VideoBackbone):
        if video:
            raise ConfigError(f"video.{next(iter(video))}: the teacher ({pipeline_class}) is an image model; leave "
                              f"video.* unset")
        return

    def read_config(sub: str):
        return teacher_component_config(teacher, sub, tracking_uri)
    if teacher.kind == "hub":
        index, recorded = {"_class_name": pipeline_class}, None
    else:
        root = Path(teacher_dir(teacher, tracking_uri))
        index = json.loads((root / "model_index.json").read_text())
        recorded = recorded_shape(root, index)
    if read_config("transformer") is None:
        raise ConfigError(f"teacher.uri: {teacher.location} has no readable transformer/config.json")
    adapter.check_shape(read_config, index, video, recorded)


def check_teacher_guidance(cfg: TDMConfig, teacher: TeacherRef | None, pipeline_class: str | None,
                           tracking_uri: str | None = None) -> None:
    """loss.teacher_guidance embedded needs a guidance-distilled network (transformer config
    `guidance_embeds`, e.g. FLUX.1-dev), read from configs only (tdm.train.check_teacher_guidance checks the
    loaded network again)."""
    if cfg.loss.teacher_guidance != "embedded":
        return
    config = teacher_component_config(teacher, "transformer", tracking_uri) if teacher is not None else None
    if not (config or {}).get("guidance_embeds"):
        raise embedded_guidance_refused(pipeline_class or "the toy")


def teacher_component_config(teacher: TeacherRef, sub: str, tracking_uri: str | None = None) -> dict | None:
    """A teacher component's config.json (`sub`: "transformer", "vae", ...) as a dict, read without loading
    weights (a hub teacher through the HF cache); None when the teacher has no such component."""
    import json

    from .teacher import teacher_dir

    if teacher.kind == "hub":
        from diffusers import ConfigMixin
        from huggingface_hub import constants

        try:
            return dict(ConfigMixin.load_config(teacher.location, subfolder=sub, revision=teacher.revision,
                                                cache_dir=constants.HF_HUB_CACHE,
                                                local_files_only=constants.HF_HUB_OFFLINE))
        except (OSError, ValueError):
            return None
    f = Path(teacher_dir(teacher, tracking_uri)) / sub / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def check_grids(cfg: TDMConfig, scheduler_config: dict, pipeline_class: str | None = None) -> None:
    """The student grids (laid out by the teacher pipeline's grid rule) must fit the teacher's schedule and
    the loss margins, and every evaluated sampler must fit the schedule."""
    from .backbones.base import grid_rule
    from .distiller import student_grids, validate_grids
    from .schedules import NoiseSchedule

    try:
        schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
        rule = grid_rule(pipeline_class, schedule.kind) if pipeline_class else "uniform"
        validate_grids(student_grids(cfg.student, schedule, rule), cfg.loss)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    top = schedule.max_timestep
    if cfg.eval.enabled and cfg.eval.teacher_steps > top:
        raise ConfigError(f"eval.teacher_steps: at most {top} for this teacher's schedule, "
                          f"got {cfg.eval.teacher_steps}")
    too_many = [k for k in cfg.eval_student_steps if k > top]
    if cfg.eval.enabled and too_many:
        raise ConfigError(f"eval.student_steps: at most {top} for this teacher's schedule, got {too_many}")


def check_storage(storage: str) -> str:
    """Resolve train.storage_path and prove it is writable, within seconds (no Ray hang on a bad endpoint)."""
    if storage.startswith("s3://"):
        import boto3
        from botocore.config import Config

        bucket, _, prefix = storage.removeprefix("s3://").partition("/")
        key = f"{prefix.rstrip('/')}/.tdm-write-check" if prefix else ".tdm-write-check"
        client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"ok")
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - botocore raises many types: endpoint, credentials, bucket, permission
            raise ConfigError(f"train.storage_path: cannot write to {storage}: {first_line(e)}") from None
        return storage
    if "://" in storage or SCHEME.match(storage):   # s3:/x or gs://x: a mistyped URI, never a local directory
        raise ConfigError(f"train.storage_path: only local paths and s3://bucket/prefix are supported, got {storage}")
    path = Path(storage).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tdm-write-check-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.storage_path: cannot write to {path}: {e.strerror or e}") from None
    return str(path)


def check_run_checkpoints(storage: str, name: str) -> None:
    """Before a resume: every checkpoint of run `name` under `storage` is in the pickle-free format
    (tdm.statefile), so the workers never meet a pickle; ConfigError naming the directory otherwise."""
    import pyarrow.fs

    from .statefile import check_checkpoint_dir

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else str(Path(storage).resolve()))
        found = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{name}", allow_not_found=True))
    except OSError as e:
        raise ConfigError(f"train.storage_path: cannot list {storage}/{name}: {first_line(e)}") from None
    for info in found:
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            check_checkpoint_dir(fs, info.path, "train.storage_path")


def tracking_problem(tracking_uri: str, local_store: bool = True) -> str | None:
    """Why the MLflow store at `tracking_uri` cannot be used now (a server that does not answer /health
    within seconds, or refuses this process's credentials), or None when it can. local_store=False: a local
    store (sqlite, file) is not opened (opening creates it)."""
    from mlflow import MlflowClient

    remote = tracking_uri.startswith(("http://", "https://"))
    if not remote and not local_store:
        return None
    if remote:
        import requests

        try:
            # /health is served without authentication by `mlflow server`, basic-auth included; it answers at
            # once, where an API call retries an unreachable server for minutes
            r = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=10)
        except requests.RequestException as e:
            return f"cannot reach the MLflow server at {redact(tracking_uri)} ({redact(first_line(e))})"
        if r.status_code != 200:
            return f"{redact(tracking_uri)}/health answered {r.status_code}, not 200"
    try:  # the store itself, with this process's credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN)
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MlflowException, RestException, requests errors, a bad sqlite path
        return f"MLflow at {redact(tracking_uri)} does not answer: {redact(first_line(e))}"
    return None


def check_tracking_server(tracking_uri: str) -> None:
    """The MLflow store answers before any work: an unreachable one must not read as "no toy teacher yet"
    (and train one), or fail after the training."""
    problem = tracking_problem(tracking_uri, local_store=False)   # a local store is created by its first use
    if problem is not None:
        raise ConfigError(f"MLFLOW_TRACKING_URI: {problem}")
