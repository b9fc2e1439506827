"""Serving options: the deployments' user_config, validated once per (re)configuration."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ServeConfig(BaseModel):
    """Serving options (the deployments' user_config). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field("models:/tdm-student@champion", description="Registered model to serve "
                           "(models:/<name>@<alias> or models:/<name>/<version>) or a local tdm pipeline directory.")
    poll_interval_s: float = Field(10.0, ge=0, le=86400, allow_inf_nan=False,
                                   description="Seconds between registry checks for a moved alias "
                                   "(0 = never; a new model_uri in user_config still swaps).")
    max_batch_size: int = Field(8, ge=1, le=256, description="Images per network batch (requests are batched "
                                "up to this many images; a chunk is padded to the smallest power of two that "
                                "holds it, or to exactly this size with batch_invariant).")
    batch_invariant: bool = Field(False, description="Pad every network batch to max_batch_size, so an image "
                                  "never depends on how requests were batched (bit-exact, costs compute at low "
                                  "load). Otherwise the same seed gives the same image at the same bucket size.")
    batch_wait_timeout_s: float = Field(0.03, ge=0, le=10, allow_inf_nan=False,
                                        description="How long a batch waits to fill up (seconds), when other "
                                        "requests are about: a request that comes alone starts at once.")
    max_images_per_request: int = Field(4, ge=1, le=256, description="Upper bound of `n`.")
    max_prompt_chars: int = Field(1000, ge=1, le=100_000, description="Upper bound of the prompt length "
                                  "(characters); text past the model's token limit is truncated (revised_prompt).")
    max_body_bytes: int = Field(65536, ge=1024, le=64 * 2**20, description="Largest request body (bytes); "
                                "a larger one is refused with 413 before it is read.")
    request_timeout_s: float = Field(300.0, gt=0, le=3600, allow_inf_nan=False, description="Deadline of a "
                                     "request (seconds), reading its body included; past it the answer is 504.")
    body_timeout_s: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False, description="Time a client has "
                                  "to send its request body (seconds); past it the answer is 408, so slow "
                                  "senders cannot hold the replica's slots.")
    max_queued_requests: int = Field(64, ge=1, le=100_000, description="Requests an ingress replica holds at "
                                     "once (running and waiting); beyond it requests get 503 with Retry-After.")
    api_keys_file: Optional[str] = Field(None, description="File of API keys, one per line (# comments); "
                                         "re-read when it changes. Keys are also read from $TDM_API_KEYS "
                                         "(comma-separated). Any key configured: requests need "
                                         "Authorization: Bearer <key>.")
    require_api_key: bool = Field(False, description="Fail closed: with no key configured, every request "
                                  "but /healthz and the playground page is refused (401).")
    enable_docs: bool = Field(False, description="Serve /docs and /openapi.json.")
    model_cache_versions: int = Field(3, ge=1, le=100, description="Downloaded versions kept in the node's "
                                      "model cache (the newest; the served one is never evicted).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype: auto = bfloat16 on a GPU that supports it (else float16), "
                            "float32 on CPU.")
    load_retry_initial_s: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False,
                                        description="First wait before retrying a version that failed to load.")
    load_retry_max_s: float = Field(300.0, gt=0, le=86400, allow_inf_nan=False,
                                    description="Longest wait between retries (the wait doubles each time).")
    upscale_factors: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [1], min_length=1, description="Allowed output sizes as integer multiples (1-64, each once) of the model's "
                                       "native size (nearest-neighbour upscaling), e.g. 1,32 for the 8x8 toy.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                                        "or the local tdm store).")
    decoder: Optional[str] = Field(None, description="Autoencoder to decode with instead of the model's own VAE, "
                                   "e.g. madebyollin/taesd (a hub id, a local diffusers directory or an s3:// "
                                   "prefix; AutoencoderTiny or AutoencoderKL for the model's latents). Default: the "
                                   "model's VAE.")

    video_store: Optional[str] = Field(None, description="Where video jobs and their MP4s are kept: none = this "
                                       "ingress replica's memory (one replica); s3://bucket/prefix = an S3-compatible "
                                       "store every replica reads.")
    video_store_max_jobs: int = Field(1000, ge=1, le=1_000_000,
                                      description="Video jobs kept; the oldest are dropped beyond it.")
    video_store_ttl_s: float = Field(3600.0, gt=0, le=30 * 86400, allow_inf_nan=False,
                                     description="Seconds a video job and its MP4 are kept.")
    video_job_timeout_s: float = Field(900.0, gt=0, le=86400, allow_inf_nan=False,
                                       description="A video job still unfinished after this many "
                                       "seconds (e.g. its ingress replica died) is reported failed.")

    @field_validator("upscale_factors")
    @classmethod
    def _distinct_factors(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"each factor once, got {v}")
        return v

    @field_validator("api_keys_file")
    @classmethod
    def _blank_keys_file_is_none(cls, v: Optional[str]) -> Optional[str]:
        return (v.strip() or None) if v is not None else None

    @field_validator("video_store")
    @classmethod
    def _blank_store_is_none(cls, v: Optional[str]) -> Optional[str]:
        if v is None or not v.strip():
            return None
        if not v.startswith("s3://"):
            raise ValueError(f"must be an s3://bucket/prefix (or empty for memory), got {v!r}")
        return v.strip()

    @field_validator("decoder")
    @classmethod
    def _blank_decoder_is_none(cls, v: Optional[str]) -> Optional[str]:
        # "" is how a chart value or a CLI flag says "no decoder"
        return (v.strip() or None) if v is not None else None


class ServeResources(BaseModel):
    """What each generator replica reserves, and how many there are: build_app's arguments beside the
    ServeConfig fields (they are deployment options, not user_config). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, le=1024, description="Generator replicas.")
    num_gpus: float = Field(0.0, ge=0, le=64, allow_inf_nan=False, description="GPUs per generator replica.")
    num_cpus: float = Field(1.0, ge=0, le=1024, allow_inf_nan=False,
                            description="CPUs reserved per generator replica.")
