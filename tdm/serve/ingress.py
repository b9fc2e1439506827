"""The HTTP front: FastAPI routes in OpenAI's shapes, in a Ray Serve deployment that forwards
validated jobs to the generator. Defined at import time, like the generator.

Every answer is JSON in OpenAI's error shape unless it succeeds (README, "Serving: errors"): requests
are authenticated (tdm.serve.auth), bounded in number per replica (503 with Retry-After beyond
max_queued_requests), in body size (413, refused before the body is read in full) and in time (504 at
request_timeout_s, the generator call cancelled so its slot is freed).

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at run
time, and a string annotation makes it take `request: Request` for a query parameter."""
import asyncio
import base64
import logging
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ParamError, public_message
from .auth import APIKeys
from .config import ServeConfig
from .protocol import GenerationJob, RequestError, ServedModel, parse_request, parse_video_request
from .store import JobStore, VideoJob, open_store

log = logging.getLogger("ray.serve")
PLAYGROUND = (Path(__file__).parent / "playground.html").read_text(encoding="utf-8")
#: how long /healthz and a request wait for a generator replica to say what it serves (seconds)
ASK_TIMEOUT_S = 2.0

# /docs and /openapi.json are routes of the deployment below, off unless ServeConfig.enable_docs
app = FastAPI(title="tdm", description="Few-step text-to-image and text-to-video generation (OpenAI Images and "
              "Videos API shapes)", docs_url=None, redoc_url=None, openapi_url=None)


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


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def unavailable(message: str, retry_after_s: float = 1.0) -> RequestError:
    """A 503 telling the client when to try again."""
    return RequestError(message, None, 503, "server_error", {"Retry-After": str(max(1, round(retry_after_s)))})


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from
    Content-Length before reading anything, else while it streams in (chunked uploads); 408 when it
    has not arrived within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError("Content-Length: not a number of bytes")
        if int(declared) > limit:
            raise RequestError(f"request body: {int(declared)} bytes, more than the limit of {limit}", None, 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"request body: more than the limit of {limit} bytes", None, 413)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"request body: not received within {timeout_s:g} s (body_timeout_s)", None,
                           408) from None
    except ClientDisconnect:
        raise RequestError("request body: the client closed the connection before sending it all") from None
    return b"".join(chunks)


async def _awaited(response):
    return await response


async def ask(method, *args, timeout_s: float | None = None):
    """Call a generator method; the call is cancelled when the caller is (deadline, client gone) or past
    `timeout_s`, so its slot in the generator's queue is freed."""
    response = method.remote(*args)
    try:
        return await asyncio.wait_for(_awaited(response), timeout_s)
    except BaseException:
        response.cancel()
        raise


