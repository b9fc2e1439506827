"""Where tdm keeps local state: everything lives under `$TDM_HOME` (default `~/.tdm`).

    $TDM_HOME/mlflow.db          the local MLflow store (runs, registry), unless MLFLOW_TRACKING_URI is set
    $TDM_HOME/mlartifacts/       artifacts of experiments created in that store
    $TDM_HOME/runs/<run name>/   Ray Train checkpoints, unless train.storage_path is set
    $TDM_HOME/cache/<kind>/      downloads and derived data that can always be rebuilt: models (registered
                                 versions), s3 (copies of s3:// prefixes), embeddings (text encodings),
                                 eval (teacher evaluation rows), hashes (directory content hashes)

Read at call time, not import time, so a process (or a test) that sets TDM_HOME later is honoured.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_KINDS = ("models", "s3", "embeddings", "eval", "hashes")


def home() -> Path:
    """$TDM_HOME, default ~/.tdm."""
    return Path(os.environ.get("TDM_HOME", Path.home() / ".tdm")).expanduser()


def local_tracking_uri() -> str:
    """The local MLflow store: sqlite:///$TDM_HOME/mlflow.db."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def artifacts_dir() -> Path:
    return home() / "mlartifacts"


def runs_dir() -> Path:
    """Default checkpoint storage (train.storage_path)."""
    return home() / "runs"


def cache_dir(kind: str) -> Path:
    """$TDM_HOME/cache/<kind>; kind is one of CACHE_KINDS."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {kind!r}")
    return home() / "cache" / kind
