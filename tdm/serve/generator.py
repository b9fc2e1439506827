"""The model replica: loads the served version, batches jobs onto the network, follows the alias.

`TDMGenerator` is a Ray Serve deployment defined at import time (Ray Serve is a dependency of this
subpackage, not of the library). Its replicas poll the registry and swap to a moved alias without
failing a request; results never depend on how jobs were batched (module docstring of tdm.serve).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace

from ray import serve

from ..errors import ParamError
from .config import ServeConfig
from .protocol import GenerationJob, GenerationResult, ServedModel

log = logging.getLogger("ray.serve")


def load_served_model(uri: str, tracking_uri: str | None, decoder: str | None = None):
    """(pipeline, ServedModel) for a model URI or a local model directory, decoding with `decoder` (a
    location; None: the model's own VAE)."""
    from ..generation import TDMPipeline, inference_device
    from ..tracking import download_model, resolve_model_version, use_tracking_uri

    if uri.startswith("models:/"):
        use_tracking_uri(tracking_uri)
        mv = resolve_model_version(uri)
        path, name, version = download_model(mv), mv.name, str(mv.version)
    else:
        path, name, version = uri, uri.rstrip("/").split("/")[-1], "local"
    # Ray shows a replica a GPU only when it asked for one (num_gpus > 0)
    pipe = TDMPipeline.from_pretrained(path, device=inference_device(), decoder=decoder)
    return pipe, ServedModel(id=f"{name}/{version}", name=name, version=version, uri=uri, spec=pipe.spec)


def resolve_version(uri: str, tracking_uri: str | None) -> str | None:
    """The version an alias points at now (None for pinned versions and local directories)."""
    if not (uri.startswith("models:/") and "@" in uri):
        return None
    from ..tracking import resolve_model_version, use_tracking_uri

    use_tracking_uri(tracking_uri)
    return str(resolve_model_version(uri).version)


def _upscaled(sample, scale: int):
    """An image (C, H, W) or video (F, C, H, W) upscaled `scale` x (nearest)."""
    import torch

    if scale == 1:
        return sample
    frames = sample if sample.ndim == 4 else sample[None]
    out = torch.nn.functional.interpolate(frames, scale_factor=scale, mode="nearest")
    return out if sample.ndim == 4 else out[0]


def run_images(pipe, jobs: list[GenerationJob], chunk: int) -> list[list[bytes]]:
    """Generate every job's images (or video) in network batches of exactly `chunk` samples (padding the
    last chunk), so a result never depends on how requests were grouped. Returns each job's encoded images
    (its output_format) or one MP4."""
    from ..images import encode_images
    from ..video import to_mp4_bytes

    fps = pipe.spec.fps or 8.0

    flat = [(j, job.prompt, job.seed + i, job.params, job.scale) for j, job in enumerate(jobs) for i in range(job.n)]
    out: list[list[bytes]] = [[] for _ in jobs]
    for params in sorted({f[3] for f in flat}, key=lambda p: p.steps):
        items = [f for f in flat if f[3] == params]
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            padded = part + [part[0]] * (chunk - len(part))
            images = pipe.render([p for _, p, _, _, _ in padded], params, [s for _, _, s, _, _ in padded])[:len(part)]
            for (j, _, _, _, scale), sample in zip(part, images):
                sample = _upscaled(sample, scale)
                job = jobs[j]
                out[j].append(to_mp4_bytes(sample, fps) if job.video else
                              encode_images(sample[None], job.output_format, job.output_compression)[0])
    return out


def run_isolated(pipe, jobs: list[GenerationJob], chunk: int) -> list[list[bytes] | ParamError]:
    """`run_images`, with a failure confined to the job that caused it: when the batched call raises,
    each job runs again alone (same chunk size, so the same images), and a job that fails alone gets a
    ParamError instead of images. Validation in the ingress refuses the inputs known to break a model
    (tdm.serve.protocol); this catches the ones nobody foresaw."""
    try:
        return list(run_images(pipe, jobs, chunk))
    except Exception as e:  # noqa: BLE001 - whichever job broke the batch must not take the others with it
        log.warning("tdm: a batch of %d jobs failed (%s); running them one by one", len(jobs), type(e).__name__)
    out: list[list[bytes] | ParamError] = []
    for job in jobs:
        try:
            out.append(run_images(pipe, [job], chunk)[0])
        except Exception:  # noqa: BLE001 - reported on this request only
            log.exception("tdm: a job failed on its own (prompt of %d characters)", len(job.prompt))
            out.append(ParamError("prompt", "the model failed to generate this request"))
    return out


@serve.deployment(name="TDMGenerator", max_ongoing_requests=32, health_check_period_s=5,
                  health_check_timeout_s=60, graceful_shutdown_timeout_s=30)
class TDMGenerator:
    def __init__(self, config: dict | None = None):
        self._lock = threading.Lock()
        self.cfg = ServeConfig()
        self.current: tuple | None = None      # (pipeline, ServedModel), swapped atomically
        self._stop = threading.Event()
        self._poller = None
        if config is not None:
            self.reconfigure(config)

    def reconfigure(self, config: dict) -> None:
        cfg = ServeConfig.model_validate(config or {})
        old = self.cfg
        self.cfg = cfg
        # a batch holds whole requests, so it must fit the largest one; the network still runs on
        # chunks of exactly max_batch_size images
        self._batch.set_max_batch_size(max(cfg.max_batch_size, cfg.max_images_per_request))
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        if self.current is None or (cfg.model_uri, cfg.tracking_uri, cfg.decoder) != \
                (old.model_uri, old.tracking_uri, old.decoder):
            self._swap_to(cfg.model_uri)
        if self._poller is None and cfg.poll_interval_s > 0:
            self._poller = threading.Thread(target=self._poll, daemon=True, name="tdm-registry-poll")
            self._poller.start()

    def _swap_to(self, uri: str) -> None:
        """Load the new model next to the old one, then switch in one assignment."""
        with self._lock:
            pipe, model = load_served_model(uri, self.cfg.tracking_uri, self.cfg.decoder)
            self.current = (pipe, model)
        log.info("tdm: serving %s (%s), decoder %s", model.id, uri, model.decoder or "the model's VAE")

    def _poll(self) -> None:
        while not self._stop.wait(max(self.cfg.poll_interval_s, 0.5)):
            if self.cfg.poll_interval_s <= 0 or self.current is None:
                continue
            try:
                version = resolve_version(self.cfg.model_uri, self.cfg.tracking_uri)
                if version is not None and version != self.current[1].version:
                    self._swap_to(self.cfg.model_uri)
            except Exception as e:  # noqa: BLE001 - registry unreachable: keep serving the current model
                log.warning("tdm: registry poll failed: %s", e)

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")

    def info(self) -> ServedModel | None:
        return None if self.current is None else self.current[1]

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """One job's images (or the ParamError that refused it), batched with concurrent jobs."""
        return await self._batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=lambda jobs: sum(j.n for j in jobs))
    async def _batch(self, jobs: list[GenerationJob]) -> list[GenerationResult]:
        pipe, model = self.current  # one model for the whole batch, even if a swap lands meanwhile
        checked: list[GenerationJob | ParamError] = []
        for job in jobs:
            if job.video != model.is_video:  # a swap replaced a video model by an image model, or the reverse
                checked.append(ParamError("model", f"{model.id} now generates "
                                          f"{'videos' if model.is_video else 'images'}; send the request again"))
                continue
            if job.model_id == model.id:
                checked.append(job)
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
        ran = iter(run_isolated(pipe, ok, self.cfg.max_batch_size)) if ok else iter(())
        results = [next(ran) if isinstance(j, GenerationJob) else j for j in checked]
        return [GenerationResult(model.id, error=r) if isinstance(r, ParamError) else
                GenerationResult(model.id, tuple(r)) for r in results]

    def __del__(self):
        self._stop.set()
