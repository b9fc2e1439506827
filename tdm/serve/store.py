"""Where video jobs and their MP4s live between `POST /v1/videos` and `GET /v1/videos/{id}/content`.

A job is a small JSON record (`VideoJob`: id, status, created_at, model, ...) plus, once completed, its
MP4 bytes. Two stores, both bounded by count (`max_jobs`, the oldest go first) and age (`ttl_s`):

- `MemoryJobStore`: in the ingress replica's memory (the default, for one replica and local use);
- `S3JobStore`: objects under an s3:// prefix (`<prefix>/<id>.json`, `<prefix>/<id>.mp4`), readable by
  every ingress replica of every node (S3 or any S3-compatible store: MinIO, moto; `AWS_ENDPOINT_URL`).

Pure storage: no Ray, no FastAPI.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Optional

Status = Literal["queued", "in_progress", "completed", "failed"]


@dataclass(frozen=True)
class VideoJob:
    """A video job as the API reports it (OpenAI's video object, plus tdm's extensions)."""

    id: str
    model: str
    prompt: str
    seconds: str
    size: str
    seed: int
    steps: int
    num_frames: int
    status: Status = "queued"
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: Optional[int] = None
    error: Optional[dict] = None            # {"code", "message"} of a failed job
    object: str = "video"

    @staticmethod
    def new_id() -> str:
        return f"video_{uuid.uuid4().hex}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoJob":
        return cls(**d)

    def finished(self, content_ok: bool, error: dict | None = None) -> "VideoJob":
        return replace(self, status="completed" if content_ok else "failed", completed_at=int(time.time()),
                       error=error)


class JobStore:
    """The interface both stores implement; bounded by `max_jobs` and `ttl_s`."""

    def __init__(self, max_jobs: int, ttl_s: float):
        self.max_jobs, self.ttl_s = max_jobs, ttl_s

    def put(self, job: VideoJob, content: bytes | None = None) -> None:
        raise NotImplementedError

    def get(self, job_id: str) -> VideoJob | None:
        raise NotImplementedError

    def content(self, job_id: str) -> bytes | None:
        raise NotImplementedError

    def expired(self, job: VideoJob, now: float | None = None) -> bool:
        return (now or time.time()) - job.created_at > self.ttl_s


class MemoryJobStore(JobStore):
    """Jobs in this process, oldest evicted first beyond max_jobs or ttl_s."""

    def __init__(self, max_jobs: int = 1000, ttl_s: float = 3600.0):
        super().__init__(max_jobs, ttl_s)
        self._jobs: OrderedDict[str, tuple[VideoJob, bytes | None]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, job: VideoJob, content: bytes | None = None) -> None:
        with self._lock:
            self._jobs[job.id] = (job, content)
            now = time.time()
            for key in [k for k, (j, _) in self._jobs.items() if self.expired(j, now)]:
                del self._jobs[key]
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)

    def get(self, job_id: str) -> VideoJob | None:
        with self._lock:
            hit = self._jobs.get(job_id)
        return None if hit is None or self.expired(hit[0]) else hit[0]

    def content(self, job_id: str) -> bytes | None:
        with self._lock:
            hit = self._jobs.get(job_id)
        return None if hit is None or self.expired(hit[0]) else hit[1]


class S3JobStore(JobStore):
    """Jobs as objects under s3://bucket/prefix: <id>.json (the record) and <id>.mp4 (the video)."""

    def __init__(self, uri: str, max_jobs: int = 1000, ttl_s: float = 3600.0):
        import boto3
        from botocore.config import Config

        super().__init__(max_jobs, ttl_s)
        if not uri.startswith("s3://"):
            raise ValueError(f"video_store: an s3:// prefix, got {uri!r}")
        self.bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=30,
                                                       retries={"max_attempts": 3}))
        self._puts = 0

    def _key(self, job_id: str, ext: str) -> str:
        return f"{self.prefix}/{job_id}.{ext}" if self.prefix else f"{job_id}.{ext}"

    def put(self, job: VideoJob, content: bytes | None = None) -> None:
        if content is not None:  # the video first: a completed record always has its content
            self.client.put_object(Bucket=self.bucket, Key=self._key(job.id, "mp4"), Body=content,
                                   ContentType="video/mp4")
        self.client.put_object(Bucket=self.bucket, Key=self._key(job.id, "json"),
                               Body=json.dumps(job.to_dict()).encode(), ContentType="application/json")
        self._puts += 1
        if job.status == "queued" and self._puts % 16 == 1:  # bound the store now and then, not on every write
            self.prune()

    def _read(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def get(self, job_id: str) -> VideoJob | None:
        if "/" in job_id or not job_id.startswith("video_"):
            return None
        raw = self._read(self._key(job_id, "json"))
        if raw is None:
            return None
        job = VideoJob.from_dict(json.loads(raw))
        return None if self.expired(job) else job

    def content(self, job_id: str) -> bytes | None:
        """The MP4 of a job the caller has just read with `get` (one request: the record is not read again)."""
        if "/" in job_id or not job_id.startswith("video_"):
            return None
        return self._read(self._key(job_id, "mp4"))

    def prune(self) -> int:
        """Delete jobs past ttl_s, then the oldest beyond max_jobs; returns how many were deleted."""
        records = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(".json"):
                    records.append((obj["LastModified"].timestamp(), obj["Key"][:-len(".json")]))
        records.sort()
        now = time.time()
        doomed = [k for t, k in records if now - t > self.ttl_s]
        alive = [k for t, k in records if now - t <= self.ttl_s]
        doomed += alive[:max(0, len(alive) - self.max_jobs)]
        for i in range(0, len(doomed), 500):
            keys = [{"Key": f"{k}.{ext}"} for k in doomed[i:i + 500] for ext in ("json", "mp4")]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        return len(doomed)


def open_store(uri: str | None, max_jobs: int, ttl_s: float) -> JobStore:
    """The store a ServeConfig names: None = in memory, s3://bucket/prefix = S3."""
    return MemoryJobStore(max_jobs, ttl_s) if not uri else S3JobStore(uri, max_jobs, ttl_s)
