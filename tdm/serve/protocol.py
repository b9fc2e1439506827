"""The API's request and response shapes, and the typed objects the ingress hands the generator.

A request is validated once, in the ingress, against the ModelSpec of the model being served
(`parse_request` -> `GenerationJob`). Every client error is a `RequestError`: an HTTP status and an
OpenAI-shaped body naming the parameter. Pure: no Ray, no FastAPI.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from ..errors import ParamError
from ..spec import GenerationParams, ModelSpec
from .config import ServeConfig

#: library parameter names -> the API's names for them
API_PARAMS = {"num_inference_steps": "steps", "guidance_scale": "guidance_scale", "prompt": "prompt"}


class ImageRequest(BaseModel):
    """OpenAI Images API `create` body, plus the extensions `steps` and `seed`. `output_format` and
    `output_compression` are honoured; `quality`, `style`, `background` and `moderation` are checked
    against the API's values and otherwise ignored (README, "Serving")."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: Optional[StrictStr] = None
    n: StrictInt = 1
    size: Optional[StrictStr] = None
    response_format: StrictStr = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Optional[Annotated[StrictInt, Field(ge=0, le=100)]] = None
    quality: Optional[Literal["auto", "standard", "hd", "low", "medium", "high"]] = None
    style: Optional[Literal["vivid", "natural"]] = None
    background: Optional[Literal["auto", "transparent", "opaque"]] = None
    moderation: Optional[Literal["auto", "low"]] = None
    steps: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    user: Optional[StrictStr] = None        # accepted for OpenAI client compatibility, unused


