"""The HTTP front: FastAPI routes in OpenAI's shapes, in a Ray Serve deployment that forwards
validated jobs to the generator. Defined at import time, like the generator.

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at run
time, and a string annotation makes it take `request: Request` for a query parameter."""
import base64
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ..errors import ParamError
from .config import ServeConfig
from .protocol import RequestError, ServedModel, parse_request

log = logging.getLogger("ray.serve")

app = FastAPI(title="tdm", description="Few-step text-to-image generation (OpenAI Images API compatible)")


@serve.deployment(name="TDMIngress", max_ongoing_requests=64, max_queued_requests=64)
@serve.ingress(app)
class TDMIngress:
    def __init__(self, generator, config: dict | None = None):
        self.generator = generator
        self.cfg = ServeConfig.model_validate(config or {})
        self._model: ServedModel | None = None
        self._model_at = 0.0

    def reconfigure(self, config: dict) -> None:
        self.cfg = ServeConfig.model_validate(config or {})
        self._model_at = 0.0

    async def served_model(self) -> ServedModel | None:
        """The served model, refreshed at most once a second: asking the generator on every request would
        put a second round trip in front of each batch slot."""
        if self._model is None or time.monotonic() - self._model_at > 1.0:
            self._model, self._model_at = await self.generator.info.remote(), time.monotonic()
        return self._model

    @app.post("/v1/images/generations")
    async def generations(self, request: Request):
        try:
            model = await self.served_model()
            if model is None:
                raise RequestError("the model is still loading", None, 503, "server_error")
            job = parse_request(await request.body(), model, self.cfg)
            result = await self.generator.generate.remote(job)
            if result.error is not None:
                raise result.error
        except ParamError as e:      # refused by the model that ran the batch (a swap landed meanwhile)
            e = RequestError.from_param(e)
            return JSONResponse(e.body(), status_code=e.status)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": job.prompt} for png in result.images]
        return JSONResponse({"created": int(time.time()), "model": result.model_id, "seed": job.seed, "data": data},
                            headers={"x-tdm-model": result.model_id})

    @app.get("/v1/models")
    async def models(self):
        model = await self.generator.info.remote()
        return {"object": "list", "data": [] if model is None else [model.models_entry(self.cfg.upscale_factors)]}

    @app.get("/healthz")
    async def healthz(self):
        model = await self.generator.info.remote()
        if model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": model.id}


@app.exception_handler(Exception)
async def _unexpected(request, exc):  # noqa: ARG001 - FastAPI's handler signature; never leak a stack trace
    log.exception("tdm: unexpected error")
    return JSONResponse(RequestError(f"internal error: {type(exc).__name__}", None, 500, "server_error").body(),
                        status_code=500)
