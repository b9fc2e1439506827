"""MLflow glue: the tracking store, the run a distillation owns (found again by run name on resume),
rank-0 metric and sample logging, logging models and evaluations, and the registry.

Local default: `sqlite:///$TDM_HOME/mlflow.db` (tdm.paths) with artifacts in `$TDM_HOME/mlartifacts`, so
runs and registered models persist across invocations and working directories. `MLFLOW_TRACKING_URI`
overrides it (e.g. an `mlflow server`).
"""
from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import torch

from . import __version__, paths
from .errors import redact
from .spec import ModelSpec, WorkerSpec

RUN_NAME_TAG = "tdm.run_name"
PIPELINE_ARTIFACT = "pipeline"
PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or paths.local_tracking_uri()


def use_tracking_uri(uri: str | None = None) -> str:
    """Point mlflow at `uri` (default: default_tracking_uri()), creating the local store's folder."""
    import mlflow

    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def get_or_create_experiment(name: str) -> str:
    """Experiment id; a new experiment of the local default store keeps artifacts under $TDM_HOME."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = paths.artifacts_dir().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # another process (a second job, a dashboard) created it between the lookup and the insert
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(experiment_id: str, run_name: str):
    """The run carrying tag tdm.run_name == run_name, or None."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                      max_results=2)
    return runs[0] if runs else None


def _version_digest(mv) -> str:
    """A digest of the logged model, run and creation time a registered version points at."""
    import hashlib

    return hashlib.sha256(f"{mv.source}|{mv.run_id}|{mv.creation_timestamp}".encode()).hexdigest()[:12]


def version_identity(mv) -> str:
    """An immutable identity of a registered version: its number and _version_digest. Name and number alone
    are not enough: two registries (a local store, then a team's MLflow server) both have `tdm-student`
    version 3, and $TDM_HOME is shared between them."""
    return f"{mv.version}-{_version_digest(mv)}"


def version_cache_key(mv) -> str:
    """Directory name of a registered version in the model cache: its name, number and digest."""
    return f"{mv.name}--{mv.version}--{_version_digest(mv)}"


def download_model(mv) -> Path:
    """The pipeline directory of a registered model version, downloaded once per version into
    $TDM_HOME/cache/models and reused (safe when several processes on a node race). A failed download
    leaves nothing behind: it goes to a temporary directory that is removed whatever happens."""
    import tempfile

    import mlflow

    from .console import quiet_libraries

    quiet_libraries()
    cache = paths.cache_dir("models")
    target = cache / version_cache_key(mv)
    if not (target / "MLmodel").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _remove_stale_downloads(cache)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                        dst_path=str(tmp))
            if not (Path(local) / "MLmodel").is_file():
                raise FileNotFoundError(f"models:/{mv.name}/{mv.version}: the download holds no MLmodel")
            try:  # atomic publish of a complete download; targets are never partial
                os.replace(local, target)
            except OSError:  # another process on this node published it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return pipeline_dir(target)


#: a .download-* directory older than this (seconds) belongs to a process that died mid-download
STALE_DOWNLOAD_S = 6 * 3600


def _remove_stale_downloads(cache: Path) -> None:
    now = time.time()
    for d in cache.glob(".download-*"):
        try:
            if now - d.stat().st_mtime > STALE_DOWNLOAD_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def cached_versions(name: str) -> list[tuple[int, Path]]:
    """Complete downloads of registered model `name` in this node's cache, newest version first:
    [(version, model directory)]. What serving falls back on when the registry is unreachable."""
    found = []
    for d in paths.cache_dir("models").glob(f"{name}--*--*"):
        mname, version, _ = d.name.rsplit("--", 2)
        if mname == name and version.isdigit() and (d / "MLmodel").is_file():
            found.append((int(version), d))
    return sorted(found, key=lambda vd: (vd[0], vd[1].stat().st_mtime), reverse=True)


