"""Teachers: resolved once, on the driver, to an immutable identity (`tdm.spec.TeacherRef`), then loaded
in any process from that identity, never again from the mutable name (docs/architecture.md, "Teacher
identity").

    ref = resolve_teacher("models:/sd15@champion")   # -> models:/sd15/7, revision 7-<digest>
    path = teacher_dir(ref)                          # a local diffusers directory holding exactly that

| teacher.uri               | pinned to                                   | loaded from                              |
|---------------------------|---------------------------------------------|------------------------------------------|
| models:/<name>@<alias>    | the version the alias points at now         | $TDM_HOME/cache/models (one download)    |
| models:/<name>/<version>  | that version (and its run, source and time) | the same                                 |
| <org>/<name> (hub id)     | the commit the hub (or the offline cache)   | the Hugging Face cache, at that commit   |
|                           | holds now                                   |                                          |
| s3://bucket/prefix        | every object's key, size and ETag           | $TDM_HOME/cache/s3/teacher-<revision>    |
| a local directory         | the sha256 of its files                     | the directory, after checking the hash   |

`teacher_dir` raises TeacherChangedError when the location no longer holds the pinned revision
(a version deleted and re-created, a bucket rewritten, a directory edited): a run never trains or
evaluates against a teacher other than the one it recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .config import is_hub_id
from .errors import ConfigError, TeacherChangedError, first_line
from .spec import TeacherRef

#: a Hugging Face hub repository id, org/name
INDEX_FILE = "model_index.json"


# ---------------------------------------------------------------- resolve (the driver)

def resolve_teacher(uri: str, field: str = "teacher.uri") -> TeacherRef:
    """Pin a teacher location to its immutable identity; ConfigError naming `field` when it cannot be
    read. Registry URIs use the MLflow tracking URI in effect (tdm.tracking.use_tracking_uri)."""
    from .config import teacher_uri_problem

    problem = teacher_uri_problem(uri)
    if problem is not None:
        raise ConfigError(f"{field}: {problem}")
    if uri.startswith("models:/"):
        return _resolve_registry(uri, field)
    if uri.startswith("s3://"):
        return _resolve_s3(uri, field)
    path = Path(uri).expanduser()
    if path.exists():
        path = path.resolve()
        if not (path / INDEX_FILE).is_file():
            raise ConfigError(f"{field}: {path} is not a diffusers pipeline directory (no {INDEX_FILE})")
        return TeacherRef(kind="local", uri=uri, location=str(path), revision=f"sha256-{directory_hash(path)}")
    if is_hub_id(uri):
        return _resolve_hub(uri, field)
    raise ConfigError(f"{field}: path does not exist: {uri}")


def _resolve_registry(uri: str, field: str) -> TeacherRef:
    from .tracking import resolve_model_version, version_identity

    try:
        mv = resolve_model_version(uri)
    except Exception as e:  # noqa: BLE001 - mlflow raises RestException / MlflowException with long texts
        raise ConfigError(f"{field}: registered model {uri} not found ({first_line(e)})") from None
    return TeacherRef(kind="registry", uri=uri, location=f"models:/{mv.name}/{mv.version}",
                      revision=version_identity(mv))


def _s3_revision(listing: list[tuple[str, int, str]]) -> str:
    return "etags-" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:24]


def _resolve_s3(uri: str, field: str) -> TeacherRef:
    from .sources import s3_listing

    location = uri.rstrip("/")
    listing = s3_listing(location, field)
    if not any(rel == INDEX_FILE for rel, _, _ in listing):
        raise ConfigError(f"{field}: no diffusers pipeline at {uri} ({INDEX_FILE} not found under it)")
    return TeacherRef(kind="s3", uri=uri, location=location, revision=_s3_revision(listing))


def _resolve_hub(uri: str, field: str) -> TeacherRef:
    """The commit of a hub repository: asked of the hub, or read from the local Hugging Face cache when
    offline (HF_HUB_OFFLINE=1)."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        cached = huggingface_hub.try_to_load_from_cache(uri, INDEX_FILE)
        if not isinstance(cached, str):
            raise ConfigError(f"{field}: {uri} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                              f"HF_HUB_OFFLINE is set; download it once, or give a local directory")
        sha = Path(cached).parent.name            # <cache>/models--org--name/snapshots/<sha>/model_index.json
    else:
        try:
            sha = huggingface_hub.HfApi().model_info(uri).sha
        except Exception as e:  # noqa: BLE001 - RepositoryNotFound, gated, network: one line naming the field
            raise ConfigError(f"{field}: cannot resolve hub id {uri}: {first_line(e)}") from None
    return TeacherRef(kind="hub", uri=uri, location=uri, revision=sha)


# ---------------------------------------------------------------- load (any process)

def teacher_dir(ref: TeacherRef, tracking_uri: str | None = None) -> str:
    """A local diffusers directory holding exactly `ref`'s revision (downloaded once per node where it
    is remote); TeacherChangedError if the location now holds something else."""
    if ref.kind == "registry":
        return _registry_dir(ref, tracking_uri)
    if ref.kind == "s3":
        return _s3_dir(ref)
    if ref.kind == "hub":
        from diffusers import DiffusionPipeline
        from huggingface_hub import constants

        # the pipeline's files at the pinned commit (safetensors only: nothing is unpickled), from the cache
        # when offline; constants are read now, so HF_HOME / HF_HUB_OFFLINE set after import are honoured
        return str(DiffusionPipeline.download(ref.location, revision=ref.revision, cache_dir=constants.HF_HUB_CACHE,
                                              local_files_only=constants.HF_HUB_OFFLINE, use_safetensors=True))
    path = Path(ref.location)
    if ref.revision is not None:
        current = f"sha256-{directory_hash(path)}" if path.is_dir() else "(missing)"
        if current != ref.revision:
            raise _changed(ref, current)
    return str(path)


def _changed(ref: TeacherRef, current: str) -> TeacherChangedError:
    return TeacherChangedError(f"teacher.uri: {ref.location} was pinned to revision {ref.revision} but now holds "
                               f"{current}; the teacher changed under the run")


def _registry_dir(ref: TeacherRef, tracking_uri: str | None) -> str:
    from .tracking import download_model, resolve_model_version, use_tracking_uri, version_identity

    if tracking_uri:
        use_tracking_uri(tracking_uri)
    try:
        mv = resolve_model_version(ref.location)
    except Exception as e:  # noqa: BLE001 - deleted version, unreachable registry
        raise TeacherChangedError(f"teacher.uri: {ref.location} cannot be read ({first_line(e)})") from None
    if ref.revision is not None and version_identity(mv) != ref.revision:
        raise _changed(ref, version_identity(mv))
    return str(download_model(mv))


def _s3_dir(ref: TeacherRef) -> str:
    from .paths import cache_dir
    from .sources import COMPLETE_MARKER, download_s3_prefix, s3_listing

    field = "teacher.uri"
    dest = cache_dir("s3") / f"teacher-{ref.revision or hashlib.sha256(ref.location.encode()).hexdigest()[:16]}"
    if (dest / COMPLETE_MARKER).exists():
        return str(dest)
    listing = s3_listing(ref.location, field)
    if ref.revision is not None and _s3_revision(listing) != ref.revision:
        raise _changed(ref, _s3_revision(listing))
    download_s3_prefix(ref.location, dest, field, listing)
    after = _s3_revision(s3_listing(ref.location, field))
    if ref.revision is not None and after != ref.revision:  # rewritten while it downloaded
        shutil.rmtree(dest, ignore_errors=True)
        raise _changed(ref, after)
    return str(dest)


# ---------------------------------------------------------------- content hashes

def directory_hash(root: str | Path) -> str:
    """sha256 over every file under `root` (relative path, size and bytes, in path order). Cached in
    $TDM_HOME/cache/hashes by the files' (path, size, mtime) so an unchanged directory is read once."""
    from .paths import cache_dir

    root = Path(root)
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    stats = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    sig = hashlib.sha256(json.dumps([str(root.resolve()), stats]).encode()).hexdigest()[:32]
    memo = cache_dir("hashes") / f"{sig}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p, (rel, size, _) in zip(files, stats):
        h.update(json.dumps([rel, size]).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest
