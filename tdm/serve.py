"""Ray Serve: batched few-step generation from the MLflow registry behind an OpenAI-style images API.

  HTTP -> TDMIngress (FastAPI: validation, OpenAI request/response/error shapes)
       -> TDMGenerator (model replica: @serve.batch, registry polling, hot swap)

- `POST /v1/images/generations` {prompt, n, size, response_format="b64_json", model?, steps?, seed?}
  -> {"created", "model", "data": [{"b64_json", "revised_prompt"}]} and header `x-tdm-model`.
- `GET /v1/models` lists what is served (with the decoder in use); `GET /healthz` is 200 only once a
  model is loaded.
- The generator serves `model_uri` (default models:/tdm-student@champion). It polls the registry every
  `poll_interval_s`; when the alias moves it loads the new version beside the old one and swaps
  atomically, so in-flight and queued requests never fail. A `user_config` change (serve deploy /
  RayService serveConfigV2) reconfigures the same replicas in place.
- `decoder` (e.g. madebyollin/taesd) decodes with that autoencoder instead of the model's own VAE, for
  every version served; changing it reloads the model.
- Batching never changes results: image i of a request is seeded (seed + i) and the network always
  runs on chunks of exactly `max_batch_size` images (padded), so an image's numerics do not depend
  on which other requests shared its batch.

`build_app(args)` is the application builder used by `pipelines/serve.py`, `serve deploy` configs and
the RayService `serveConfigV2` (see `serve_config`).
"""
import base64
import json
import logging
import os
import threading
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

log = logging.getLogger("ray.serve")


class ServeConfig(BaseModel):
    """Serving options (the deployments' user_config). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field("models:/tdm-student@champion", description="Registered model to serve "
                           "(models:/<name>@<alias> or models:/<name>/<version>) or a local tdm pipeline directory.")
    poll_interval_s: float = Field(10.0, ge=0, description="Seconds between registry checks for a moved alias "
                                   "(0 = never; a new model_uri in user_config still swaps).")
    max_batch_size: int = Field(8, ge=1, le=256, description="Images per network batch (requests are batched "
                                "up to this many images; chunks are padded to exactly this size).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill up.")
    max_images_per_request: int = Field(4, ge=1, description="Upper bound of `n`.")
    max_prompt_chars: int = Field(1000, ge=1, description="Upper bound of the prompt length.")
    upscale_factors: list[int] = Field([1], description="Allowed output sizes as integer multiples of the model's "
                                       "native size (nearest-neighbour upscaling), e.g. 1,32 for the 8x8 toy.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                                        "or the local tdm store).")
    decoder: Optional[str] = Field(None, description="Autoencoder to decode with instead of the model's own VAE, "
                                   "e.g. madebyollin/taesd (a hub id, a local diffusers directory or an s3:// "
                                   "prefix; AutoencoderTiny or AutoencoderKL for the model's latents). Default: the "
                                   "model's VAE.")

    @field_validator("decoder")
    @classmethod
    def _blank_decoder_is_none(cls, v: Optional[str]) -> Optional[str]:
        # "" is how a chart value or a CLI flag says "no decoder"
        return (v.strip() or None) if v is not None else None


# ---------------------------------------------------------------- request validation (pure, testable)

class ImageRequest(BaseModel):
    """OpenAI Images API `create` body, plus the extensions `steps` and `seed`."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: Optional[StrictStr] = None
    n: StrictInt = 1
    size: Optional[StrictStr] = None
    response_format: StrictStr = "b64_json"
    steps: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    user: Optional[StrictStr] = None        # accepted for OpenAI client compatibility, unused


