"""The distillation job, end to end (what `pipelines/distill.py` calls; docs/architecture.md):

  preflight (config, teacher identity, prompts, storage, grids) -> Ray (the toy teacher on first use)
  -> the MLflow run this job owns (found again by name: resume) -> Ray Train TDM workers (WorkerSpec)
  -> export + evaluate in a Ray task -> register the student -> alias `champion` if the gate passes.

Every input check happens before any training starts. The config is validated once, here, and
crosses to workers and tasks as the typed object; the teacher is resolved once, here, to the identity
every process loads (tdm.teacher).
"""
from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import TDMConfig, flatten, load_config
from .console import log, sync_marker, sync_token, wait_for_sync
from .errors import ConfigError, InputError, TeacherChangedError
from .spec import ModelSpec, TeacherRef, WorkerSpec

TEACHER_TAG = "tdm.teacher"                 # the run's pinned teacher location
TEACHER_IDENTITY_TAG = "tdm.teacher_identity"   # the whole TeacherRef, JSON


@dataclass(frozen=True)
class ExportResult:
    """What the export-and-evaluate task hands back to the driver."""

    spec: ModelSpec
    step: int
    model_uri: str
    evaluation: dict | None     # {"rows": {name: row dict}, "passed", "gate", "columns"}; None: not evaluated


# ---------------------------------------------------------------- the job

def distill(cfg: TDMConfig) -> dict:
    """Run a distillation end to end; returns a summary (run id, model version, table, gate)."""
    from .cluster import check_placement, init_ray, worker_cpus
    from .paths import runs_dir
    from .preflight import (
        check_grids,
        check_run_checkpoints,
        check_storage,
        check_teacher_guidance,
        check_tracking_server,
        check_video,
        memory_plan,
        run_prompts,
        teacher_pipeline_class,
        teacher_scheduler_config,
    )
    from .teacher import resolve_teacher
    from .tracking import use_tracking_uri

    # 1. everything that can be checked without Ray
    if cfg.name is None:
        cfg = cfg.model_copy(update={"name": time.strftime("tdm-%Y%m%d-%H%M%S")})
    tracking_uri = use_tracking_uri()
    check_tracking_server(tracking_uri)
    teacher = None if cfg.toy_kind else resolve_teacher(cfg.teacher.uri)
    prompts = run_prompts(cfg)
    storage = check_storage(cfg.train.storage_path or str(runs_dir()))
    check_run_checkpoints(storage, cfg.name)
    pipeline_class = teacher_pipeline_class(teacher, tracking_uri)
    check_grids(cfg, teacher_scheduler_config(teacher, tracking_uri, cfg.toy_kind), pipeline_class)
    check_video(cfg, teacher, pipeline_class, tracking_uri)
    check_teacher_guidance(cfg, teacher, pipeline_class, tracking_uri)
    if cfg.train.gpu_memory_gb is not None:
        memory_plan(cfg, teacher, tracking_uri)   # refuses a plan that cannot fit, naming what to change
    log(f"run {cfg.name}: MLflow {tracking_uri}, checkpoints {storage}/{cfg.name}")

    # 2. Ray, and the toy teacher on first use
    local = init_ray(cfg)
    cpus = worker_cpus(cfg, local)
    check_placement(cfg, cpus)
    if teacher is None:  # cfg.toy_kind: an embedded toy
        from .toy.lifecycle import ensure_toy_teacher

        teacher = resolve_teacher(ensure_toy_teacher(cfg, tracking_uri, cpus * cfg.train.num_workers))
    log(f"teacher: {teacher.key}")

    # 3. the MLflow run this job owns; a second invocation with the same name appends to it
    run_id = _own_run(cfg, teacher, storage)
    with _fail_run_on_error(run_id, tracking_uri):
        ws = WorkerSpec(config=cfg, teacher=teacher, prompts=prompts, tracking_uri=tracking_uri, run_id=run_id,
                        storage=storage)
        deliver_backlog(ws.run_dir, run_id, tracking_uri, "before training")
        checkpoint = _train(ws, cpus)
        # the workers' tracking writes the server did not take (an outage past train.tracking_grace_s) are
        # sent now, or the job stops here, before registering, with the checkpoints kept
        deliver_backlog(ws.run_dir, run_id, tracking_uri, "after training")
        # 4. evaluate + export on a worker-sized task, then register and gate in the driver
        return evaluate_and_register(cfg, checkpoint, teacher, tracking_uri, run_id,
                                     num_cpus=cpus * cfg.train.num_workers)


