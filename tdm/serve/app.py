"""The Serve application: builder and Serve config (for `serve deploy` and a RayService serveConfigV2)."""
from __future__ import annotations

from typing import Any

from .config import ServeConfig
from .generator import TDMGenerator
from .ingress import TDMIngress


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