def prune_model_cache(name: str, keep: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep` cached versions of `name` (never a directory in `protect`, e.g.
    the one being served); returns the deleted directories."""
    protected = {Path(p).resolve() for p in protect}
    doomed = [d for _, d in cached_versions(name)[keep:]
              if not any(p.is_relative_to(d.resolve()) for p in protected)]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def pipeline_dir(model_dir: str | Path) -> Path:
    """The pipeline directory inside a downloaded tdm pyfunc model (its artifact named 'pipeline')."""
    import yaml

    mlmodel = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    rel = mlmodel["flavors"]["python_function"]["artifacts"][PIPELINE_ARTIFACT]["path"]
    return Path(model_dir) / rel


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see a run: its page on an MLflow server, or for a local store the `mlflow ui` command and the
    page it then serves."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{redact(tracking_uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000/{page}"


def resolve_model_version(uri: str):
    """ModelVersion for models:/name@alias or models:/name/version."""
    from mlflow import MlflowClient

    body = uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in body:
        name, alias = body.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = body.rsplit("/", 1)
    return client.get_model_version(name, version)


# ---------------------------------------------------------------- rank-0 logging

class RankZeroLogger:
    """Per-step metrics, fixed-noise sample grids and checkpoint records of rank 0 into the driver's run,
    through an Outbox (tdm.outbox): the training loop hands them over and goes on, whether or not the
    tracking server answers."""

    def __init__(self, ws: WorkerSpec, backbone, student, spec: ModelSpec):
        from mlflow import MlflowClient

        from .outbox import Outbox

        self.ws, self.cfg, self.run_id = ws, ws.config, ws.run_id
        self.outbox = Outbox(MlflowClient(ws.tracking_uri), ws.run_id, ws.config.train.tracking_buffer_mb << 20,
                             what=f"MLflow at {redact(ws.tracking_uri)}")
        self.pending: list[list] = []   # metric rows of the steps since the last hand-over
        self.backbone, self.student, self.spec = backbone, student, spec
        self.sample_prompts = ws.prompts[:10]

    def log_metric(self, key: str, value: float, step: int) -> None:
        from .outbox import Record

        self.outbox.put(Record("metrics", rows=[[key, float(value), int(time.time() * 1000), step]]))

    def log_checkpoint(self, step: int, uri: str, metrics: dict) -> None:
        """Make a checkpoint browsable in its run: checkpoints/step_<n>.json (step, storage URI, metrics)
        and the tag tdm.last_checkpoint. `pipelines/register.py --checkpoint URI` evaluates and registers it."""
        from .outbox import Record

        record = {"step": step, "uri": uri, "metrics": {k: float(v) for k, v in metrics.items()},
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.flush()
        self.outbox.put(Record("dict", name=f"checkpoints/step_{step:07d}.json", data=record))
        self.outbox.put(Record("tag", name="tdm.last_checkpoint", value=uri))
        self.log_metric("checkpoint/step", step, step)

    def log_step(self, step: int, metrics: dict) -> None:
        ts = int(time.time() * 1000)
        self.pending += [[f"train/{k}", float(v), ts, step] for k, v in metrics.items()]
        if step % self.cfg.train.log_every == 0:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered step metrics to the outbox (sent in the background)."""
        from .outbox import Record

        if self.pending:
            self.outbox.put(Record("metrics", rows=self.pending))
            self.pending = []

    def close(self) -> str | None:
        """At the end of training: wait up to train.tracking_grace_s for the server to take every write. What
        it has not taken is saved next to the checkpoints (tdm.outbox.spill) for the next invocation of the
        command to send; returns that file's URI, or None when everything was sent."""
        from .outbox import Record, spill

        if self.outbox.dropped:
            self.log_metric("tracking/dropped_writes", self.outbox.dropped, 0)
        self.flush()
        left = self.outbox.close(self.cfg.train.tracking_grace_s)
        if not left:
            return None
        if self.outbox.dropped:  # the count itself may be among the unsent records
            left.append(Record("metrics", rows=[["tracking/dropped_writes", float(self.outbox.dropped),
                                                 int(time.time() * 1000), 0]]))
        where = spill(left, self.ws.run_dir, time.strftime("rank0-%Y%m%dT%H%M%S"))
        from .console import log

        log(f"MLflow at {redact(self.ws.tracking_uri)} did not come back within train.tracking_grace_s="
            f"{self.cfg.train.tracking_grace_s:g}s: {len(left)} tracking writes saved to {where}")
        return where

    @torch.no_grad()
    def log_samples(self, step: int) -> None:
        """One grid per trained step count: rows are fixed seeds, columns the sample prompts."""
        from .images import image_grid
        from .outbox import Record

        n = len(self.sample_prompts)
        for k, images in render_samples(self.backbone, self.spec, self.student, self.sample_prompts,
                                        self.cfg.student.steps):
            scale = max(1, 64 // images.shape[-1])
            if images.ndim == 5:  # videos: an animated grid per step, as GIF and MP4
                for name, data in video_grid_files(images, n, scale, self.spec.fps or 8.0, f"step_{step:07d}"):
                    self.outbox.put(Record("file", name=name, path=f"samples/K{k}", data=data))
            else:
                png = io.BytesIO()
                image_grid(images, nrow=n, scale=scale).save(png, format="PNG")
                self.outbox.put(Record("image", name=f"samples_K{k}", step=step, data=png.getvalue()))


def render_samples(backbone, spec: ModelSpec, student, prompts: list[str], steps: list[int]
                   ) -> list[tuple[int, torch.Tensor]]:
    """[(K, samples)] of `student` at each K in `steps`: the first 10 prompts in 4 rows of fixed seeds (row
    i uses seed i), the same on every rank (a sharded student needs every rank to sample, tdm.train)."""
    from .generation import TDMPipeline

    pipe = TDMPipeline(backbone, spec, denoiser=student)
    prompts = prompts[:10]
    n = len(prompts)
    return [(k, pipe(prompts * 4, num_inference_steps=k, seeds=[i // n for i in range(4 * n)])) for k in steps]


def video_grid_files(videos: torch.Tensor, nrow: int, scale: int, fps: float, name: str) -> list[tuple[str, bytes]]:
    """Videos (N, F, C, H, W) tiled into one animated grid: [(<name>.gif, bytes), (<name>.mp4, bytes)]."""
    from .video import grid_video, to_gif_bytes, to_mp4_bytes

    grid = grid_video(videos, nrow=nrow, scale=scale)
    return [(f"{name}.gif", to_gif_bytes(grid, fps)), (f"{name}.mp4", to_mp4_bytes(grid, fps))]


def log_video_grid(client, run_id: str, videos: torch.Tensor, nrow: int, scale: int, fps: float,
                   artifact_dir: str, name: str) -> None:
    """Videos (N, F, C, H, W) tiled into one animated grid, logged as <artifact_dir>/<name>.gif and .mp4
    (the MLflow UI plays the GIF in its artifact viewer)."""
    from .outbox import Record, send

    send(client, run_id, [Record("file", name=f, path=artifact_dir, data=data)
                          for f, data in video_grid_files(videos, nrow, scale, fps, name)])


# ---------------------------------------------------------------- the model contract

def code_version() -> str:
    """tdm version plus the git commit of the source tree when it is a checkout (else 'unknown')."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha or 'unknown'}"


def start_system_metrics(run_id: str, tracking_uri: str, node_id: str, resume: bool, interval_s: float = 10.0):
    """MLflow system metrics (CPU, memory, GPU with nvidia-ml-py) of this node into the run (which must
    be RUNNING); returns the monitor."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, node_id=node_id,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def log_pipeline_model(pipeline_dir: str | Path, spec: ModelSpec, name: str = "model"):
    """Log a model directory as a pyfunc model ("models from code", tdm.pyfunc) in the active run.

    The tdm package travels with the model (code_paths), so it loads wherever its pip requirements
    are installed. Returns mlflow's ModelInfo.
    """
    import mlflow

    from .pyfunc import pyfunc_signature

    pkg = Path(__file__).parent
    # boto3: s3:// locations given at load time (model_config "decoder")
    reqs = ["torch", "diffusers", "transformers", "safetensors", "pillow", "pandas", "tokenizers", "scipy",
            "pydantic", "pyyaml", "tqdm", "numpy", "boto3"]
    return mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_ENTRY),
                                   artifacts={PIPELINE_ARTIFACT: str(pipeline_dir)}, code_paths=[str(pkg)],
                                   signature=pyfunc_signature(spec), pip_requirements=reqs,
                                   metadata={"tdm_version": __version__, "tdm_spec": spec.model_dump_json()})


def register(model_uri: str, name: str, tags: dict, alias: str | None = None):
    """Register a logged model as a new version of `name` with its tags (in the one call that creates
    it: a crash cannot leave an untagged version), and optionally move `alias` to it."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return mv


def registered_from(name: str, run_id: str, checkpoint: str):
    """The version of `name` registered from `checkpoint` (its tag) by run `run_id`, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:  # name: a safe name (tdm.config.SafeName); run_id: hex
        versions = MlflowClient().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":   # no model of that name yet
            return None
        raise   # an unreachable server is not "not registered yet": that would register it twice
    found = [mv for mv in versions if mv.tags.get("checkpoint") == str(checkpoint)]
    return max(found, key=lambda mv: int(mv.version)) if found else None


def log_evaluation(result, step: int, fps: float = 8.0) -> None:
    """An evaluation (tdm.evaluation.EvalResult) into the active run: eval/<row>/<metric> and latency
    metrics, the gate metrics, eval/table.json, one sample grid per row, and what the evaluator is
    (eval/evaluator.json)."""
    import mlflow
    import pandas as pd

    from .images import image_grid

    ev = result.evaluator
    metrics = dict(result.gate)
    for name, row in result.rows.items():
        key = name.replace("@", "_k")
        metrics |= {f"eval/{key}/{m}": v for m, v in row.metrics.items()}
        metrics[f"eval/{key}/latency_ms"] = row.latency_ms
    mlflow.log_metrics(metrics, step=step)
    mlflow.log_table(pd.DataFrame([r.to_dict() for r in result.rows.values()]), artifact_file="eval/table.json")
    mlflow.log_dict({"kind": ev.kind, **ev.info()}, "eval/evaluator.json")
    run_id = mlflow.active_run().info.run_id
    for name, imgs in result.grids.items():
        if imgs.ndim == 5:
            log_video_grid(mlflow.MlflowClient(), run_id, imgs, ev.grid_nrow, ev.grid_scale, fps, "eval", name)
        else:
            mlflow.log_image(image_grid(imgs, nrow=ev.grid_nrow, scale=ev.grid_scale), artifact_file=f"eval/{name}.png")