@serve.deployment(name="TDMIngress")
@serve.ingress(app)
class TDMIngress:
    def __init__(self, generator, config: dict | None = None):
        self.generator = generator
        self.cfg = ServeConfig.model_validate(config or {})
        self.keys = APIKeys(self.cfg.api_keys_file, required=self.cfg.require_api_key)
        self._model: ServedModel | None = None
        self._model_at = 0.0
        self._refresh: asyncio.Task | None = None    # a background refresh of _model
        self._held = 0                                # generation requests in this replica now
        self.store: JobStore = self._open_store()
        self._tasks: set[asyncio.Task] = set()      # running video jobs (a reference keeps each alive)

    def reconfigure(self, config: dict) -> None:
        old = self.cfg
        self.cfg = ServeConfig.model_validate(config or {})
        self._model_at = 0.0
        if (old.api_keys_file, old.require_api_key) != (self.cfg.api_keys_file, self.cfg.require_api_key):
            self.keys = APIKeys(self.cfg.api_keys_file, required=self.cfg.require_api_key)
        keys = ("video_store", "video_store_max_jobs", "video_store_ttl_s")
        if any(getattr(old, k) != getattr(self.cfg, k) for k in keys):
            self.store = self._open_store()

    def _open_store(self) -> JobStore:
        c = self.cfg
        return open_store(c.video_store, c.video_store_max_jobs, c.video_store_ttl_s)

    def _authorize(self, request: Request) -> None:
        if not self.keys.check(request.headers.get("authorization")):
            raise RequestError("invalid or missing API key: send Authorization: Bearer <key>", None, 401,
                               "invalid_request_error", {"WWW-Authenticate": "Bearer"}, "invalid_api_key")

    async def _guarded(self, request: Request, work, *, heavy: bool = False) -> Response:
        """Run a route's `work()` authenticated, within the deadline and (heavy: a generation) within the
        replica's bound, every refusal in OpenAI's error shape."""
        try:
            self._authorize(request)
            if heavy and self._held >= self.cfg.max_queued_requests:
                raise unavailable(f"overloaded: {self._held} requests in progress; try again shortly")
            self._held += heavy
            try:
                async with asyncio.timeout(self.cfg.request_timeout_s):
                    return await work()
            finally:
                self._held -= heavy
        except TimeoutError:
            return _error(RequestError(f"the request did not finish within {self.cfg.request_timeout_s:g} s "
                                       "(request_timeout_s)", None, 504, "server_error"))
        except ParamError as e:      # refused by the model that ran the batch (a swap landed meanwhile)
            return _error(RequestError.from_param(e))
        except RequestError as e:
            return _error(e)
        except BackPressureError:
            return _error(unavailable("overloaded: the model replicas' queues are full; try again shortly"))
        except DeploymentUnavailableError:
            return _error(unavailable("no model replica is running; try again shortly", 5))
        except RayActorError:       # the model replica died under this request; Serve starts another
            log.warning("tdm: a model replica died during a request")
            return _error(unavailable("the model replica serving this request failed; try again shortly", 5))

    async def _refresh_model(self) -> ServedModel | None:
        try:
            self._model = await ask(self.generator.info, timeout_s=ASK_TIMEOUT_S)
        except (TimeoutError, DeploymentUnavailableError, BackPressureError, RayActorError):
            self._model = None
        self._model_at = time.monotonic()
        return self._model

    async def served_model(self, refresh: bool = False) -> ServedModel:
        """The served model, as the generator last said (asking on every request would put a second round
        trip in front of each batch slot): a view older than a second is refreshed in the background while
        requests go on with it; 503 when no model is known to be ready."""
        stale = time.monotonic() - self._model_at > 1.0
        if refresh or self._model is None:
            await self._refresh_model()
        elif stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._refresh_model())
        if self._model is None:
            raise unavailable("no model is ready yet (loading, or its version failed to load: see /healthz)",
                              self.cfg.load_retry_initial_s)
        return self._model

    async def _validated(self, request: Request, parse):
        """The body parsed against the served model; a request naming a version the cached model view
        does not know is checked once more against a fresh one (a swap may just have landed)."""
        raw = await read_body(request, self.cfg.max_body_bytes, self.cfg.body_timeout_s)
        try:
            return parse(raw, await self.served_model())
        except RequestError as e:
            if e.param != "model" or e.status != 404:
                raise
        return parse(raw, await self.served_model(refresh=True))

    @app.post("/v1/images/generations")
    async def generations(self, request: Request):
        async def work():
            job = await self._validated(request, lambda raw, model: parse_request(raw, model, self.cfg))
            result = await ask(self.generator.generate, job)
            if result.error is not None:
                raise result.error
            prompt = result.revised_prompt or job.prompt
            data = [{"b64_json": base64.b64encode(img).decode(), "revised_prompt": prompt} for img in result.images]
            return JSONResponse({"created": int(time.time()), "model": result.model_id, "seed": job.seed,
                                 "output_format": job.output_format, "data": data},
                                headers={"x-tdm-model": result.model_id})
        return await self._guarded(request, work, heavy=True)

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
        return await self._guarded(request, lambda: self._create_video(request), heavy=True)

    async def _create_video(self, request: Request):
        job, _ = await self._validated(request, lambda raw, model: parse_video_request(raw, model, self.cfg))
        model = await self.served_model()
        h, w = model.native_size
        record = VideoJob(id=VideoJob.new_id(), model=model.id, prompt=job.prompt, seconds=model.seconds,
                          size=f"{w * job.scale}x{h * job.scale}", seed=job.seed, steps=job.params.steps,
                          num_frames=int(model.spec.frames or 0))
        try:
            await asyncio.to_thread(self.store.put, record)
        except Exception as e:  # noqa: BLE001 - the store is unreachable: this request fails, nothing else
            log.warning("tdm: video store write failed: %s", e)
            raise unavailable(f"the video store is unavailable: {public_message(e)}", 5) from None
        task = asyncio.create_task(self._run_video(record, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse(self._video_body(record), headers={"x-tdm-model": model.id})

    async def _run_video(self, record: VideoJob, job: GenerationJob) -> None:
        """Generate a video job on the generator (batched with concurrent jobs) and store the outcome; a
        failure is written on the job, never raised into another request."""
        try:
            await asyncio.to_thread(self.store.put, replace(record, status="in_progress"))
            result = await ask(self.generator.generate, job)
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
                    "code": "generation_failed", "message": f"generation failed: {public_message(e)}"}))
            except Exception as store_error:  # noqa: BLE001 - the store itself is down; the job times out
                log.warning("tdm: could not record the failure of %s: %s", record.id, store_error)

    async def _stored(self, video_id: str) -> VideoJob:
        job = await asyncio.to_thread(self.store.get, video_id)
        if job is None:
            raise RequestError(f"video_id: no video job {video_id!r} (unknown, or expired after "
                               f"{self.cfg.video_store_ttl_s:g} s)", "video_id", 404, "not_found_error")
        return job

    @app.get("/v1/videos/{video_id}")
    async def get_video(self, video_id: str, request: Request):
        async def work():
            return JSONResponse(self._video_body(await self._stored(video_id)))
        return await self._guarded(request, work)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(self, video_id: str, request: Request):
        return await self._guarded(request, lambda: self._video_content(video_id))

    async def _video_content(self, video_id: str):
        body = self._video_body(await self._stored(video_id))
        if body["status"] != "completed":
            why = f": {body['error']['message']}" if body.get("error") else ""
            raise RequestError(f"video_id: {video_id} is {body['status']}{why}; its content exists once it "
                               f"is completed", "video_id", 409)
        content = await asyncio.to_thread(self.store.content, video_id)
        if content is None:
            raise RequestError(f"video_id: the content of {video_id} has expired", "video_id", 404,
                               "not_found_error")
        return Response(content, media_type="video/mp4",
                        headers={"content-disposition": f'inline; filename="{video_id}.mp4"'})

    @app.post("/v1/images/edits")
    @app.post("/v1/images/variations")
    async def not_supported(self, request: Request):
        async def work():
            raise RequestError(f"{request.url.path} is not supported: tdm models generate from text only; use "
                               "POST /v1/images/generations", None, 501, "not_supported_error")
        return await self._guarded(request, work)

    async def _status(self) -> dict:
        """A generator replica's status (tdm.serve.generator.TDMGenerator.status), or why there is none."""
        try:
            return await ask(self.generator.status, timeout_s=ASK_TIMEOUT_S)
        except (TimeoutError, DeploymentUnavailableError, BackPressureError, RayActorError):
            return {"serving": None, "source": None, "pending": None, "counts": None,
                    "last_error": {"model": None, "message": "no generator replica answered within "
                                   f"{ASK_TIMEOUT_S:g} s (starting, or loading its model)", "at": int(time.time())}}

    @app.get("/v1/models")
    async def models(self, request: Request):
        async def work():
            status = await self._status()
            model = await self.served_model(refresh=True) if status["serving"] else None
            entries = [] if model is None else [model.models_entry(self.cfg.upscale_factors)]
            return JSONResponse({"object": "list", "data": entries, **status})
        return await self._guarded(request, work)

    @app.get("/")
    async def playground(self):
        """The playground page (tdm/serve/playground.html): plain HTML and JavaScript, no CDN. Open: it
        holds no data, and asks for a key when the API wants one."""
        return HTMLResponse(PLAYGROUND)

    @app.get("/healthz")
    async def healthz(self):
        """Open (no key), answers within ASK_TIMEOUT_S: 200 while a model is served, else 503."""
        status = await self._status()
        if status["serving"]:
            return JSONResponse({"status": "ok", "model": status["serving"], **status})
        state = "loading" if status["pending"] or status["last_error"] is None else "unavailable"
        return JSONResponse({"status": state, "model": None, **status}, status_code=503,
                            headers={"Retry-After": "5"})

    def _docs(self, request: Request, page):
        """/docs and /openapi.json: 404 unless enable_docs, and keyed like the API."""
        async def work():
            if not self.cfg.enable_docs:
                raise RequestError(f"no route {request.url.path[:200]} (enable_docs is off)", None, 404,
                                   "not_found_error")
            return page()
        return self._guarded(request, work)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        return await self._docs(request, lambda: JSONResponse(app.openapi()))

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        return await self._docs(request, lambda: get_swagger_ui_html(openapi_url="openapi.json", title="tdm API"))