class VideoRequest(BaseModel):
    """`POST /v1/videos` body (OpenAI's videos API, as vLLM-Omni and FastVideo serve it): the duration as
    `seconds` or `num_frames`, plus the extensions `steps` and `seed`."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: Optional[StrictStr] = None
    seconds: Optional[StrictStr | StrictInt | StrictFloat] = None
    num_frames: Optional[StrictInt] = None
    size: Optional[StrictStr] = None
    steps: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    user: Optional[StrictStr] = None


class RequestError(ValueError):
    """A client error: HTTP status, OpenAI error message and the offending parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.headers, self.code = headers or {}, code

    @classmethod
    def from_param(cls, err: ParamError) -> "RequestError":
        """A model's refusal of a generation parameter, under the parameter's API name."""
        param = API_PARAMS.get(err.param, err.param)
        return cls(f"{param}: {err.detail}", param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """The model a generator replica serves: its registry identity and its ModelSpec."""

    id: str                 # "<name>/<version>", or "<dir name>/local"
    name: str
    version: str
    uri: str                # as configured (model_uri)
    spec: ModelSpec

    @property
    def is_video(self) -> bool:
        return self.spec.frames is not None

    @property
    def seconds(self) -> str:
        """A video's duration, as the videos API reports it (frames / fps, e.g. "1.25")."""
        return f"{self.spec.frames / (self.spec.fps or 8.0):g}"

    @property
    def native_size(self) -> list[int]:
        """[height, width] of a generated image before upscaling."""
        if self.spec.image_size is None:
            raise ValueError(f"{self.id}: the model spec does not record its image size")
        return list(self.spec.image_size)

    @property
    def decoder(self) -> str | None:
        """The replacement decoder in use (None: the model's own VAE, or a pixel-space model)."""
        return self.spec.decoder.source if self.spec.decoder else None

    @property
    def decoder_class(self) -> str | None:
        return self.spec.decoder.class_name if self.spec.decoder else None

    def sizes(self, upscale_factors: list[int]) -> list[str]:
        """The sizes this model answers in ("WxH"), one per upscale factor."""
        h, w = self.native_size
        return [f"{w * f}x{h * f}" for f in upscale_factors]

    def models_entry(self, upscale_factors: list[int]) -> dict:
        return self.spec.models_entry(self.id, self.uri, self.sizes(upscale_factors))


@dataclass(frozen=True)
class GenerationJob:
    """One validated request: `n` images (or one video) of `prompt`, sample i seeded `seed + i`, upscaled
    `scale` x."""

    prompt: str
    n: int
    params: GenerationParams
    seed: int
    scale: int
    model_id: str           # the model it was validated against
    video: bool = False     # an MP4 (the model's frames) instead of images
    output_format: str = "png"                  # images: png, jpeg or webp (tdm.images.IMAGE_FORMATS)
    output_compression: Optional[int] = None    # jpeg/webp: 0-100
    pinned: bool = False    # the request named model_id exactly: no other version may answer it


@dataclass(frozen=True)
class GenerationResult:
    """A job's PNGs (or MP4) and the model that made them, or the error that refused it."""

    model_id: str
    images: tuple[bytes, ...] = ()
    error: Optional[ParamError] = None
    revised_prompt: Optional[str] = None    # the part of the prompt the model read (Backbone.readable_prompt)


#: deepest nesting a request body may have (no API field nests beyond two levels)
MAX_DEPTH = 32


class _NonFinite:
    """What json.loads makes of NaN, Infinity and -Infinity (it reads them by default): no API field takes
    them, and _body names the field that holds one."""

    def __init__(self, name: str):
        self.name = name


def _non_finite_in(value) -> str | None:
    """The first NaN/Infinity token (a _NonFinite) anywhere inside a parsed JSON value, or None."""
    if isinstance(value, _NonFinite):
        return value.name
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((n for n in map(_non_finite_in, items) if n is not None), None)


def _too_deep(text: str, limit: int = MAX_DEPTH) -> tuple[bool, str | None]:
    """Whether a JSON text nests deeper than `limit`, and the top-level key under which it does (None when
    the top level itself is the culprit). A scan, not a parse: json.loads would recurse once per level."""
    if text.count("[") + text.count("{") <= limit:
        return False, None
    depth, in_str, esc, start, last, key = 0, False, False, 0, None, None
    for i, c in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 1:
                    last = text[start:i]
        elif c == '"':
            in_str, start = True, i + 1
        elif c == ":" and depth == 1:
            key = last
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True, key
        elif c in "]}":
            depth -= 1
    return False, None


def _check_text(param: str, value: str) -> None:
    """A string the model can be handed: encodable as UTF-8 (JSON's \ud800 escape is not) and free of
    control characters other than tab and newlines."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param}: holds an unpaired UTF-16 surrogate (not encodable text)", param) from None
    bad = next((c for c in value if (ord(c) < 32 and c not in "\t\n\r") or 0x7f <= ord(c) < 0xa0), None)
    if bad is not None:
        raise RequestError(f"{param}: holds the control character U+{ord(bad):04X}", param)


def _body(raw: bytes, schema: type[BaseModel]):
    """The request body validated as `schema`, every string in it checked (`_check_text`); RequestError
    naming the field."""
    try:
        deep, key = _too_deep(raw.decode("utf-8"))
    except UnicodeDecodeError:
        deep, key = False, None         # json.loads says what is wrong with the bytes
    if deep:
        raise RequestError(f"{key or 'request body'}: nested more than {MAX_DEPTH} levels deep", key)
    try:
        body = json.loads(raw, parse_constant=_NonFinite)
    except RecursionError:              # not valid JSON past the scan's depth, but still too deep to read
        raise RequestError(f"request body: nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    for name, value in body.items():
        bad = _non_finite_in(value)
        if bad is not None:
            raise RequestError(f"{name}: holds {bad}; numbers must be finite", name)
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None  # a top-level field (a union adds its member)
        msg = "unrecognized request argument" if err["type"] == "extra_forbidden" else err["msg"]
        raise RequestError(f"{param or 'request body'}: {msg}", param) from None
    for name, value in req:
        if isinstance(value, str):
            _check_text(name, value)
    return req


def _common(req, model: ServedModel, cfg: ServeConfig):
    """Checks every request shares: prompt, model, steps, seed, size. Returns (prompt, params, seed, scale,
    pinned): pinned when `model` names the served version exactly (not its name or alias)."""
    prompt = req.prompt.strip()
    if not prompt:
        raise RequestError("prompt: must not be empty", "prompt")
    if len(req.prompt) > cfg.max_prompt_chars:
        raise RequestError(f"prompt: longer than {cfg.max_prompt_chars} characters", "prompt")
    if req.model is not None and req.model not in (model.id, model.name, model.uri):
        raise RequestError(f"model: {req.model!r} is not served here; served: {model.id}", "model", 404,
                           "not_found_error")
    sizes = model.sizes(cfg.upscale_factors)
    size = req.size or sizes[0]
    if size not in sizes:
        raise RequestError(f"size: {size!r} is not supported; supported: {', '.join(sizes)}", "size")
    try:
        params = model.spec.check_generation(req.steps)
    except ParamError as e:
        raise RequestError.from_param(e) from None
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise RequestError("seed: must be in [0, 2^63)", "seed")
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "big")
    return prompt, params, seed, cfg.upscale_factors[sizes.index(size)], req.model == model.id


def parse_request(raw: bytes, model: ServedModel, cfg: ServeConfig) -> GenerationJob:
    """Validate an image generation request against the served model; returns the job or raises
    RequestError naming the field."""
    req = _body(raw, ImageRequest)
    if model.is_video:
        raise RequestError(f"model: {model.id} generates videos; use POST /v1/videos", "model")
    if not 1 <= req.n <= cfg.max_images_per_request:
        raise RequestError(f"n: must be between 1 and {cfg.max_images_per_request}, got {req.n}", "n")
    if req.response_format != "b64_json":
        what = "url responses are not supported (no image store); use b64_json" if req.response_format == "url" \
            else f"must be b64_json, got {req.response_format!r}"
        raise RequestError(f"response_format: {what}", "response_format")
    if req.output_compression is not None and req.output_format == "png":
        raise RequestError("output_compression: applies to jpeg and webp only (png is lossless)",
                           "output_compression")
    prompt, params, seed, scale, pinned = _common(req, model, cfg)
    return GenerationJob(prompt=prompt, n=req.n, params=params, seed=seed, scale=scale, model_id=model.id,
                         output_format=req.output_format, output_compression=req.output_compression, pinned=pinned)


def parse_video_request(raw: bytes, model: ServedModel, cfg: ServeConfig) -> tuple[GenerationJob, VideoRequest]:
    """Validate a `POST /v1/videos` request against the served model: a video model, and a duration
    (`seconds` or `num_frames`) equal to the model's, which generates a fixed number of frames."""
    req = _body(raw, VideoRequest)
    if not model.is_video:
        raise RequestError(f"model: {model.id} generates images; use POST /v1/images/generations", "model")
    frames, fps = model.spec.frames, model.spec.fps or 8.0
    if req.num_frames is not None and req.num_frames != frames:
        raise RequestError(f"num_frames: this model generates {frames} frames, got {req.num_frames}", "num_frames")
    if req.seconds is not None:
        try:
            seconds = float(req.seconds)
        except ValueError:
            raise RequestError(f"seconds: must be a number, got {req.seconds!r}", "seconds") from None
        if not abs(seconds * fps - frames) < 0.5:
            raise RequestError(f"seconds: this model generates {model.seconds} s ({frames} frames at {fps:g} fps), "
                               f"got {req.seconds}", "seconds")
    prompt, params, seed, scale, pinned = _common(req, model, cfg)
    return GenerationJob(prompt=prompt, n=1, params=params, seed=seed, scale=scale, model_id=model.id,
                         video=True, pinned=pinned), req