class RequestError(ValueError):
    """A client error: HTTP status, OpenAI error message and the offending parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def parse_request(raw: bytes, info: dict, cfg: ServeConfig) -> dict:
    """Validate a generation request against the served model; returns the normalised job or raises
    RequestError naming the field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    try:
        req = ImageRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        msg = "unrecognized request argument" if err["type"] == "extra_forbidden" else err["msg"]
        raise RequestError(f"{param}: {msg}", param) from None
    prompt = req.prompt.strip()
    if not prompt:
        raise RequestError("prompt: must not be empty", "prompt")
    if len(req.prompt) > cfg.max_prompt_chars:
        raise RequestError(f"prompt: longer than {cfg.max_prompt_chars} characters", "prompt")
    if not 1 <= req.n <= cfg.max_images_per_request:
        raise RequestError(f"n: must be between 1 and {cfg.max_images_per_request}, got {req.n}", "n")
    if req.response_format != "b64_json":
        what = "url responses are not supported (no image store); use b64_json" if req.response_format == "url" \
            else f"must be b64_json, got {req.response_format!r}"
        raise RequestError(f"response_format: {what}", "response_format")
    sizes = supported_sizes(info, cfg)
    size = req.size or sizes[0]
    if size not in sizes:
        raise RequestError(f"size: {size!r} is not supported; supported: {', '.join(sizes)}", "size")
    steps = info["default_steps"] if req.steps is None else req.steps
    if steps not in info["supported_steps"]:
        raise RequestError(f"steps: {steps} is not supported by {info['id']}; supported: "
                           f"{info['supported_steps']}", "steps")
    if req.model is not None and req.model not in (info["id"], info["name"], info["uri"]):
        raise RequestError(f"model: {req.model!r} is not served here; served: {info['id']}", "model", 404,
                           "not_found_error")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise RequestError("seed: must be in [0, 2^63)", "seed")
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "big")
    return {"prompt": prompt, "n": req.n, "steps": steps, "seed": seed,
            "scale": cfg.upscale_factors[sizes.index(size)]}


def supported_sizes(info: dict, cfg: ServeConfig) -> list[str]:
    h, w = info["native_size"]
    return [f"{w * f}x{h * f}" for f in cfg.upscale_factors]


# ---------------------------------------------------------------- the model replica

def _load(uri: str, tracking_uri: str | None, decoder: str | None = None):
    """(pipeline, info) for a model URI or a local pipeline directory, decoding with `decoder` (a location;
    None: the model's own VAE)."""
    import torch

    from .pipeline import TDMPipeline, inference_device
    from .tracking import download_model, resolve_model_version, use_tracking_uri

    if uri.startswith("models:/"):
        use_tracking_uri(tracking_uri)
        mv = resolve_model_version(uri)
        path, name, version = download_model(mv), mv.name, str(mv.version)
    else:
        path, name, version = uri, uri.rstrip("/").split("/")[-1], "local"
    device = inference_device()    # Ray shows a replica a GPU only when it asked for one (num_gpus > 0)
    pipe = TDMPipeline.from_pretrained(path, device=device, decoder=decoder)
    spec = pipe.spec
    steps = spec["step_values"] if spec.get("step_conditioned") else \
        sorted({int(k) for k in (spec.get("timesteps") or {})} | {pipe.default_steps})
    with torch.no_grad():
        height, width = pipe.backbone.decode(torch.zeros(1, *pipe.backbone.latent_shape, device=device)).shape[-2:]
    info = {"id": f"{name}/{version}", "name": name, "version": version, "uri": uri, "kind": pipe.kind,
            "default_steps": pipe.default_steps, "supported_steps": steps, "native_size": [height, width],
            "guidance_scale": pipe.guidance_scale, "decoder": pipe.backbone.decoder_source,
            "decoder_class": type(pipe.backbone.vae).__name__ if pipe.backbone.vae is not None else None}
    return pipe, info


def resolve_version(uri: str, tracking_uri: str | None) -> str | None:
    """The version an alias points at now (None for pinned versions and local directories)."""
    if not (uri.startswith("models:/") and "@" in uri):
        return None
    from .tracking import resolve_model_version, use_tracking_uri

    use_tracking_uri(tracking_uri)
    return str(resolve_model_version(uri).version)


