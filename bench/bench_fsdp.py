"""FSDP2 vs DDP on CPU workers over gloo, measured side by side in one run (docs/scaling.md):

1. per-worker peak memory (student + fake score + teacher + optimizer states + EMA + activations) of a full
   fine-tune under FSDP with 2 workers vs 1;
2. the planner's estimate (tdm.plan, what `pipelines/distill.py --plan` prints) vs that measured peak;
3. training samples/s of FSDP vs DDP with 2 workers.

The model is a random-weight PixArt-shaped DiT sized to fit this machine (default 8 blocks, 16 heads x 64 =
1024 wide, 16x16 latents: about 0.1 B parameters), with a tiny T5 and VAE, so the denoiser's state dominates.
Peak memory is the worker process's resident high-water mark (VmHWM) minus its resident size after imports
and process-group start-up. The workers run with glibc's mmap threshold pinned at 64 KiB
(MALLOC_MMAP_THRESHOLD_): by default glibc raises it after each large free and then keeps freed blocks in its
heap, so RSS would also count memory FSDP's per-block buffers have already given back (1.3 GiB more on this
model, with the live tensors at 5.4 GiB: the planner counts live tensors, as a GPU's allocated-bytes would).

    python bench/bench_fsdp.py [--layers 8] [--heads 16] [--steps 3] [--out bench/results/cpu_fsdp.log]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

GLOBAL_BATCH = 4


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _config(strategy: str, workers: int):
    from tdm.config import load_config

    return load_config({"train": {"strategy": strategy, "num_workers": workers, "batch_size": GLOBAL_BATCH,
                                  "ema_decay": 0.99}, "student": {"num_steps": 2}})


def _worker(rank, world, port, strategy, pipe_dir, steps, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from tdm.backbones import load_backbone
    from tdm.distiller import TDMDistiller
    from tdm.train import build_roles

    dist.init_process_group("gloo", rank=rank, world_size=world)
    import diffusers.pipelines.pixart_alpha  # noqa: F401 - the lazy imports of load_backbone, before the baseline
    import transformers.models.t5  # noqa: F401
    base = _status_kib("VmRSS")
    cfg = _config(strategy, world)
    torch.manual_seed(0)
    b = load_backbone(pipe_dir)
    teacher, st = build_roles(cfg, b)
    student, fake = st.student, st.fake
    if strategy == "ddp" and world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        student, fake = DDP(student), DDP(fake)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, student, fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    micro = GLOBAL_BATCH // world
    cond, uncond = b.encode_prompts(["a photo of a cat"] * micro), b.encode_prompts([""] * micro)
    times = []
    for i in range(steps + 1):             # the first step warms up (allocator, gloo buffers)
        t0 = time.perf_counter()
        d.step([(cond, uncond)], 2, torch.Generator().manual_seed(1000 * rank + i))
        dist.barrier()
        times.append(time.perf_counter() - t0)
    peak = (_status_kib("VmHWM") - base) * 1024
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        Path(out).write_text(json.dumps({"peak_bytes": peaks, "s_per_step": sorted(times[1:])[len(times[1:]) // 2]}))
    dist.destroy_process_group()


def measure(strategy: str, workers: int, pipe_dir: str, steps: int) -> dict:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"   # inherited by the spawned workers (module docstring)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.start_processes(_worker, args=(workers, port, strategy, pipe_dir, steps, f.name), nprocs=workers,
                           join=True, start_method="spawn")
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--sample-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    a = ap.parse_args()

    from tdm.backbones import load_backbone
    from tdm.plan import GIB, plan_config
    from tdm.testing import build_tiny_pixart

    with tempfile.TemporaryDirectory() as tmp:
        pipe = str(build_tiny_pixart(tmp, layers=a.layers, heads=a.heads, head_dim=a.head_dim,
                                     sample_size=a.sample_size))
        b = load_backbone(pipe)
        params = sum(p.numel() for p in b.network.parameters())
        rows = {}
        for strategy, workers in (("fsdp", 1), ("fsdp", 2), ("ddp", 2)):
            got = measure(strategy, workers, pipe, a.steps)
            est = plan_config(_config(strategy, workers), b.network, tuple(b.latent_shape)).total
            rows[(strategy, workers)] = dict(got, estimate=est, peak=max(got["peak_bytes"]))
    lines = [f"bench_fsdp: PixArt-shaped DiT, {params / 1e6:.1f} M parameters ({a.layers} blocks, {a.heads} x "
             f"{a.head_dim} wide, latents {a.sample_size}x{a.sample_size}), full fine-tune, EMA on, global batch "
             f"{GLOBAL_BATCH}, {a.steps} timed steps after one warm-up, torch {torch.__version__}, "
             f"{os.cpu_count()} CPUs", "",
             "| strategy | workers | measured peak / worker | planner estimate | estimate / measured | s/step | "
             "samples/s |", "|---|---|---|---|---|---|---|"]
    for (strategy, workers), r in rows.items():
        lines.append(f"| {strategy} | {workers} | {r['peak'] / GIB:.2f} GiB | {r['estimate'] / GIB:.2f} GiB | "
                     f"{r['estimate'] / r['peak']:.2f} | {r['s_per_step']:.2f} | "
                     f"{GLOBAL_BATCH / r['s_per_step']:.2f} |")
    f1, f2, d2 = rows[("fsdp", 1)], rows[("fsdp", 2)], rows[("ddp", 2)]
    lines += ["", f"FSDP peak per worker, 2 workers / 1 worker: {f2['peak'] / f1['peak']:.2f} (target <= 0.6)",
              f"FSDP vs DDP samples/s with 2 workers: {d2['s_per_step'] / f2['s_per_step']:.2f}x"]
    report = "\n".join(lines)
    print(report)
    if a.out:
        Path(a.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
