"""What tdm prints: one-line job messages, and progress bars that render well both in a terminal and
inside Ray tasks and actors (where plain tqdm prints a line per refresh into the driver's log)."""
from __future__ import annotations

import importlib
import sys


def log(msg: str) -> None:
    """A job message on stdout, prefixed `[tdm]` and flushed (Ray forwards worker stdout line by line)."""
    print(f"[tdm] {msg}", flush=True)


def _in_ray_worker() -> bool:
    # sys.modules, not an import: a process that never imported Ray is not a Ray worker, and the library
    # core must not pull Ray in
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.is_initialized()
                    and ray.get_runtime_context().worker.mode == ray.WORKER_MODE)
    except Exception:  # noqa: BLE001 - a half-imported or shut-down Ray is not a worker either
        return False


def progress(iterable=None, *, total=None, desc: str = "", disable: bool = False):
    """tqdm in a plain process; Ray's tqdm (one live bar in the driver's terminal) inside Ray workers."""
    if not disable and _in_ray_worker():
        # Ray is already loaded in this process (we are one of its workers): use its bar without making
        # Ray a dependency of everything that shows progress
        ray_tqdm = importlib.import_module("ray.experimental.tqdm_ray").tqdm
        return RayBar(ray_tqdm(iterable, total=total, desc=desc))
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable, mininterval=2, leave=False)


class RayBar:
    """A Ray tqdm bar that closes for good: at the end of its loop (Ray's own does not close itself), and
    with stdout flushed, since the close is a line the driver must read before the worker exits. A bar left
    open on the driver is redrawn around every later line it prints, the final summary too."""

    def __init__(self, bar):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
        sys.stdout.flush()

    def __iter__(self):
        try:
            yield from self._bar
        finally:
            self.close()


def quiet_libraries() -> None:
    """Silence per-file progress bars of transformers, diffusers and MLflow (tdm shows its own)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass
