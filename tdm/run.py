"""The distillation job, end to end (what `pipelines/distill.py` calls):

  validate config and teacher -> (toy: train + register the teacher once) -> own an MLflow run
  -> Ray Train TDM workers (checkpoints, resume) -> evaluate + export in a Ray task
  -> register the student -> alias `champion` if the quality gate passes.

Every input check happens before any training starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .config import ConfigError, TDMConfig, _default_home

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def log(msg: str) -> None:
    print(f"[tdm] {msg}", flush=True)


# ---------------------------------------------------------------- validation before any work

def load_prompts(cfg: TDMConfig, teacher_is_toy: bool) -> list[str]:
    """The training prompts; errors name data.prompts / data.prompt_source."""
    from .sources import load_prompts as read_source

    if cfg.data.prompt_source:
        return read_source(cfg.data.prompt_source, cfg.data.prompt_column, "data.prompt_source", cfg.data.max_prompts)
    if cfg.data.prompts is not None:
        return [p for p in cfg.data.prompts if p.strip()][:cfg.data.max_prompts]
    if teacher_is_toy:
        from .toy.data import CAPTIONS

        return list(CAPTIONS)
    raise ConfigError("data.prompts or data.prompt_source is required for a non-toy teacher")


def check_teacher_source(uri: str) -> None:
    """Fail fast on a teacher that cannot exist: a missing local path or an unknown registered model."""
    if uri == "toy":
        return
    if uri.startswith("models:/"):
        from .tracking import resolve_model_version

        try:
            resolve_model_version(uri)
        except Exception as e:  # mlflow raises RestException / MlflowException with long texts
            raise ConfigError(f"teacher.uri: registered model {uri} not found ({str(e).splitlines()[0]})") from None
        return
    if uri.startswith("s3://"):
        from .sources import s3_client, split_s3_uri

        bucket, prefix = split_s3_uri(uri, "teacher.uri")
        try:
            s3_client().head_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/model_index.json".lstrip("/"))
        except Exception as e:  # botocore: endpoint, credentials, 404
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"teacher.uri: no diffusers pipeline at {uri} (model_index.json: {msg})") from None
        return
    path = Path(uri).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"teacher.uri: {path} is not a diffusers pipeline directory (no model_index.json)")
        return
    if not HUB_ID.match(uri) or uri.startswith((".", "/", "~")):
        raise ConfigError(f"teacher.uri: path does not exist: {uri}")


def check_grids(cfg: TDMConfig, teacher_dir: str | None) -> None:
    """The student grid must fit the teacher's schedule (None: the toy's) and the loss margins."""
    from diffusers import DDPMScheduler

    from .distiller import student_grids, validate_grids
    from .schedules import NoiseSchedule
    from .toy.teacher import SCHEDULER_CONFIG

    try:
        sched_cfg = SCHEDULER_CONFIG if teacher_dir is None else DDPMScheduler.load_config(teacher_dir,
                                                                                              subfolder="scheduler")
        schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
        validate_grids(student_grids(cfg.student, schedule), cfg.loss)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
        except Exception as e:  # botocore raises many types: endpoint, credentials, bucket, permission
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"train.storage_path: cannot write to {storage}: {msg}") from None
        return storage
    if "://" in storage:
        raise ConfigError(f"train.storage_path: only local paths and s3:// are supported, got {storage}")
    path = Path(storage).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tdm-write-check-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.storage_path: cannot write to {path}: {e.strerror or e}") from None
    return str(path)


# ---------------------------------------------------------------- Ray

def init_ray(cfg: TDMConfig) -> bool:
    """Connect to cfg.train.ray_address / $RAY_ADDRESS, or start a local instance. Returns True if local."""
    import ray

    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=os.cpu_count(), log_to_driver=True)
    return True


def worker_cpus(cfg: TDMConfig, local: bool) -> float:
    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    return max(1, (os.cpu_count() or 1) // cfg.train.num_workers) if local else 1


def check_placement(cfg: TDMConfig, cpus: float) -> None:
    """Refuse a worker group the cluster can never place (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu, need_gpu = cpus * cfg.train.num_workers, cfg.train.num_workers if cfg.train.use_gpu else 0
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise ConfigError(f"train.num_workers={cfg.train.num_workers} needs {need_cpu:g} CPUs and {need_gpu} GPUs; "
                          f"the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")


# ---------------------------------------------------------------- the toy teacher

def _train_and_register_toy(cfg_json: str, tracking_uri: str) -> str:
    """(Ray task) Train the toy teacher, log it as a pyfunc model, register it, set alias champion."""
    import mlflow

    from .backbones import load_backbone
    from .pipeline import teacher_spec, write_spec
    from .toy.teacher import train_toy_teacher
    from .tracking import get_or_create_experiment, log_pipeline_model, register, use_tracking_uri

    cfg = TDMConfig.model_validate_json(cfg_json)
    t = cfg.toy
    use_tracking_uri(tracking_uri)
    exp = get_or_create_experiment(t.model_name)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=exp, run_name="toy-teacher") as run:
        params = t.model_dump(mode="json")
        mlflow.log_params({f"toy.{k}": v for k, v in params.items()})
        t0 = time.perf_counter()
        metrics = train_toy_teacher(tmp, train_steps=t.train_steps, batch_size=t.batch_size, lr=t.lr,
                                    cfg_dropout=t.cfg_dropout, ema_decay=t.ema_decay,
                                    holdout_fraction=t.holdout_fraction, seed=t.seed, channels=tuple(t.channels))
        mlflow.log_metrics({**metrics, "train_seconds": time.perf_counter() - t0})
        backbone = load_backbone(tmp)
        spec = teacher_spec(backbone, num_steps=cfg.eval.teacher_steps, guidance_scale=cfg.loss.guidance_scale)
        write_spec(tmp, spec, backbone.family)
        info = log_pipeline_model(tmp, spec)
        mv = register(info.model_uri, t.model_name, {"tdm_version": __version__, "kind": "teacher",
                                                     "toy_config": toy_config_key(cfg),
                                                     "holdout_fraction": t.holdout_fraction, "seed": t.seed,
                                                     "run_id": run.info.run_id}, alias="champion")
    return f"models:/{t.model_name}/{mv.version}"