@contextmanager
def _fail_run_on_error(run_id: str, tracking_uri: str):
    """Every failure after the run exists marks it FAILED, with the reason in tag tdm.failure; an error
    that is the tracking server's (it stopped answering) becomes ServiceUnavailableError, one line."""
    from .errors import ServiceUnavailableError, TDMError, first_line, redact
    from .preflight import tracking_problem

    try:
        yield
    except BaseException as exc:
        if isinstance(exc, ServiceUnavailableError):   # the server is down: nothing to mark now
            log(f"could not mark MLflow run {run_id} FAILED: the tracking server does not answer")
            raise
        # was it the tracking server? (/health answers within seconds)
        down = None if isinstance(exc, TDMError) or not isinstance(exc, Exception) else tracking_problem(tracking_uri)
        if down is None:
            reason = "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else redact(first_line(exc))
            try:
                import mlflow

                client = mlflow.MlflowClient(tracking_uri)
                client.set_tag(run_id, "tdm.failure", reason[:5000])
                client.set_terminated(run_id, status="FAILED")
            except Exception as e:  # noqa: BLE001 - it stopped answering just now
                down = redact(first_line(e))
            else:
                raise
        # the next invocation of the command sets the run's status again
        log(f"could not mark MLflow run {run_id} FAILED ({down})")
        if isinstance(exc, TDMError) or not isinstance(exc, Exception):
            raise
        raise ServiceUnavailableError(f"MLFLOW_TRACKING_URI: {down}, after the training started; the checkpoints "
                                      f"are kept: run the same command again when it answers, to resume and "
                                      f"register") from None


def deliver_backlog(run_dir: str, run_id: str, tracking_uri: str, when: str) -> None:
    """Send the tracking writes a training worker saved next to the checkpoints (tdm.outbox) into the run;
    ServiceUnavailableError (the checkpoints and the backlog kept) when the server does not answer."""
    from mlflow import MlflowClient

    from .errors import ServiceUnavailableError
    from .outbox import backlog_files, replay
    from .preflight import tracking_problem

    files = backlog_files(run_dir)
    if not files:
        return
    problem = tracking_problem(tracking_uri)
    if problem is not None:
        raise ServiceUnavailableError(f"MLFLOW_TRACKING_URI: {problem}; training finished, its checkpoints and "
                                      f"{len(files)} file(s) of unsent tracking writes are kept in {run_dir}: run "
                                      f"the same command again when it answers, to send them and register")
    n = replay(MlflowClient(tracking_uri), run_id, run_dir)
    log(f"sent {n} tracking writes saved while MLflow was unreachable ({when})")


