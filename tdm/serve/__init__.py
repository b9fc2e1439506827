"""Ray Serve: batched few-step generation from the MLflow registry behind an OpenAI-style images API.

  HTTP -> TDMIngress (ingress.py: FastAPI; requests validated once, against the served ModelSpec)
       -> TDMGenerator (generator.py: model replica, @serve.batch, registry polling, hot swap)

- `POST /v1/images/generations` {prompt, n, size, response_format="b64_json", model?, steps?, seed?, ...}
  -> {"created", "model", "seed", "data": [{"b64_json", "revised_prompt"}]} and header `x-tdm-model`;
  `POST /v1/videos` for a video model; `GET /` the playground page (playground.html).
- Requests are authenticated (auth.py: API keys from a file or $TDM_API_KEYS), bounded in body size,
  time and number per replica, and every refusal is OpenAI-shaped JSON (ingress.py).
- `GET /v1/models` and `GET /healthz` report the serving version, a pending one and the last error.
- The generator serves `model_uri` (default models:/tdm-student@champion). It polls the registry every
  `poll_interval_s`; when the alias moves it loads the new version beside the old one and swaps
  atomically, so in-flight and queued requests never fail. A version that fails to load never replaces
  the served one and is retried with back-off; with the registry down it serves the newest cached
  version. A `user_config` change (serve deploy / RayService serveConfigV2) reconfigures in place.
- `decoder` (e.g. madebyollin/taesd) decodes with that autoencoder instead of the model's own VAE.
- Image i of a request is seeded (seed + i); a network batch is padded to its power-of-two bucket, or
  with `batch_invariant` to exactly `max_batch_size`, so an image's numerics never depend on which other
  requests shared its batch (README, "Serving: batching").

`build_app(args)` (app.py) is the application builder used by `pipelines/serve.py`, `serve deploy`
configs and the RayService `serveConfigV2` (import path `tdm.serve:build_app`, see `serve_config`).
"""
from .app import build_app, serve_config
from .config import ServeConfig

__all__ = ["ServeConfig", "build_app", "serve_config"]
