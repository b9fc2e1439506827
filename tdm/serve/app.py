"""The Serve application: builder and Serve config (for `serve deploy` and a RayService serveConfigV2)."""
from __future__ import annotations

from typing import Any

from .config import ServeConfig, ServeResources
from .generator import TDMGenerator
from .ingress import TDMIngress

#: concurrent cheap requests (health, models, video status) an ingress replica takes beyond its bound
INGRESS_HEADROOM = 32


def deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """The Serve options each deployment gets from the serving config (README, "Serving: batching"):
    - a generator replica takes two batches' worth of jobs (one running, one filling), so a batch of
      max_batch_size can always fill, plus the queue bound: jobs wait inside the replica, where the next
      batch is formed, and the ingress's small calls (info, status) are never queued behind them in
      Ray's router; beyond that Ray's queue (max_queued_requests) answers BackPressureError (a JSON 503);
    - the ingress bounds generation requests itself (503 JSON with Retry-After at max_queued_requests),
      so Ray's own limits sit above that bound and its plain-text 503 is never what a client sees."""
    per_batch = max(cfg.max_batch_size, cfg.max_images_per_request)
    return {"TDMGenerator": {"max_ongoing_requests": 2 * per_batch + cfg.max_queued_requests,
                             "max_queued_requests": cfg.max_queued_requests},
            "TDMIngress": {"max_ongoing_requests": cfg.max_queued_requests + INGRESS_HEADROOM,
                           "max_queued_requests": -1}}


def build_app(args: dict[str, Any] | None = None):
    """Application builder: `import_path: tdm.serve:build_app` with `args` = ServeConfig fields plus
    optional `num_replicas`, `num_gpus` and `num_cpus` (per generator replica; the ingress only
    forwards requests and reserves no CPU). Queue bounds follow from the config (deployment_options)."""
    args = dict(args or {})
    res = ServeResources.model_validate({k: args.pop(k) for k in list(args) if k in ServeResources.model_fields})
    config = ServeConfig.model_validate(args)
    cfg, opts = config.model_dump(), deployment_options(config)
    generator = TDMGenerator.options(num_replicas=res.num_replicas, user_config=cfg, **opts["TDMGenerator"],
                                     ray_actor_options={"num_gpus": res.num_gpus, "num_cpus": res.num_cpus}).bind()
    return TDMIngress.options(user_config=cfg, ray_actor_options={"num_cpus": 0},
                              **opts["TDMIngress"]).bind(generator)


def serve_config(args: dict[str, Any] | None = None, name: str = "tdm", route_prefix: str = "/",
                 working_dir: str | None = None) -> dict:
    """A Serve config (for `serve deploy` and a RayService `serveConfigV2`) running build_app(args)."""
    app: dict[str, Any] = {"name": name, "route_prefix": route_prefix, "import_path": "tdm.serve:build_app",
                           "args": dict(args or {})}
    if working_dir:
        app["runtime_env"] = {"working_dir": working_dir}
    return {"applications": [app]}