def _own_run(cfg: TDMConfig, teacher: TeacherRef, storage: str) -> str:
    """The id of the run named cfg.name: created (with its config and teacher) or, on resume, checked
    against this invocation and set RUNNING again (system metrics need it)."""
    import mlflow
    from mlflow.entities import Param

    from .tracking import code_version, find_run, get_or_create_experiment

    client = mlflow.MlflowClient()
    exp_id = get_or_create_experiment(cfg.registry.experiment)
    existing = find_run(exp_id, cfg.name)
    if existing is not None:
        check_resume(existing, cfg, teacher)
        client.update_run(existing.info.run_id, status="RUNNING")
        log(f"resuming run {cfg.name} (MLflow run {existing.info.run_id})")
        return existing.info.run_id
    run = client.create_run(exp_id, run_name=cfg.name, tags={
        "tdm.run_name": cfg.name, "tdm.version": __version__, "tdm.code_version": code_version(),
        TEACHER_TAG: teacher.location, TEACHER_IDENTITY_TAG: teacher.model_dump_json(),
        "tdm.storage": f"{storage}/{cfg.name}"})
    with _fail_run_on_error(run.info.run_id, mlflow.get_tracking_uri()):
        # config.json is the record (check_resume reads it); params are for the UI's search and columns
        client.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "config.json")
        params = [Param(k, param_value(v)) for k, v in cfg.to_flat_dict().items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per call
            client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


#: MLflow's limit on a param's value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_PARAM_CHARS = 6000


def param_value(value) -> str:
    """A config value as an MLflow param: its text, cut to MLflow's limit with a marker saying how much is
    left out (a long prompt list; the whole config is the run's config.json)."""
    text = str(value)
    if len(text) <= MAX_PARAM_CHARS:
        return text
    marker = "... [{} more characters: see config.json]"
    keep = MAX_PARAM_CHARS - len(marker.format(len(text)))
    return text[:keep] + marker.format(len(text) - keep)


#: what a resume may change besides train.max_steps: the worker group (a checkpoint holds the whole state, or
#: shards that DCP redistributes, tdm.sharding); the global batch and the rest of the maths stay as started
RESOURCE_KEYS = ("train.num_workers", "train.cpus_per_worker")


def check_resume(run, cfg: TDMConfig, teacher: TeacherRef) -> None:
    """A resumed run keeps its config (train.max_steps may grow) and its teacher's identity."""
    import mlflow

    tags = run.data.tags
    if TEACHER_IDENTITY_TAG in tags:
        started = TeacherRef.model_validate_json(tags[TEACHER_IDENTITY_TAG])
        changed = not started.same_as(teacher)
    else:  # runs of tdm 0.1.0 recorded the location only
        started_at = tags.get(TEACHER_TAG)
        changed = started_at is not None and started_at not in (teacher.uri, teacher.location)
        started = TeacherRef(kind=teacher.kind, uri=str(started_at), location=str(started_at), revision=None)
    if changed:
        raise TeacherChangedError(f"teacher.uri: run '{cfg.name}' was started with teacher {started.key}, but "
                                  f"{teacher.uri} now resolves to {teacher.key}; use a new --name to distil the new "
                                  f"teacher")
    try:
        logged = load_config(mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/config.json"))
    except ConfigError as e:
        raise ConfigError(f"name: run '{cfg.name}' was started with a config this tdm cannot read ({e}); use a new "
                          f"--name") from None
    before, now = flatten(logged.model_dump(mode="json")), cfg.to_flat_dict()
    old_steps = int(before.get("train.max_steps", cfg.train.max_steps))
    if cfg.train.max_steps < old_steps:
        raise ConfigError(f"train.max_steps: run '{cfg.name}' was started with {old_steps}; a resume may raise it, "
                          f"not lower it (got {cfg.train.max_steps}); register an earlier checkpoint with "
                          f"pipelines/register.py --checkpoint instead")
    if cfg.train.max_steps > old_steps:
        log(max_steps_change(old_steps, cfg.train.max_steps, cfg.optim.lr_schedule, cfg.optim.warmup_steps))
    for key in RESOURCE_KEYS:
        if key in before and before[key] != now.get(key):
            log(f"resuming on {key}={now.get(key)} (started with {before[key]}): the checkpoint is loaded onto the new "
                f"worker group (resharded under train.strategy fsdp)")
    for key, value in now.items():
        if key not in ("train.max_steps", "name", *RESOURCE_KEYS) and before.get(key) != value:
            raise ConfigError(f"{key}: run '{cfg.name}' was started with {before.get(key)}, got {value}; "
                              f"use a new --name to change the config")


def max_steps_change(old: int, new: int, schedule: str, warmup_steps: int) -> str:
    """What raising train.max_steps from `old` to `new` on resume does to the learning rate. The rule (README,
    "Resuming"): the LR is a function of the step and the *current* max_steps (tdm.train.lr_factor), so the
    steps already trained keep the LR they had, and the rest follow the curve over `new` steps; a cosine
    schedule therefore jumps up at the resume step, from its value on the old curve to its value on the new."""
    from .train import lr_factor

    if schedule != "cosine":
        return f"train.max_steps {old} -> {new}: the {schedule} LR schedule is unchanged; training continues to {new}"
    at = old - 1   # the last step the old curve scheduled
    return (f"train.max_steps {old} -> {new}: the cosine LR schedule now decays to 0 at step {new}; at step {old} "
            f"the LR factor is {lr_factor(at, warmup_steps, new, schedule):.4f} on the new curve (it was "
            f"{lr_factor(at, warmup_steps, old, schedule):.4f} on the old one)")


def _worker_input_error(e: BaseException):
    """The TDMError a training worker raised, if that is why Ray Train failed (WorkerGroupError)."""
    from .errors import TDMError

    for failure in getattr(e, "worker_failures", {}).values():
        seen = failure
        while seen is not None:
            if isinstance(seen, TDMError):
                return seen
            seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def _train(ws: WorkerSpec, cpus: float):
    """Ray Train over ws.config.train.num_workers workers; returns the final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train import train_loop_per_worker

    t = ws.config.train
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"spec": ws},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if t.use_gpu else {})},
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(name=ws.config.name, storage_path=ws.storage,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints)))
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        refused = _worker_input_error(e)
        if refused is not None:   # a worker refused the run (a changed teacher, diverged training): one line
            raise type(refused)(str(refused)) from None
        raise
    log(f"training finished in {time.perf_counter() - t0:.0f}s; final checkpoint {result.checkpoint.path}")
    return result.checkpoint


# ---------------------------------------------------------------- export, evaluation, registration

def _export_and_evaluate(cfg: TDMConfig, checkpoint, teacher: TeacherRef, tracking_uri: str,
                         run_id: str, sync: str | None = None) -> ExportResult:
    """(Ray task) Load the final checkpoint, export the student, log it as a pyfunc model, evaluate it
    against the teacher (tdm.evaluation) and log the results into the run. Its output ends with the driver's
    `sync` marker (tdm.console.sync_marker)."""
    try:
        return _export_and_evaluate_in_task(cfg, checkpoint, teacher, tracking_uri, run_id)
    finally:
        sync_marker(sync)


def _export_and_evaluate_in_task(cfg: TDMConfig, checkpoint, teacher: TeacherRef, tracking_uri: str,
                                 run_id: str) -> ExportResult:
    import mlflow

    from .backbones import load_backbone
    from .generation import TDMPipeline
    from .spec import teacher_spec
    from .teacher import teacher_dir
    from .tracking import log_evaluation, log_pipeline_model, use_tracking_uri
    from .train import load_state_file, student_from_state

    use_tracking_uri(tracking_uri)
    backbone = load_backbone(teacher_dir(teacher, tracking_uri), video=cfg.video.overrides())
    with checkpoint.as_directory() as d:
        saved = load_state_file(d)
        denoiser = student_from_state(cfg, backbone, saved, d)
    spec = ModelSpec.parse(saved["spec"], "checkpoint spec")
    student = TDMPipeline(backbone, spec, denoiser=denoiser)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        student.save_pretrained(tmp)
        model_uri = log_pipeline_model(tmp, spec).model_uri
        if not cfg.eval.enabled:
            return ExportResult(spec, saved["step"], model_uri, None)
        # the teacher shares the student's backbone (a LoRA student's base with its adapters off)
        teacher_pipe = TDMPipeline(backbone, teacher_spec(backbone, cfg.eval.teacher_steps, cfg.loss.guidance_scale,
                                                          cfg.teacher.negative_prompt, cfg.loss.teacher_guidance))
        result = _evaluate(cfg, student, teacher_pipe, teacher)
        log_evaluation(result, saved["step"], fps=spec.fps or 8.0)
    return ExportResult(spec, saved["step"], model_uri, {
        "rows": {k: r.to_dict() for k, r in result.rows.items()}, "passed": result.passed, "gate": result.gate,
        "columns": [(m.key, m.header, m.fmt) for m in result.evaluator.metrics]})


def _evaluate(cfg: TDMConfig, student, teacher_pipe, teacher: TeacherRef):
    """The toys' classifier metrics, or CLIP metrics on the training prompts for a real teacher (per frame
    for a video teacher)."""
    from .evaluation import Evaluator, evaluation_plan, run_evaluation
    from .paths import cache_dir

    e = cfg.eval
    if cfg.toy_kind == "toy":
        from .evaluation.toy import DigitEvaluator, eval_prompts

        evaluator: Evaluator = DigitEvaluator(cfg.toy.holdout_fraction, cfg.toy.seed)
        prompts = eval_prompts(e.num_samples)
    elif cfg.toy_kind == "toy-video":
        from .evaluation.toy_video import MotionEvaluator, video_eval_prompts

        toy = cfg.toy_video
        evaluator = MotionEvaluator(toy.holdout_fraction, toy.seed, toy.classifier_epochs)
        prompts = video_eval_prompts(e.num_samples)
    else:
        from .evaluation.clip import ClipEvaluator, VideoClipEvaluator
        from .preflight import run_prompts

        kind = ClipEvaluator if student.spec.frames is None else VideoClipEvaluator
        evaluator = kind(e.clip_model, device=next(student.denoiser.parameters()).device)
        train_prompts = run_prompts(cfg)
        prompts = [train_prompts[i % len(train_prompts)] for i in range(e.num_samples)]
    return run_evaluation(evaluation_plan(cfg), {"teacher": teacher_pipe, "student": student}, evaluator, prompts,
                          e.seed, e.batch_size, cfg.student.num_steps, cfg.gate, cache_dir=cache_dir("eval"),
                          teacher_key=teacher.key)


def evaluate_and_register(cfg: TDMConfig, checkpoint, teacher: TeacherRef, tracking_uri: str, run_id: str,
                          num_cpus: float) -> dict:
    """Export and evaluate a checkpoint (a Ray task sized like the training job), register it as a
    version of cfg.registry.model_name linked to `run_id`, and move the alias only if the gate passes."""
    import ray
    from mlflow import MlflowClient

    from .tracking import register, registered_from, run_url

    url = run_url(tracking_uri, MlflowClient().get_run(run_id).info.experiment_id, run_id)
    # at most one version per checkpoint: a finished command run again (or a RayJob retry) registers
    # nothing new and leaves the alias where it is
    done = registered_from(cfg.registry.model_name, run_id, checkpoint.path)
    if done is not None:
        MlflowClient().set_terminated(run_id, status="FINISHED")
        passed = done.tags.get("gate.passed") == "True"
        log(f"{cfg.registry.model_name} version {done.version} was already registered from this checkpoint "
            f"(step {done.tags.get('step')}, gate {'passed' if passed else 'not passed'}); nothing registered, "
            f"alias {cfg.registry.alias} unchanged")
        return {"run_name": cfg.name, "run_id": run_id, "run_url": url, "model_version": done.version,
                "passed": passed,
                "rows": {}, "gate": {}, "columns": [], "step": int(done.tags.get("step", 0)),
                "already_registered": True}
    task = ray.remote(num_cpus=num_cpus, num_gpus=1 if cfg.train.use_gpu else 0)(_export_and_evaluate)
    sync = sync_token()
    try:
        out: ExportResult = ray.get(task.remote(cfg, checkpoint, teacher, tracking_uri, run_id, sync))
    except Exception:   # (Ctrl-C stops at once)
        wait_for_sync(sync, timeout_s=3.0)   # a task that died never sends its marker
        raise
    wait_for_sync(sync)   # the task's last lines are printed before anything of the driver's
    ev = out.evaluation or {}
    passed = bool(ev.get("passed", False))
    tags = {**out.spec.registry_tags(), "tdm_version": __version__, "run_name": cfg.name, "run_id": run_id,
            "step": out.step, "checkpoint": checkpoint.path}
    tags |= {k.replace("/", "."): round(v, 4) for k, v in ev.get("gate", {}).items()}
    tags["gate.passed"] = passed
    mv = register(out.model_uri, cfg.registry.model_name, tags, alias=cfg.registry.alias if passed else None)
    log(f"registered {cfg.registry.model_name} version {mv.version} (step {out.step}); gate "
        f"{'PASSED -> alias ' + cfg.registry.alias if passed else 'not passed (no alias)'}")
    return {"run_name": cfg.name, "run_id": run_id, "run_url": url, "model_version": mv.version, "passed": passed,
            "rows": ev.get("rows", {}), "gate": ev.get("gate", {}), "columns": ev.get("columns", []),
            "step": out.step}


def register_checkpoint(uri: str, configure=None) -> dict:
    """Evaluate and register any checkpoint (local path or s3://...) of an earlier run, into that run.
    `configure(base_dict) -> TDMConfig` lets the command line override the run's own config."""
    import json

    import pyarrow.fs
    from ray.train import Checkpoint

    from .cluster import init_ray, worker_cpus
    from .statefile import check_checkpoint_dir
    from .teacher import resolve_teacher
    from .tracking import find_run, get_or_create_experiment, use_tracking_uri
    from .train import META_FILE

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).expanduser().resolve()))
        check_checkpoint_dir(fs, path, "--checkpoint")
        with fs.open_input_stream(f"{path}/{META_FILE}") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as e:
        if isinstance(e, InputError):  # a refused checkpoint (a pickle): its own message
            raise
        raise ConfigError(f"--checkpoint: {uri} is not a readable tdm checkpoint ({e})") from None
    cfg = configure(meta["config"]) if configure is not None else load_config(meta["config"])
    tracking_uri = use_tracking_uri()
    run = find_run(get_or_create_experiment(cfg.registry.experiment), cfg.name)
    if run is None:
        raise ConfigError(f"--checkpoint: no MLflow run named {cfg.name!r} in experiment {cfg.registry.experiment!r}")
    if meta.get("teacher") is not None:
        teacher = TeacherRef.model_validate(meta["teacher"])
    else:  # tdm 0.1.0 checkpoints recorded the teacher's location only: pin it now
        teacher = resolve_teacher(meta["teacher_source"])
    local = init_ray(cfg)
    return evaluate_and_register(cfg, Checkpoint(path, filesystem=fs), teacher, tracking_uri, run.info.run_id,
                                 num_cpus=worker_cpus(cfg, local) * cfg.train.num_workers)
