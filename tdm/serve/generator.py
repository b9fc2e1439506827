"""The model replica: loads the served version, batches jobs onto the network, follows the alias.

`TDMGenerator` is a Ray Serve deployment defined at import time (Ray Serve is a dependency of this
subpackage, not of the library). Its replicas poll the registry and swap to a moved alias without
failing a request; results never depend on how jobs were batched (module docstring of tdm.serve).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ray import serve

from ..errors import ParamError, first_line, public_message
from .config import ServeConfig
from .protocol import GenerationJob, GenerationResult, ServedModel

log = logging.getLogger("ray.serve")


def resolve_dtype(name: str, device: str):
    """The torch dtype a ServeConfig.dtype names on `device` ("auto": bfloat16 on a GPU that has it,
    else float16; float32 on CPU)."""
    import torch

    if name == "auto":
        if device != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def load_served_model(uri: str, tracking_uri: str | None, decoder: str | None = None, dtype: str = "float32"):
    """(pipeline, ServedModel) for a model URI or a local model directory, decoding with `decoder` (a
    location; None: the model's own VAE)."""
    from ..tracking import download_model, resolve_model_version, use_tracking_uri

    if uri.startswith("models:/"):
        use_tracking_uri(tracking_uri)
        mv = resolve_model_version(uri)
        return load_model_dir(download_model(mv), uri, mv.name, str(mv.version), decoder, dtype)
    return load_model_dir(uri, uri, uri.rstrip("/").split("/")[-1], "local", decoder, dtype)


def load_model_dir(path, uri: str, name: str, version: str, decoder: str | None, dtype: str):
    """(pipeline, ServedModel) of a pipeline directory on this node."""
    from ..generation import TDMPipeline, inference_device

    device = inference_device()  # Ray shows a replica a GPU only when it asked for one (num_gpus > 0)
    pipe = TDMPipeline.from_pretrained(path, device=device, dtype=resolve_dtype(dtype, device), decoder=decoder)
    return pipe, ServedModel(id=f"{name}/{version}", name=name, version=version, uri=uri, spec=pipe.spec)


def bucket_size(n: int, max_size: int, invariant: bool = False) -> int:
    """Network batch size for a chunk of `n` samples (1 <= n <= max_size): the smallest power of two that
    holds it, capped at max_size; max_size itself when batch-invariant (README, "Serving: batching")."""
    if invariant:
        return max_size
    return min(max_size, 1 << (n - 1).bit_length())


def backoff_s(attempts: int, initial: float, maximum: float) -> float:
    """Wait before retry number `attempts` (>= 1) of a failed load: initial * 2^(attempts - 1), capped."""
    return min(maximum, initial * 2.0 ** min(attempts - 1, 60))


def _upscaled(sample, scale: int):
    """An image (C, H, W) or video (F, C, H, W) upscaled `scale` x (nearest)."""
    import torch

    if scale == 1:
        return sample
    frames = sample if sample.ndim == 4 else sample[None]
    out = torch.nn.functional.interpolate(frames, scale_factor=scale, mode="nearest")
    return out if sample.ndim == 4 else out[0]


def run_images(pipe, jobs: list[GenerationJob], chunk: int, invariant: bool = False) -> list[list[bytes]]:
    """Generate every job's images (or video) in network batches of at most `chunk` samples, each padded
    to its bucket (bucket_size; always `chunk` when `invariant`, so a result never depends on how requests
    were grouped). Returns each job's encoded images (its output_format) or one MP4."""
    from ..images import encode_images
    from ..video import to_mp4_bytes

    fps = pipe.spec.fps or 8.0

    flat = [(j, job.prompt, job.seed + i, job.params, job.scale) for j, job in enumerate(jobs) for i in range(job.n)]
    out: list[list[bytes]] = [[] for _ in jobs]
    for params in sorted({f[3] for f in flat}, key=lambda p: p.steps):
        items = [f for f in flat if f[3] == params]
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            padded = part + [part[0]] * (bucket_size(len(part), chunk, invariant) - len(part))
            images = pipe.render([p for _, p, _, _, _ in padded], params, [s for _, _, s, _, _ in padded])[:len(part)]
            for (j, _, _, _, scale), sample in zip(part, images):
                sample = _upscaled(sample, scale)
                job = jobs[j]
                out[j].append(to_mp4_bytes(sample, fps) if job.video else
                              encode_images(sample[None], job.output_format, job.output_compression)[0])
    return out


def run_isolated(pipe, jobs: list[GenerationJob], chunk: int, invariant: bool = False,
                 counts: dict[str, int] | None = None) -> list[list[bytes] | ParamError]:
    """`run_images`, with a failure confined to the job that caused it: when the batched call raises,
    each job runs again alone (batch-invariant: the same images; else at its own bucket size), and a job
    that fails alone gets a ParamError instead of images. Validation in the ingress refuses the inputs
    known to break a model (tdm.serve.protocol); this catches the ones nobody foresaw. `counts` (if given)
    counts the batches of several jobs run again one by one ("isolated_batches") and the jobs that failed
    ("failed_jobs")."""
    counts = counts if counts is not None else {}
    try:
        return list(run_images(pipe, jobs, chunk, invariant))
    except Exception as e:  # noqa: BLE001 - whichever job broke the batch must not take the others with it
        log.warning("tdm: a batch of %d jobs failed (%s); running them one by one", len(jobs), type(e).__name__)
        counts["isolated_batches"] = counts.get("isolated_batches", 0) + (len(jobs) > 1)
    out: list[list[bytes] | ParamError] = []
    for job in jobs:
        try:
            out.append(run_images(pipe, [job], chunk, invariant)[0])
        except Exception:  # noqa: BLE001 - reported on this request only
            log.exception("tdm: a job failed on its own (prompt of %d characters)", len(job.prompt))
            out.append(ParamError("prompt", "the model failed to generate this request"))
            counts["failed_jobs"] = counts.get("failed_jobs", 0) + 1
    return out


@dataclass
class _Target:
    """What model_uri names right now: a registered version (or a local directory) and how to load it."""

    key: str                    # identity: the version's cache key, or the local path
    label: str                  # "<name>/<version>", for reports
    load: Callable[[], tuple]   # -> (pipeline, ServedModel)
    path: Optional[Path] = None  # its directory in the model cache (protected from eviction)
    source: str = "registry"    # "registry", "cache" (the registry was unreachable) or "local"


@serve.deployment(name="TDMGenerator", health_check_period_s=5, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=30)
class TDMGenerator:
    """A model replica. Its life cycle (README, "Serving: the model life cycle"): the version model_uri
    names is loaded beside the served one and swapped in only once it loaded; a version that fails to
    download or load is retried with back-off (load_retry_*) and never replaces the served one; with the
    registry unreachable and nothing served, the newest complete cached version is served. `status()`
    reports the serving version, a pending one and the last error."""

    def __init__(self, config: dict | None = None):
        # a registry that does not answer must not hold a load attempt for minutes (MLflow retries 7x)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._lock = threading.RLock()      # one life-cycle step at a time (reconfigure vs the loader thread)
        self.cfg = ServeConfig()
        self.current: tuple | None = None      # (pipeline, ServedModel), swapped atomically
        self._key: str | None = None            # _Target.key of what is served
        self._path: Path | None = None
        self.source: str | None = None
        self.pending: dict | None = None        # {"model", "attempts", "retry_at"}: a version not yet served
        self.last_error: dict | None = None     # {"model", "message", "at"}
        self._failed: tuple[str, int, float] | None = None   # (target key, attempts, monotonic retry time)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight = 0                      # images of the generate() calls not yet answered
        self._batches = (0, 0)                  # images in the last two batches (previous, last)
        self.counts = {"batches": 0, "isolated_batches": 0, "failed_jobs": 0}   # since the replica started
        if config is not None:
            self.reconfigure(config)

    def reconfigure(self, config: dict) -> None:
        cfg = ServeConfig.model_validate(config or {})
        old = self.cfg
        self.cfg = cfg   # batch sizes and waits follow it from the next job on (_pace)
        identity = ("model_uri", "tracking_uri", "decoder", "dtype")
        if self.current is None or any(getattr(cfg, k) != getattr(old, k) for k in identity):
            with self._lock:
                self._key, self._failed = None, None   # what is served no longer matches: load anew
            # the first attempt runs here, so a deployment is ready once it has tried (serve.run returns)
            self._step()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="tdm-model-lifecycle")
            self._thread.start()
        self._wake.set()

    # ------------------------------------------------------------------ life cycle
    def _target(self) -> _Target:
        """What model_uri names now; raises when the registry cannot say (unreachable, unknown name)."""
        from ..tracking import download_model, resolve_model_version, use_tracking_uri, version_cache_key

        cfg, uri = self.cfg, self.cfg.model_uri
        if not uri.startswith("models:/"):
            return _Target(f"local:{uri}", uri, lambda: load_model_dir(uri, uri, uri.rstrip("/").split("/")[-1],
                                                                        "local", cfg.decoder, cfg.dtype),
                           path=None, source="local")
        use_tracking_uri(cfg.tracking_uri)
        mv = resolve_model_version(uri)

        def load():
            return load_model_dir(download_model(mv), uri, mv.name, str(mv.version), cfg.decoder, cfg.dtype)

        from .. import paths
        return _Target(version_cache_key(mv), f"{mv.name}/{mv.version}", load,
                       path=paths.cache_dir("models") / version_cache_key(mv))

    def _cached_targets(self) -> list[_Target]:
        """Complete cached versions model_uri can mean (only its version, if pinned), newest first."""
        from ..tracking import cached_versions, pipeline_dir

        body = self.cfg.model_uri.removeprefix("models:/")
        name, pinned = (body.split("@", 1)[0], None) if "@" in body else body.split("/", 1)
        cfg = self.cfg

        def target(version: int, d: Path) -> _Target:
            return _Target(d.name, f"{name}/{version}", lambda: load_model_dir(
                pipeline_dir(d), cfg.model_uri, name, str(version), cfg.decoder, cfg.dtype), path=d, source="cache")

        return [target(v, d) for v, d in cached_versions(name) if pinned is None or str(v) == pinned]

    def _error(self, label: str | None, e: BaseException) -> None:
        self.last_error = {"model": label, "message": public_message(e), "at": int(time.time())}

    def _step(self) -> None:
        """One life-cycle step: find what model_uri names, and load it unless it is served or waiting out
        its back-off. Never raises; never replaces the served model by one that failed. With the registry
        unreachable and nothing served, the newest cached version that loads is served."""
        with self._lock:
            cfg = self.cfg
            try:
                target = self._target()
            except Exception as e:  # noqa: BLE001 - registry unreachable: keep serving; at start-up, the cache
                self._error(None, RuntimeError(f"registry: {first_line(e)}"))
                log.warning("tdm: cannot resolve %s: %s", cfg.model_uri, first_line(e))
                if self.current is None and cfg.model_uri.startswith("models:/"):
                    for cached in self._cached_targets():
                        if self._try(cached):
                            log.warning("tdm: the registry is unreachable; serving %s from the model cache",
                                        cached.label)
                            break
                return
            if target.key == self._key:
                self.pending, self._failed, self.source = None, None, target.source  # e.g. the registry is back
                return
            if self._failed and self._failed[0] == target.key and time.monotonic() < self._failed[2]:
                return
            self._try(target)

    def _try(self, target: _Target) -> bool:
        """Load `target` and serve it; on failure keep what is served, report, and schedule a retry."""
        cfg = self.cfg
        attempts = self._failed[1] + 1 if self._failed and self._failed[0] == target.key else 1
        self.pending = {"model": target.label, "attempts": attempts, "retry_at": None}
        try:
            pipe, model = target.load()
        except Exception as e:  # noqa: BLE001 - a broken version is reported and retried, never served
            wait = backoff_s(attempts, cfg.load_retry_initial_s, cfg.load_retry_max_s)
            self._failed = (target.key, attempts, time.monotonic() + wait)
            self.pending["retry_at"] = int(time.time() + wait)
            self._error(target.label, e)
            log.warning("tdm: loading %s failed (attempt %d, next in %.0f s): %s", target.label, attempts,
                        wait, first_line(e))
            return False
        self.current = (pipe, model)   # one assignment: a batch reads the pair it started with
        self._key, self._path, self.source = target.key, target.path, target.source
        self.pending, self._failed = None, None
        log.info("tdm: serving %s (%s, from the %s), decoder %s", model.id, cfg.model_uri, target.source,
                 model.decoder or "the model's VAE")
        self._prune(model.name)
        return True

    def _prune(self, name: str) -> None:
        from ..tracking import prune_model_cache

        try:
            for d in prune_model_cache(name, self.cfg.model_cache_versions, protect=tuple(
                    p for p in (self._path,) if p is not None)):
                log.info("tdm: evicted %s from the model cache", d.name)
        except OSError as e:
            log.warning("tdm: model cache eviction failed: %s", e)

    def _wait_s(self) -> float | None:
        """Seconds until the next life-cycle step (None: until woken by reconfigure)."""
        waits = []
        if self._failed is not None:
            waits.append(max(0.0, self._failed[2] - time.monotonic()))
        if self.cfg.poll_interval_s > 0:
            waits.append(self.cfg.poll_interval_s)
        elif self.current is None:  # nothing served and no poll: retry (the registry may come back)
            waits.append(backoff_s(1, self.cfg.load_retry_initial_s, self.cfg.load_retry_max_s))
        return min(waits) if waits else None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._wait_s())
            self._wake.clear()
            if self._stop.is_set():
                return
            self._step()

    def check_health(self) -> None:
        # a replica without a model is not restarted for it (that would retry a broken version at every
        # restart and lose the cache fallback); it reports it in status() and the ingress answers 503
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError("the model life-cycle thread died")

    def info(self) -> ServedModel | None:
        return None if self.current is None else self.current[1]

    def status(self) -> dict:
        """What this replica serves, from where, what it is trying to load and the last error."""
        model = self.info()
        return {"serving": None if model is None else model.id, "source": self.source,
                "pending": self.pending, "last_error": self.last_error, "counts": dict(self.counts)}

    def _pace(self, job: GenerationJob) -> None:
        """Size the next batch to the load (README, "Serving: batching"). A batch waits
        batch_wait_timeout_s for company only when company is likely: the previous batch held more than
        this job, or other jobs are in the replica. Otherwise (one client at a time) it starts at once:
        waiting for nobody is what made batching cost more than it saved at low load. It also stops
        waiting once it holds as many images as that company, instead of waiting for max_batch_size.
        Ray reads both settings when a batch's first job arrives, so they are set just before."""
        cfg = self.cfg
        prev, last = self._batches
        # a batch smaller than the one before means the load split into groups that miss each other
        # (3 + 1 + 3 + 1 ... at four clients): wait for both, so they merge again
        company = max(self._inflight + job.n, last + prev if last < prev else last)
        # a batch holds whole requests, so it must fit the largest one; the network still runs on
        # chunks of at most max_batch_size images
        limit = max(cfg.max_batch_size, cfg.max_images_per_request)
        # never below the largest request: a job bigger than the batch limit would be refused by Ray
        self._batch.set_max_batch_size(max(cfg.max_images_per_request, min(limit, company)))
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s if company > job.n else 0.0)

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """One job's images (or the ParamError that refused it), batched with concurrent jobs."""
        self._pace(job)
        self._inflight += job.n
        try:
            return await self._batch(job)
        finally:
            self._inflight -= job.n

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=lambda jobs: sum(j.n for j in jobs))
    async def _batch(self, jobs: list[GenerationJob]) -> list[GenerationResult]:
        pipe, model = self.current  # one model for the whole batch, even if a swap lands meanwhile
        self._batches = (self._batches[1], sum(j.n for j in jobs))
        checked: list[GenerationJob | ParamError] = []
        for job in jobs:
            if job.video != model.is_video:  # a swap replaced a video model by an image model, or the reverse
                checked.append(ParamError("model", f"{model.id} now generates "
                                          f"{'videos' if model.is_video else 'images'}; send the request again"))
                continue
            if job.model_id == model.id:
                checked.append(job)
                continue
            if job.pinned:  # the request named this exact version: another one must not answer it
                checked.append(ParamError("model", f"{job.model_id} is no longer served; served: {model.id}"))
                continue
            # validated against the model the ingress last saw, and a swap landed since: check against this one
            try:
                checked.append(replace(job, params=model.spec.check_generation(job.params.steps), model_id=model.id))
            except ParamError as e:
                checked.append(e)
        ok = [j for j in checked if isinstance(j, GenerationJob)]
        # Run on the replica's event loop, not in a worker thread: with a small, Python-bound model a
        # compute thread holds the GIL and starves the loop, requests trickle in one at a time and
        # batches never fill (2 cores: 18 img/s in a thread vs 59 img/s here, 160 queued requests).
        # Requests arriving meanwhile wait in the replica's queue and form the next batch.
        cfg = self.cfg
        self.counts["batches"] += 1
        ran = iter(run_isolated(pipe, ok, cfg.max_batch_size, cfg.batch_invariant, self.counts)) if ok else iter(())
        out = []
        for j in checked:
            r = next(ran) if isinstance(j, GenerationJob) else j
            if isinstance(r, ParamError):
                out.append(GenerationResult(model.id, error=r))
            else:
                out.append(GenerationResult(model.id, tuple(r), revised_prompt=pipe.backbone.readable_prompt(
                    j.prompt)))
        return out

    def __del__(self):
        self._stop.set()
        self._wake.set()
