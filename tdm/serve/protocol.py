"""The API's request and response shapes, and the typed objects the ingress hands the generator.

A request is validated once, in the ingress, against the ModelSpec of the model being served
(`parse_request` -> `GenerationJob`). Every client error is a `RequestError`: an HTTP status and an
OpenAI-shaped body naming the parameter. Pure: no Ray, no FastAPI.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from ..errors import ParamError
from ..spec import GenerationParams, ModelSpec
from .config import ServeConfig

#: library parameter names -> the API's names for them
API_PARAMS = {"num_inference_steps": "steps", "guidance_scale": "guidance_scale", "prompt": "prompt"}


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

    @classmethod
    def from_param(cls, err: ParamError) -> "RequestError":
        """A model's refusal of a generation parameter, under the parameter's API name."""
        param = API_PARAMS.get(err.param, err.param)
        return cls(f"{param}: {err.detail}", param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ServedModel:
    """The model a generator replica serves: its registry identity and its ModelSpec."""

    id: str                 # "<name>/<version>", or "<dir name>/local"
    name: str
    version: str
    uri: str                # as configured (model_uri)
    spec: ModelSpec

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
    """One validated request: `n` images of `prompt`, image i seeded `seed + i`, upscaled `scale` x."""

    prompt: str
    n: int
    params: GenerationParams
    seed: int
    scale: int
    model_id: str           # the model it was validated against


@dataclass(frozen=True)
class GenerationResult:
    """A job's PNGs and the model that made them, or the error that refused it."""

    model_id: str
    images: tuple[bytes, ...] = ()
    error: Optional[ParamError] = None


def parse_request(raw: bytes, model: ServedModel, cfg: ServeConfig) -> GenerationJob:
    """Validate a generation request against the served model; returns the job or raises RequestError
    naming the field."""
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
    sizes = model.sizes(cfg.upscale_factors)
    size = req.size or sizes[0]
    if size not in sizes:
        raise RequestError(f"size: {size!r} is not supported; supported: {', '.join(sizes)}", "size")
    try:
        params = model.spec.check_generation(req.steps)
    except ParamError as e:
        raise RequestError.from_param(e) from None
    if req.model is not None and req.model not in (model.id, model.name, model.uri):
        raise RequestError(f"model: {req.model!r} is not served here; served: {model.id}", "model", 404,
                           "not_found_error")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise RequestError("seed: must be in [0, 2^63)", "seed")
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "big")
    return GenerationJob(prompt=prompt, n=req.n, params=params, seed=seed,
                         scale=cfg.upscale_factors[sizes.index(size)], model_id=model.id)
