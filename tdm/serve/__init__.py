"""Ray Serve: batched few-step generation from the MLflow registry behind an OpenAI-style images API.

  HTTP -> TDMIngress (ingress.py: FastAPI; requests validated once, against the served ModelSpec)
       -> TDMGenerator (generator.py: model replica, @serve.batch, registry polling, hot swap)

- `POST /v1/images/generations` {prompt, n, size, response_format="b64_json", model?, steps?, seed?}
  -> {"created", "model", "seed", "data": [{"b64_json", "revised_prompt"}]} and header `x-tdm-model`.
- `GET /v1/models` lists what is served (ModelSpec.models_entry, with the decoder in use); `GET /healthz`
  is 200 only once a model is loaded.
- The generator serves `model_uri` (default models:/tdm-student@champion). It polls the registry every
  `poll_interval_s`; when the alias moves it loads the new version beside the old one and swaps
  atomically, so in-flight and queued requests never fail. A `user_config` change (serve deploy /
  RayService serveConfigV2) reconfigures the same replicas in place.
- `decoder` (e.g. madebyollin/taesd) decodes with that autoencoder instead of the model's own VAE, for
  every version served; changing it reloads the model.
- Batching never changes results: image i of a request is seeded (seed + i) and the network always
  runs on chunks of exactly `max_batch_size` images (padded), so an image's numerics do not depend
  on which other requests shared its batch.

`build_app(args)` (app.py) is the application builder used by `pipelines/serve.py`, `serve deploy`
configs and the RayService `serveConfigV2` (import path `tdm.serve:build_app`, see `serve_config`).
"""
from .app import build_app, serve_config
from .config import ServeConfig

__all__ = ["ServeConfig", "build_app", "serve_config"]