def run_images(pipe, jobs: list[dict], chunk: int) -> list[list[bytes]]:
    """Generate every job's images in network batches of exactly `chunk` images (padding the last
    chunk), so a result never depends on how requests were grouped. Returns PNGs per job."""
    import torch

    from .pipeline import to_png_bytes

    flat = [(j, job["prompt"], job["seed"] + i, job["steps"], job["scale"])
            for j, job in enumerate(jobs) for i in range(job["n"])]
    out: list[list[bytes]] = [[] for _ in jobs]
    for steps in sorted({f[3] for f in flat}):
        items = [f for f in flat if f[3] == steps]
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            padded = part + [part[0]] * (chunk - len(part))
            images = pipe([p for _, p, _, _, _ in padded], num_inference_steps=steps,
                          seeds=[s for _, _, s, _, _ in padded])[:len(part)]
            for (j, _, _, _, scale), img in zip(part, images):
                f = int(scale)
                img = img if f == 1 else torch.nn.functional.interpolate(img[None], scale_factor=f, mode="nearest")[0]
                out[j].extend(to_png_bytes(img[None]))
    return out


def _deployments():
    """Define the deployments lazily, so importing tdm.serve does not need Ray Serve."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    @serve.deployment(name="TDMGenerator", max_ongoing_requests=32, health_check_period_s=5,
                      health_check_timeout_s=60, graceful_shutdown_timeout_s=30)
    class TDMGenerator:
        def __init__(self, config: dict | None = None):
            self._lock = threading.Lock()
            self.cfg = ServeConfig()
            self.current = None            # (pipeline, info), swapped atomically
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
            self.generate.set_max_batch_size(max(cfg.max_batch_size, cfg.max_images_per_request))
            self.generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
            if self.current is None or (cfg.model_uri, cfg.tracking_uri, cfg.decoder) != \
                    (old.model_uri, old.tracking_uri, old.decoder):
                self._swap_to(cfg.model_uri)
            if self._poller is None and cfg.poll_interval_s > 0:
                self._poller = threading.Thread(target=self._poll, daemon=True, name="tdm-registry-poll")
                self._poller.start()

        def _swap_to(self, uri: str) -> None:
            """Load the new model next to the old one, then switch in one assignment."""
            with self._lock:
                pipe, info = _load(uri, self.cfg.tracking_uri, self.cfg.decoder)
                self.current = (pipe, info)
            log.info("tdm: serving %s (%s), decoder %s", info["id"], uri, info["decoder"] or "the model's VAE")

        def _poll(self) -> None:
            while not self._stop.wait(max(self.cfg.poll_interval_s, 0.5)):
                if self.cfg.poll_interval_s <= 0 or self.current is None:
                    continue
                try:
                    version = resolve_version(self.cfg.model_uri, self.cfg.tracking_uri)
                    if version is not None and version != self.current[1]["version"]:
                        self._swap_to(self.cfg.model_uri)
                except Exception as e:  # registry unreachable: keep serving the current model
                    log.warning("tdm: registry poll failed: %s", e)

        def check_health(self) -> None:
            if self.current is None:
                raise RuntimeError("no model loaded")

        def info(self) -> dict | None:
            return None if self.current is None else dict(self.current[1])

        def config(self) -> dict:
            return self.cfg.model_dump()

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=lambda jobs: sum(j["n"] for j in jobs))
        async def generate(self, jobs: list[dict]) -> list[dict]:
            pipe, info = self.current  # one model for the whole batch, even if a swap lands meanwhile
            # The ingress validated each job against the model it last saw; a swap in between can change
            # the supported step counts, so re-check here and answer 400, not 500.
            ok = [j for j in jobs if j["steps"] in info["supported_steps"]]
            # Run on the replica's event loop, not in a worker thread: with a small, Python-bound model a
            # compute thread holds the GIL and starves the loop, requests trickle in one at a time and
            # batches never fill (2 cores: 18 img/s in a thread vs 59 img/s here, 160 queued requests).
            # Requests arriving meanwhile wait in the replica's queue and form the next batch.
            images = iter(run_images(pipe, ok, self.cfg.max_batch_size)) if ok else iter(())
            return [{"images": next(images), "model": info["id"]} if j["steps"] in info["supported_steps"] else
                    {"error": f"steps must be one of {info['supported_steps']} for {info['id']}, got {j['steps']}",
                     "model": info["id"]} for j in jobs]

        def __del__(self):
            self._stop.set()

    app = FastAPI(title="tdm", description="Few-step text-to-image generation (OpenAI Images API compatible)")

    @serve.deployment(name="TDMIngress", max_ongoing_requests=64, max_queued_requests=64)
    @serve.ingress(app)
    class TDMIngress:
        def __init__(self, generator, config: dict | None = None):
            self.generator = generator
            self.cfg = ServeConfig.model_validate(config or {})
            self._info, self._info_at = None, 0.0

        def reconfigure(self, config: dict) -> None:
            self.cfg = ServeConfig.model_validate(config or {})
            self._info_at = 0.0

        async def model_info(self) -> dict | None:
            """The served model's description, refreshed at most once a second: asking the generator on
            every request would put a second round trip in front of each batch slot."""
            if self._info is None or time.monotonic() - self._info_at > 1.0:
                self._info, self._info_at = await self.generator.info.remote(), time.monotonic()
            return self._info

        @app.post("/v1/images/generations")
        async def generations(self, request: Request):
            try:
                info = await self.model_info()
                if info is None:
                    raise RequestError("the model is still loading", None, 503, "server_error")
                job = parse_request(await request.body(), info, self.cfg)
            except RequestError as e:
                return JSONResponse(e.body(), status_code=e.status)
            result = await self.generator.generate.remote(job)
            if "error" in result:
                return JSONResponse(RequestError(result["error"], "steps").body(), status_code=400)
            data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": job["prompt"]}
                    for png in result["images"]]
            return JSONResponse({"created": int(time.time()), "model": result["model"], "seed": job["seed"],
                                 "data": data}, headers={"x-tdm-model": result["model"]})

        @app.get("/v1/models")
        async def models(self):
            info = await self.generator.info.remote()
            data = [] if info is None else [{"id": info["id"], "object": "model", "owned_by": "tdm",
                                             "uri": info["uri"], "kind": info["kind"],
                                             "steps": info["supported_steps"],
                                             "sizes": supported_sizes(info, self.cfg),
                                             # decoder None: the model's own VAE
                                             "decoder": info["decoder"], "decoder_class": info["decoder_class"]}]
            return {"object": "list", "data": data}

        @app.get("/healthz")
        async def healthz(self):
            info = await self.generator.info.remote()
            if info is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            return {"status": "ok", "model": info["id"]}

        @app.exception_handler(Exception)
        async def _unexpected(request, exc):  # never leak a stack trace; still an OpenAI-shaped body
            log.exception("tdm: unexpected error")
            return JSONResponse(RequestError(f"internal error: {type(exc).__name__}", None, 500,
                                             "server_error").body(), status_code=500)

    return TDMGenerator, TDMIngress


def build_app(args: dict[str, Any] | None = None):
    """Application builder: `import_path: tdm.serve:build_app` with `args` = ServeConfig fields plus
    optional `num_replicas`, `num_gpus` and `num_cpus` (per generator replica; the ingress only
    forwards requests and reserves no CPU), and the ingress queue bounds `max_ongoing_requests` and
    `max_queued_requests` (beyond them, requests get HTTP 503 at once)."""
    args = dict(args or {})
    replicas = args.pop("num_replicas", 1)
    gpus = args.pop("num_gpus", 0)
    cpus = args.pop("num_cpus", 1)
    queued = args.pop("max_queued_requests", 64)
    ongoing = args.pop("max_ongoing_requests", 64)
    cfg = ServeConfig.model_validate(args).model_dump()
    TDMGenerator, TDMIngress = _deployments()
    generator = TDMGenerator.options(num_replicas=replicas, user_config=cfg,
                                     ray_actor_options={"num_gpus": gpus, "num_cpus": cpus}).bind()
    return TDMIngress.options(user_config=cfg, max_queued_requests=queued, ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=ongoing).bind(generator)


def serve_config(args: dict[str, Any] | None = None, name: str = "tdm", route_prefix: str = "/",
                 working_dir: str | None = None) -> dict:
    """A Serve config (for `serve deploy` and a RayService `serveConfigV2`) running build_app(args)."""
    app: dict[str, Any] = {"name": name, "route_prefix": route_prefix, "import_path": "tdm.serve:build_app",
                           "args": dict(args or {})}
    if working_dir:
        app["runtime_env"] = {"working_dir": working_dir}
    return {"applications": [app]}