def toy_config_key(cfg: TDMConfig) -> str:
    """Identity of a toy teacher's training settings (toy.* except the registry name and retrain)."""
    return cfg.toy.model_dump_json(exclude={"model_name", "retrain"})


def ensure_toy_teacher(cfg: TDMConfig, tracking_uri: str, num_cpus: float) -> str:
    """models:/tdm-toy-teacher/<version> of the champion, training and registering it on first use."""
    import ray
    from mlflow.exceptions import MlflowException

    from .tracking import resolve_model_version

    if not cfg.toy.retrain:
        try:
            mv = resolve_model_version(f"models:/{cfg.toy.model_name}@champion")
            if mv.tags.get("toy_config") == toy_config_key(cfg):
                log(f"toy teacher: reusing {cfg.toy.model_name} version {mv.version}")
                return f"models:/{cfg.toy.model_name}/{mv.version}"
            log(f"toy teacher: {cfg.toy.model_name}@champion was trained with other toy.* settings")
        except MlflowException:
            pass
    log(f"toy teacher: training {cfg.toy.model_name} ({cfg.toy.train_steps} steps; once, then reused)")
    task = ray.remote(num_cpus=num_cpus)(_train_and_register_toy)
    return ray.get(task.remote(cfg.model_dump_json(), tracking_uri))


# ---------------------------------------------------------------- evaluation + export (a Ray task)

