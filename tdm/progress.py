"""Progress bars that render well both in a terminal and inside Ray tasks/actors (where plain tqdm
prints a line per refresh into the driver's log)."""
from __future__ import annotations


def progress(iterable=None, *, total=None, desc: str = "", disable: bool = False):
    """tqdm in a plain process; Ray's tqdm (one live bar in the driver's terminal) inside Ray workers."""
    if not disable:
        try:
            import ray

            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                from ray.experimental.tqdm_ray import tqdm as ray_tqdm

                return ray_tqdm(iterable, total=total, desc=desc)
        except Exception:  # no Ray, or not inside a worker
            pass
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable, mininterval=2, leave=False)


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
