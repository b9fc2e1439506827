"""Where prompts and other run inputs come from: local files and directories, or S3.

    prompts = load_prompts("s3://bucket/prompts/")          # or a .txt/.jsonl/.json/.parquet file, or a dir
    key = prompts_fingerprint(prompts)                       # cache key for anything derived from them
    local = download_s3_prefix("s3://bucket/model/", dest, field="teacher.uri")

Formats: .txt is one prompt per line; .jsonl/.json is one JSON object per line, the prompt in `column`;
.parquet holds the prompt in `column`. A directory (local or an S3 prefix) contributes every .txt, .jsonl
and .parquet file inside it, recursively, in path order. Prompts are stripped; empty ones are dropped;
order and duplicates are kept.

Every problem is a ConfigError whose message starts with the config field (or option) the caller names,
so a bad source fails fast, in one line, before any worker starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from .errors import ConfigError, first_line

#: Written last into a completed download; its presence makes the directory a cache hit.
COMPLETE_MARKER = ".tdm-complete"

#: Extensions a single file may have, and those picked up inside a directory. Directories skip .json:
#: model and dataset folders are full of .json metadata that is not prompts.
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
DIR_SUFFIXES = (".txt", ".jsonl", ".parquet")


def split_s3_uri(uri: str, field: str = "uri") -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix"); the prefix may be empty."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or any(c.isspace() for c in bucket):
        raise ConfigError(f"{field}: not an s3://bucket/prefix uri: {uri!r}")
    return bucket, key


def s3_client():
    """An S3 client that gives up within seconds on a dead endpoint instead of retrying for minutes.
    The endpoint (MinIO, moto, ...) comes from AWS_ENDPOINT_URL, which boto3 reads itself."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}))


def _s3_errors() -> tuple[type[BaseException], ...]:
    """What an S3 call may raise: botocore's many types (endpoint, credentials, bucket, permission), boto3's
    transfer errors, and ValueError for a malformed AWS_ENDPOINT_URL."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError, Boto3Error, ValueError


def _dir_prefix(uri: str, field: str) -> tuple[str, str]:
    """(bucket, key prefix) of an S3 "directory": a prefix names a directory, so "data" must not also
    pick up "data2/..."; the bucket root is the empty prefix."""
    bucket, prefix = split_s3_uri(uri, field)
    return bucket, (prefix.rstrip("/") + "/" if prefix.strip("/") else "")


def download_s3_prefix(uri: str, dest: str | Path, field: str,
                       listing: list[tuple[str, int, str]] | None = None) -> Path:
    """Download every object under the S3 "directory" `uri` (or those of `listing`, from s3_listing) into
    `dest`, keeping relative paths.

    Atomic: objects land in a temporary sibling of `dest` that is renamed into place once complete, so a
    crash never leaves a half-populated `dest`. A `dest` holding the completion marker is returned as is.
    """
    dest = Path(dest)
    if (dest / COMPLETE_MARKER).exists():
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{field}: {dest} exists and is not a completed download of {uri}")
    listing = s3_listing(uri, field) if listing is None else listing
    if not listing:
        raise ConfigError(f"{field}: no objects under {uri}")
    bucket, prefix = _dir_prefix(uri, field)
    s3_errors = _s3_errors()
    client = s3_client()

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for rel, _, _ in listing:
            target = tmp / rel
            try:
                target.parent.mkdir(parents=True, exist_ok=True)  # fails if S3 holds both "a" and "a/b"
                client.download_file(bucket, prefix + rel, str(target))
            except (*s3_errors, OSError) as e:
                raise ConfigError(f"{field}: cannot download s3://{bucket}/{prefix}{rel}: {first_line(e)}") from None
        (tmp / COMPLETE_MARKER).write_text(f"{uri}\n")
        try:
            os.rename(tmp, dest)  # replaces a missing or empty dest in one step
        except OSError:
            if (dest / COMPLETE_MARKER).exists():  # a concurrent download won the race: use its copy
                return dest
            raise ConfigError(f"{field}: cannot move the download of {uri} into {dest}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; cleans up after a failure
    return dest


def s3_listing(uri: str, field: str) -> list[tuple[str, int, str]]:
    """(key relative to the prefix, size, ETag) of every object under the S3 "directory" `uri`, sorted by
    key; folder placeholders ("/" keys) are skipped, and keys that would escape a download are refused."""
    bucket, prefix = _dir_prefix(uri, field)
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [(o["Key"], int(o.get("Size", 0)), str(o.get("ETag", "")).strip('"'))
                   for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except _s3_errors() as e:
        raise ConfigError(f"{field}: cannot list {uri}: {first_line(e)}") from None
    out = []
    for key, size, etag in sorted(objects):
        rel = PurePosixPath(key[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts:  # a crafted key must not write outside a download
            raise ConfigError(f"{field}: refusing object key {key!r} under {uri}: it escapes the download directory")
        out.append((rel.as_posix(), size, etag))
    return out


def local_copy(location: str, field: str) -> str:
    """A local path for a model location: an s3:// prefix is downloaded once per node into
    $TDM_HOME/cache/s3/ (keyed by the URI) and that copy returned; anything else is returned as is."""
    if not location.startswith("s3://"):
        return location
    from .paths import cache_dir

    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
    return str(download_s3_prefix(location, cache_dir("s3") / f"s3-{key}", field))


def load_prompts(source: str, column: str = "prompt", field: str = "data.prompt_source",
                 limit: int | None = None) -> list[str]:
    """The prompts of a local file or directory, or of an S3 object or prefix (see the module docstring)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if source.startswith("s3://"):
        prompts = _load_s3_prompts(source, column, field)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ConfigError(f"{field}: {source} does not exist")
        if path.is_dir():
            prompts = _read_dir(path, column, field, label=str(path))
        else:
            prompts = _read_file(path, column, field, label=str(path))
    if not prompts:
        raise ConfigError(f"{field}: {source} contains no prompts")
    return prompts[:limit] if limit is not None else prompts