def _evaluate_and_export(cfg_json: str, checkpoint, teacher_source: str, tracking_uri: str, run_id: str) -> dict:
    """(Ray task) Load the final checkpoint, export the student pipeline, log it as a pyfunc model,
    evaluate student and teacher baselines, and log metrics, the table and sample grids."""
    import mlflow
    import pandas as pd

    from .backbones import load_backbone
    from .evaluate import DigitEvaluator, evaluate_pipeline, evaluate_teacher_cached, gate
    from .pipeline import TDMPipeline, image_grid
    from .train import load_state_file, student_from_state
    from .tracking import log_pipeline_model, resolve_teacher_dir, use_tracking_uri

    cfg = TDMConfig.model_validate_json(cfg_json)
    use_tracking_uri(tracking_uri)
    teacher_dir = resolve_teacher_dir(teacher_source, tracking_uri)
    backbone = load_backbone(teacher_dir)
    with checkpoint.as_directory() as d:
        saved = load_state_file(d)
    student = TDMPipeline(backbone, saved["spec"], denoiser=student_from_state(cfg, backbone, saved))
    out: dict = {"spec": saved["spec"], "step": saved["step"]}
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as tmp:
        student.save_pretrained(tmp)
        info = log_pipeline_model(tmp, saved["spec"])
        out["model_uri"] = info.model_uri
        if not cfg.eval.enabled:
            return out
        if cfg.teacher.uri != "toy":
            out.update(_evaluate_real_teacher(cfg, student, backbone, saved["step"]))
            return out
        evaluator = DigitEvaluator(cfg.toy.holdout_fraction, cfg.toy.seed)
        teacher = TDMPipeline.from_pretrained(teacher_dir)
        e, K, g = cfg.eval, cfg.student.num_steps, cfg.loss.guidance_scale
        common = dict(num_samples=e.num_samples, seed=e.seed, batch_size=e.batch_size)
        rows, grids = {}, {}
        # the weights themselves, not just the name: "models:/tdm-toy-teacher/1" of another registry (same
        # $TDM_HOME, other MLFLOW_TRACKING_URI) is another teacher
        unet = Path(teacher_dir) / "unet"
        weights = (unet / "diffusion_pytorch_model.safetensors").read_bytes()
        identity = {"source": teacher_source, **json.loads((unet / "config.json").read_text()),
                    "weights_sha256": hashlib.sha256(weights).hexdigest()}
        cache = _default_home() / "cache" / "eval"
        for name, steps in ((f"teacher@{e.teacher_steps}", e.teacher_steps), (f"teacher_ddim@{K}", K)):
            row, imgs, hit = evaluate_teacher_cached(teacher, evaluator, cache, identity, name=name, steps=steps,
                                                     guidance=g, **common)
            rows[name], grids[name] = row, imgs
            log(f"eval {name}: FID {row.fid:.2f}, adherence {row.adherence:.1f}%" + (" (cached)" if hit else ""))
        for k in cfg.eval_student_steps:
            name = f"student@{k}"
            if cfg.student.unify and k not in cfg.student.steps:
                continue
            rows[name], grids[name] = evaluate_pipeline(student, evaluator, name=name, steps=k, guidance=g, **common)
            log(f"eval {name}: FID {rows[name].fid:.2f}, adherence {rows[name].adherence:.1f}%")
        passed, gate_metrics = gate(rows, K, e.teacher_steps, cfg.gate)
        metrics = dict(gate_metrics)
        for name, r in rows.items():
            key = name.replace("@", "_k")
            metrics |= {f"eval/{key}/fid": r.fid, f"eval/{key}/adherence": r.adherence,
                        f"eval/{key}/latency_ms": r.latency_ms}
        mlflow.log_metrics(metrics, step=saved["step"])
        mlflow.log_table(pd.DataFrame([asdict(r) for r in rows.values()]), artifact_file="eval/table.json")
        for name, imgs in grids.items():
            mlflow.log_image(image_grid(imgs, nrow=10, scale=4), artifact_file=f"eval/{name}.png")
        mlflow.log_dict(evaluator.info, "eval/classifier.json")
        out.update(rows={k: asdict(v) for k, v in rows.items()}, passed=passed, gate=gate_metrics)
    return out


def _evaluate_real_teacher(cfg: TDMConfig, student, backbone, step: int) -> dict:
    """CLIP score and CLIP-space Frechet distance to the teacher's samples (tdm.clip_eval), logged to the
    active run: metrics, the table and sample grids. The teacher shares the student's backbone (a LoRA
    student's base with adapters off), so no second copy is loaded."""
    import mlflow
    import pandas as pd

    from .clip_eval import ClipEvaluator, evaluate_real
    from .pipeline import TDMPipeline, image_grid, teacher_spec

    evaluator = ClipEvaluator(cfg.eval.clip_model, device=next(student.denoiser.parameters()).device)
    teacher = TDMPipeline(backbone, teacher_spec(backbone, cfg.eval.teacher_steps, cfg.loss.guidance_scale,
                                                 cfg.teacher.negative_prompt))
    res = evaluate_real(student, teacher, load_prompts(cfg, False), evaluator, cfg)
    metrics = dict(res["gate"])
    for name, r in res["rows"].items():
        key = name.replace("@", "_k")
        metrics |= {f"eval/{key}/clip_score": r["clip_score"], f"eval/{key}/fid_vs_teacher": r["fid_vs_teacher"],
                    f"eval/{key}/latency_ms": r["latency_ms"]}
        log(f"eval {name}: CLIP score {r['clip_score']:.2f}, FD vs teacher {r['fid_vs_teacher']:.4f}")
    mlflow.log_metrics(metrics, step=step)
    mlflow.log_table(pd.DataFrame(list(res["rows"].values())), artifact_file="eval/table.json")
    for name, imgs in res["grids"].items():
        mlflow.log_image(image_grid(imgs, nrow=4), artifact_file=f"eval/{name}.png")
    return {"rows": res["rows"], "passed": res["passed"], "gate": res["gate"]}


