"""Training-iteration overhead and data-parallel scaling of the TDM loop.

1. Time per TDM iteration vs the summed cost of its minimal passes, measured side by side on the
   same backbone and batch: K student forwards (rollout, no grad), fake forward + backward, student
   forward + backward, teacher forward on [cond; uncond] (2B), fake forward (no grad).
   Backbones: the embedded toy architecture and a tiny SD-1.5-shaped pipeline (random weights).
2. Training samples/s with 1 vs 2 Ray Train workers on the toy (median of the per-step
   `train/samples_per_s` metric of two short runs).

    python bench/bench_train.py [--reps 20] [--skip-workers]

Prints a table; ratios, not absolute times, are the result (they hold across machines).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def iteration_overhead(pipeline_dir: str, batch: int, K: int, reps: int) -> dict:
    from tdm.backbones import load_backbone, predict_x0_eps
    from tdm.backbones.base import cond_cat
    from tdm.config import load_config
    from tdm.distiller import TDMDistiller
    from tdm.train import build_roles

    cfg = load_config({"student": {"num_steps": K}, "train": {"ema_decay": 0.99}})
    b = load_backbone(pipeline_dir)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    cond = b.encode_prompts(["a handwritten digit 3"] * batch)
    uncond = b.encode_prompts([""] * batch)
    x = torch.randn(batch, *b.latent_shape)
    t = torch.full((batch,), 500)

    def rollout():
        with torch.no_grad():
            for _ in range(K):
                predict_x0_eps(d.student, b.schedule, x, t, cond)

    def fwd_bwd(net):
        def run():
            x0, _ = predict_x0_eps(net, b.schedule, x, t, cond)
            x0.square().mean().backward()
            net.zero_grad(set_to_none=True)
        return run

    def teacher_cfg():
        with torch.no_grad():
            predict_x0_eps(d.teacher, b.schedule, torch.cat([x, x]), torch.cat([t, t]), cond_cat(cond, uncond))

    def fake_fwd():
        with torch.no_grad():
            predict_x0_eps(d.fake, b.schedule, x, t, cond)

    parts = {"rollout (K fwd)": rollout, "fake fwd+bwd": fwd_bwd(d.fake), "student fwd+bwd": fwd_bwd(d.student),
             "teacher cond+uncond": teacher_cfg, "fake fwd": fake_fwd}
    g = torch.Generator().manual_seed(0)
    parts["TDM iteration"] = lambda: d.step([(cond, uncond)], K, g)
    # interleaved rounds: every measurement sees the same machine state (drift, other load)
    times = {name: [] for name in parts}
    for fn in parts.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    iteration = statistics.median(times.pop("TDM iteration"))
    costs = {name: statistics.median(v) for name, v in times.items()}
    minimal = sum(costs.values())
    return {"parts": costs, "minimal_s": minimal, "iteration_s": iteration, "ratio": iteration / minimal}


def worker_scaling(steps: int) -> dict:
    import ray
    from mlflow import MlflowClient

    from tdm.config import load_config
    from tdm.job import distill

    home = tempfile.mkdtemp(prefix="tdm-bench-")
    os.environ["TDM_HOME"] = home
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TDM_HOME": home, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}})
    out = {}
    for workers in (1, 2):
        cfg = load_config({"name": f"bench-w{workers}", "toy": {"train_steps": 20},
                           "train": {"max_steps": steps, "num_workers": workers, "batch_size": 64,
                                     "checkpoint_every": steps, "sample_every": steps * 10, "log_every": 5,
                                     "storage_path": f"{home}/runs"},
                           "eval": {"enabled": False}})
        res = distill(cfg)
        hist = MlflowClient().get_metric_history(res["run_id"], "train/samples_per_s")
        out[workers] = statistics.median(m.value for m in hist if m.step > 3)
    ray.shutdown()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--worker-steps", type=int, default=60)
    p.add_argument("--skip-workers", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    from tdm.testing import build_tiny_sd15
    from tdm.toy.teacher import build_toy_backbone

    with tempfile.TemporaryDirectory() as tmp:
        toy = Path(tmp) / "toy"
        build_toy_backbone().save_pretrained(toy)
        sd = build_tiny_sd15(Path(tmp) / "sd")
        print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, K=4, median of {args.reps}")
        for name, path in (("toy (24,48) UNet", toy), ("tiny SD-1.5-shaped", sd)):
            r = iteration_overhead(str(path), args.batch, 4, args.reps)
            print(f"\n{name}")
            for part, sec in r["parts"].items():
                print(f"  {part:<22}{sec * 1000:9.1f} ms")
            print(f"  {'sum of minimal passes':<22}{r['minimal_s'] * 1000:9.1f} ms")
            print(f"  {'TDM iteration':<22}{r['iteration_s'] * 1000:9.1f} ms   ratio {r['ratio']:.3f}x")
    if not args.skip_workers:
        s = worker_scaling(args.worker_steps)
        print(f"\nsamples/s on the toy: 1 worker {s[1]:.1f}, 2 workers {s[2]:.1f}, ratio {s[2] / s[1]:.2f}x "
              f"({os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