def prompts_fingerprint(prompts: list[str]) -> str:
    """A short, stable cache key for a prompt list (order-sensitive; JSON, so a prompt containing a
    newline cannot collide with two prompts)."""
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()[:16]


def _load_s3_prompts(uri: str, column: str, field: str) -> list[str]:
    """Fetch an S3 object, or failing that the prefix, into a throwaway directory and read it."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri, field)
    with tempfile.TemporaryDirectory(prefix="tdm-prompts-") as tmp:
        if key and not key.endswith("/"):
            target = Path(tmp) / PurePosixPath(key).name
            try:
                s3_client().download_file(bucket, key, str(target))
            except ClientError as e:
                # No such object: the uri names a prefix instead (download_file's HEAD answers a bare 404).
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                    raise ConfigError(f"{field}: cannot read {uri}: {first_line(e)}") from None
            except _s3_errors() as e:
                raise ConfigError(f"{field}: cannot read {uri}: {first_line(e)}") from None
            else:
                return _read_file(target, column, field, label=uri)
        root = download_s3_prefix(uri, Path(tmp) / "prefix", field)
        return _read_dir(root, column, field, label=uri.rstrip("/"))


def _read_dir(root: Path, column: str, field: str, label: str) -> list[str]:
    # Sorted by path so the prompt order, and hence the fingerprint, does not depend on the filesystem.
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DIR_SUFFIXES)
    if not files:
        raise ConfigError(f"{field}: {label} has no {', '.join(DIR_SUFFIXES)} files")
    prompts: list[str] = []
    for path in files:
        prompts += _read_file(path, column, field, label=f"{label}/{path.relative_to(root).as_posix()}")
    return prompts


def _read_file(path: Path, column: str, field: str, label: str) -> list[str]:
    """Prompts of one file; `label` is how errors name it (the S3 uri rather than a temp path)."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ConfigError(f"{field}: unsupported file type {suffix or '(none)'!r} for {label}; "
                          f"expected one of {', '.join(FILE_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            return _read_parquet(path, column, field, label)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{field}: cannot read {label}: {first_line(e)}") from None
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    return _parse_jsonl(text, column, field, label)


def _parse_jsonl(text: str, column: str, field: str, label: str) -> list[str]:
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field}: {label} line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or column not in record:
            raise ConfigError(f"{field}: {label} line {lineno}: no {column!r} key")
        if not isinstance(record[column], str):
            raise ConfigError(f"{field}: {label} line {lineno}: {column!r} is a "
                              f"{type(record[column]).__name__}, not a string")
        if record[column].strip():
            prompts.append(record[column].strip())
    return prompts


def _read_parquet(path: Path, column: str, field: str, label: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    unreadable = (OSError, ValueError, pa.ArrowException)  # ArrowInvalid: not a parquet file, or corrupt
    try:
        names = pq.read_schema(path).names
    except unreadable as e:
        raise ConfigError(f"{field}: cannot read {label} as parquet: {first_line(e)}") from None
    if column not in names:
        raise ConfigError(f"{field}: {label} has no column {column!r}; columns: {', '.join(names) or '(none)'}")
    try:
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except unreadable as e:
        raise ConfigError(f"{field}: cannot read {label} as parquet: {first_line(e)}") from None
    prompts = []
    for row, value in enumerate(values):
        if value is None:  # a null prompt is an empty one: dropped like blank lines
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{field}: {label} row {row}: {column!r} is a {type(value).__name__}, not a string")
        if value.strip():
            prompts.append(value.strip())
    return prompts