# ---------------------------------------------------------------- the job

def distill(cfg: TDMConfig) -> dict:
    """Run a distillation end to end; returns a summary (run id, model version, table, gate)."""
    import mlflow
    from mlflow.entities import Param

    from .tracking import code_version, find_run, get_or_create_experiment, resolve_teacher_dir, use_tracking_uri

    # 1. everything that can be checked without Ray or the teacher's weights
    if cfg.name is None:
        cfg = cfg.model_copy(update={"name": time.strftime("tdm-%Y%m%d-%H%M%S")})
    is_toy = cfg.teacher.uri == "toy"
    tracking_uri = use_tracking_uri()
    check_teacher_source(cfg.teacher.uri)
    prompts = load_prompts(cfg, is_toy)
    storage = check_storage(cfg.train.storage_path or str(_default_home() / "runs"))
    check_grids(cfg, None if is_toy else resolve_teacher_dir(cfg.teacher.uri, tracking_uri))
    log(f"run {cfg.name}: MLflow {tracking_uri}, checkpoints {storage}/{cfg.name}")

    # 2. Ray, and the toy teacher on first use
    local = init_ray(cfg)
    cpus = worker_cpus(cfg, local)
    check_placement(cfg, cpus)
    teacher_source = ensure_toy_teacher(cfg, tracking_uri, cpus * cfg.train.num_workers) if is_toy \
        else cfg.teacher.uri

    # 3. the MLflow run this job owns; a second invocation with the same name appends to it
    exp_id = get_or_create_experiment(cfg.registry.experiment)
    client = mlflow.MlflowClient()
    existing = find_run(exp_id, cfg.name)
    if existing is None:
        run = client.create_run(exp_id, run_name=cfg.name, tags={
            "tdm.run_name": cfg.name, "tdm.version": __version__, "tdm.code_version": code_version(),
            "tdm.teacher": teacher_source, "tdm.storage": f"{storage}/{cfg.name}"})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cfg.to_flat_dict().items()])
        client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
    else:
        run_id = existing.info.run_id
        _check_resume_config(existing, cfg)
        client.update_run(run_id, status="RUNNING")  # RUNNING while training: system metrics need it
        log(f"resuming run {cfg.name} (MLflow run {run_id})")
    try:
        return _train_and_register(cfg, prompts, teacher_source, tracking_uri, run_id, storage, cpus)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise


def _train_and_register(cfg: TDMConfig, prompts, teacher_source, tracking_uri, run_id, storage, cpus) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train import train_loop_per_worker

    # 4. Ray Train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "teacher_source": teacher_source,
                           "prompts": prompts, "tracking_uri": tracking_uri, "run_id": run_id,
                           "storage": storage},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))
    t0 = time.perf_counter()
    result = trainer.fit()
    log(f"training finished in {time.perf_counter() - t0:.0f}s; final checkpoint {result.checkpoint.path}")

    # 5. evaluate + export on a worker-sized task, then register and gate in the driver
    return evaluate_and_register(cfg, result.checkpoint, teacher_source, tracking_uri, run_id,
                                 num_cpus=cpus * cfg.train.num_workers)


