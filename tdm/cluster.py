"""The Ray cluster a job runs on: connect or start one, size the workers, refuse what cannot be placed."""
from __future__ import annotations

import os

from .config import TDMConfig
from .errors import ConfigError


def init_ray(cfg: TDMConfig) -> bool:
    """Connect to cfg.train.ray_address / $RAY_ADDRESS, or start a local instance. Returns True if local."""
    import ray

    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=os.cpu_count(), log_to_driver=True)
    return True


def worker_cpus(cfg: TDMConfig, local: bool) -> float:
    """CPUs per worker: train.cpus_per_worker, else a local machine's CPUs shared among the workers, else 1."""
    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    return max(1, (os.cpu_count() or 1) // cfg.train.num_workers) if local else 1


def check_placement(cfg: TDMConfig, cpus: float) -> None:
    """Refuse a worker group the cluster can never place (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu, need_gpu = cpus * cfg.train.num_workers, cfg.train.num_workers if cfg.train.use_gpu else 0
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise ConfigError(f"train.num_workers={cfg.train.num_workers} needs {need_cpu:g} CPUs and {need_gpu} GPUs; "
                          f"the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")
    if cfg.train.placement_strategy == "STRICT_SPREAD":
        fit = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus
               and n["Resources"].get("GPU", 0) >= (1 if cfg.train.use_gpu else 0)]
        if len(fit) < cfg.train.num_workers:
            raise ConfigError(f"train.placement_strategy: STRICT_SPREAD puts each of the {cfg.train.num_workers} "
                              f"workers on its own node, and {len(fit)} node(s) have {cpus:g} CPUs"
                              f"{' and a GPU' if cfg.train.use_gpu else ''} free to give; add nodes or use SPREAD")
