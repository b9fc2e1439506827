"""The HTTP front: FastAPI routes in OpenAI's shapes, in a Ray Serve deployment that forwards
validated jobs to the generator. Defined at import time, like the generator.

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at run
time, and a string annotation makes it take `request: Request` for a query parameter."""
import asyncio
import base64
import logging
import time
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ParamError, first_line
from .config import ServeConfig
from .protocol import GenerationJob, RequestError, ServedModel, parse_request, parse_video_request
from .store import JobStore, VideoJob, open_store

log = logging.getLogger("ray.serve")

app = FastAPI(title="tdm", description="Few-step text-to-image and text-to-video generation (OpenAI Images and "
              "Videos API shapes)")


# Registered before serve.ingress(app) below: the deployment takes the app as it is then.
@app.exception_handler(StarletteHTTPException)
async def _http_error(request, exc):
    """FastAPI's own refusals (unknown route 404, wrong method 405) in OpenAI's error shape."""
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    path = request.url.path[:200]  # echoed back: bounded
    what = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}
    err = RequestError(what.get(exc.status_code, str(exc.detail)), None, exc.status_code, kind)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request, exc):  # noqa: ARG001 - FastAPI's handler signature; never leak a stack trace
    # the log has the exception; the body names nothing of it (no type, no message, no trace)
    log.exception("tdm: unexpected error")
    return JSONResponse(RequestError("internal error", None, 500, "server_error").body(), status_code=500)


@serve.deployment(name="TDMIngress", max_ongoing_requests=64, max_queued_requests=64)
@serve.ingress(app)
class TDMIngress:
    def __init__(self, generator, config: dict | None = None):
        self.generator = generator
        self.cfg = ServeConfig.model_validate(config or {})
        self._model: ServedModel | None = None
        self._model_at = 0.0
        self.store: JobStore = self._open_store()
        self._tasks: set[asyncio.Task] = set()      # running video jobs (a reference keeps each alive)

    def reconfigure(self, config: dict) -> None:
        old = self.cfg
        self.cfg = ServeConfig.model_validate(config or {})
        self._model_at = 0.0
        keys = ("video_store", "video_store_max_jobs", "video_store_ttl_s")
        if any(getattr(old, k) != getattr(self.cfg, k) for k in keys):
            self.store = self._open_store()

    def _open_store(self) -> JobStore:
        c = self.cfg
        return open_store(c.video_store, c.video_store_max_jobs, c.video_store_ttl_s)

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
        data = [{"b64_json": base64.b64encode(img).decode(), "revised_prompt": job.prompt} for img in result.images]
        return JSONResponse({"created": int(time.time()), "model": result.model_id, "seed": job.seed,
                             "output_format": job.output_format, "data": data},
                            headers={"x-tdm-model": result.model_id})

    # ------------------------------------------------------------------ videos (jobs)
    def _video_body(self, job: VideoJob) -> dict:
        """The API's video object: the stored job, timed out if its runner vanished, with its expiry."""
        if job.status in ("queued", "in_progress") and time.time() - job.created_at > self.cfg.video_job_timeout_s:
            job = replace(job, status="failed", error={"code": "timeout", "message": "the job did not finish "
                                                       f"within {self.cfg.video_job_timeout_s:g} s"})
        body = job.to_dict()
        body["progress"] = 100 if job.status == "completed" else 0
        body["expires_at"] = int(job.created_at + self.cfg.video_store_ttl_s)
        return body

    @app.post("/v1/videos")
    async def create_video(self, request: Request):
        try:
            model = await self.served_model()
            if model is None:
                raise RequestError("the model is still loading", None, 503, "server_error")
            job, _ = parse_video_request(await request.body(), model, self.cfg)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        h, w = model.native_size
        record = VideoJob(id=VideoJob.new_id(), model=model.id, prompt=job.prompt, seconds=model.seconds,
                          size=f"{w * job.scale}x{h * job.scale}", seed=job.seed, steps=job.params.steps,
                          num_frames=int(model.spec.frames or 0))
        try:
            await asyncio.to_thread(self.store.put, record)
        except Exception as e:  # noqa: BLE001 - the store is unreachable: this request fails, nothing else
            log.warning("tdm: video store write failed: %s", e)
            err = RequestError(f"the video store is unavailable: {first_line(e)}", None, 503, "server_error")
            return JSONResponse(err.body(), status_code=503)
        task = asyncio.create_task(self._run_video(record, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse(self._video_body(record), headers={"x-tdm-model": model.id})

    async def _run_video(self, record: VideoJob, job: GenerationJob) -> None:
        """Generate a video job on the generator (batched with concurrent jobs) and store the outcome; a
        failure is written on the job, never raised into another request."""
        try:
            await asyncio.to_thread(self.store.put, replace(record, status="in_progress"))
            result = await self.generator.generate.remote(job)
            if result.error is not None:
                done = record.finished(False, {"code": "invalid_request", "message": RequestError.from_param(
                    result.error).message})
                await asyncio.to_thread(self.store.put, replace(done, model=result.model_id))
            else:
                done = replace(record.finished(True), model=result.model_id)
                await asyncio.to_thread(self.store.put, done, result.images[0])
        except Exception as e:  # noqa: BLE001 - any failure of this job is reported on this job
            log.warning("tdm: video job %s failed: %s", record.id, e)
            try:
                await asyncio.to_thread(self.store.put, record.finished(False, {
                    "code": "generation_failed", "message": f"{type(e).__name__}: {first_line(e)}"}))
            except Exception as store_error:  # noqa: BLE001 - the store itself is down; the job times out
                log.warning("tdm: could not record the failure of %s: %s", record.id, store_error)

    async def _stored(self, video_id: str) -> VideoJob:
        job = await asyncio.to_thread(self.store.get, video_id)
        if job is None:
            raise RequestError(f"video_id: no video job {video_id!r} (unknown, or expired after "
                               f"{self.cfg.video_store_ttl_s:g} s)", "video_id", 404, "not_found_error")
        return job

    @app.get("/v1/videos/{video_id}")
    async def get_video(self, video_id: str):
        try:
            return JSONResponse(self._video_body(await self._stored(video_id)))
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(self, video_id: str):
        try:
            body = self._video_body(await self._stored(video_id))
            if body["status"] != "completed":
                why = f": {body['error']['message']}" if body.get("error") else ""
                raise RequestError(f"video_id: {video_id} is {body['status']}{why}; its content exists once it "
                                   f"is completed", "video_id", 409)
            content = await asyncio.to_thread(self.store.content, video_id)
            if content is None:
                raise RequestError(f"video_id: the content of {video_id} has expired", "video_id", 404,
                                   "not_found_error")
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return Response(content, media_type="video/mp4",
                        headers={"content-disposition": f'inline; filename="{video_id}.mp4"'})

    @app.post("/v1/images/edits")
    @app.post("/v1/images/variations")
    async def not_supported(self, request: Request):
        err = RequestError(f"{request.url.path} is not supported: tdm models generate from text only; use "
                           "POST /v1/images/generations", None, 501, "not_supported_error")
        return JSONResponse(err.body(), status_code=501)

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