def evaluate_and_register(cfg: TDMConfig, checkpoint, teacher_source: str, tracking_uri: str, run_id: str,
                          num_cpus: float) -> dict:
    """Export and evaluate a checkpoint (a Ray task sized like the training job), register it as a
    version of cfg.registry.model_name linked to `run_id`, and move the alias only if the gate passes."""
    import ray

    from .tracking import register

    task = ray.remote(num_cpus=num_cpus, num_gpus=1 if cfg.train.use_gpu else 0)(_evaluate_and_export)
    out = ray.get(task.remote(cfg.model_dump_json(), checkpoint, teacher_source, tracking_uri, run_id))
    spec = out["spec"]
    tags = {"teacher": teacher_source, "num_steps": spec["num_steps"], "step_values": spec["step_values"],
            "timesteps": json.dumps(spec["timesteps"]), "guidance_scale": spec["guidance_scale"],
            "prediction_type": spec["prediction_type"], "tdm_version": __version__, "run_name": cfg.name,
            "run_id": run_id, "step": out["step"], "checkpoint": checkpoint.path}
    passed = out.get("passed", False)
    tags |= {k.replace("/", "."): round(v, 4) for k, v in out.get("gate", {}).items()}
    tags["gate.passed"] = passed
    mv = register(out["model_uri"], cfg.registry.model_name, tags, alias=cfg.registry.alias if passed else None)
    log(f"registered {cfg.registry.model_name} version {mv.version} (step {out['step']}); gate "
        f"{'PASSED -> alias ' + cfg.registry.alias if passed else 'not passed (no alias)'}")
    return {"run_name": cfg.name, "run_id": run_id, "model_version": mv.version, "passed": passed,
            "rows": out.get("rows", {}), "gate": out.get("gate", {}), "step": out["step"]}


def register_checkpoint(uri: str, configure=None) -> dict:
    """Evaluate and register any checkpoint (local path or s3://...) of an earlier run, into that run."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from .train import META_FILE

    from .tracking import find_run, get_or_create_experiment, use_tracking_uri

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).expanduser().resolve()))
        with fs.open_input_stream(f"{path}/{META_FILE}") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--checkpoint: {uri} is not a readable tdm checkpoint ({e})") from None
    from .config import load_config

    # configure(base_dict) -> TDMConfig lets the command line override the run's own config
    cfg = configure(meta["config"]) if configure is not None else load_config(meta["config"])
    tracking_uri = use_tracking_uri()
    run = find_run(get_or_create_experiment(cfg.registry.experiment), cfg.name)
    if run is None:
        raise ConfigError(f"--checkpoint: no MLflow run named {cfg.name!r} in experiment {cfg.registry.experiment!r}")
    local = init_ray(cfg)
    return evaluate_and_register(cfg, Checkpoint(path, filesystem=fs), meta["teacher_source"], tracking_uri,
                                 run.info.run_id, num_cpus=worker_cpus(cfg, local) * cfg.train.num_workers)


def _check_resume_config(run, cfg: TDMConfig) -> None:
    """A resumed run must use the same config (train.max_steps may grow)."""
    logged = run.data.params
    for key, value in cfg.to_flat_dict().items():
        if key in ("train.max_steps", "name") or key not in logged:
            continue
        if str(value) != logged[key]:
            raise ConfigError(f"{key}: run '{cfg.name}' was started with {logged[key]}, got {value}; "
                              f"use a new --name to change the config")


def print_summary(summary: dict) -> None:
    """The evaluation table and the registry outcome, for the terminal."""
    rows = summary.get("rows", {})
    if rows and "fid" in next(iter(rows.values())):  # the toy's digit-classifier table
        print(f"\n{'sampler':<18}{'NFE':>5}{'FID':>9}{'adherence %':>13}{'ms/image':>10}")
        for name, r in rows.items():
            print(f"{name:<18}{r['nfe']:>5}{r['fid']:>9.2f}{r['adherence']:>13.1f}{r['latency_ms']:>10.2f}")
    elif rows:  # real teachers: CLIP score and CLIP-space Frechet distance to the teacher's samples
        print(f"\n{'sampler':<18}{'steps':>6}{'CLIP score':>12}{'FD vs teacher':>15}{'ms/image':>10}")
        for name, r in rows.items():
            print(f"{name:<18}{r['steps']:>6}{r['clip_score']:>12.2f}{r['fid_vs_teacher']:>15.4f}"
                  f"{r['latency_ms']:>10.2f}")
    print(f"\nrun {summary['run_name']} (MLflow run {summary['run_id']}): registered version "
          f"{summary['model_version']}, gate {'passed' if summary['passed'] else 'not passed'}")
