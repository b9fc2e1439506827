"""The Ray Train worker loop: build the three roles, restore the last checkpoint, run TDM iterations,
log from rank 0 to the driver's MLflow run, and report checkpoints with the full training state.

Randomness is counter-based: every iteration draws from generators seeded by (seed, step, rank), so
the data position and the noise of step n are the same whether or not the run was interrupted.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .backbones import cond_index, load_backbone
from .config import TDMConfig, embedded_guidance_refused, embedded_scale
from .console import progress
from .distiller import EMA, TDMDistiller, allreduce_mean
from .errors import NonFiniteTrainingError, TeacherChangedError
from .spec import TeacherRef, WorkerSpec, checkpoint_dir_name, student_spec
from .statefile import load_state, save_state

META_FILE = "meta.json"   # small JSON next to the state: step, teacher, run id, config, spec, metrics


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (run seed, iteration, stream); stream is the rank, or -1 for rank-shared draws."""
    return int(np.random.SeedSequence([seed, step, stream + 1]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def build_optimizer(module: torch.nn.Module, lr: float, cfg) -> torch.optim.Optimizer:
    """AdamW over a role's trainable parameters; a step embedding gets lr * step_embedding_lr_scale."""
    named = module.named_trainable_parameters()
    step_emb = [p for n, p in named if n.startswith("step_embedding.")]
    rest = [p for n, p in named if not n.startswith("step_embedding.")]
    groups = [{"params": rest, "lr": lr}]
    if step_emb:
        groups.append({"params": step_emb, "lr": lr * cfg.step_embedding_lr_scale})
    # fused: one kernel for all parameters (4x faster than the default per-tensor loop on CPU, too)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(float(b) for b in cfg.betas), weight_decay=cfg.weight_decay,
                             eps=cfg.eps, fused=True)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR multiplier at `step`: linear warm-up to 1, then constant or cosine decay to 0 at total_steps."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "cosine":
        frac = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * frac))
    return warm


def build_scheduler(opt, cfg: TDMConfig):
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, cfg.train.max_steps, o.lr_schedule))


class TrainState:
    """Everything a resume needs, in one place: networks, optimizers, schedulers, EMA, step, RNG."""

    def __init__(self, student, fake, opt_student, opt_fake, sched_student, sched_fake, ema: EMA | None):
        self.student, self.fake = student, fake
        self.opt_student, self.opt_fake = opt_student, opt_fake
        self.sched_student, self.sched_fake = sched_student, sched_fake
        self.ema = ema

    def sections(self) -> dict:
        """The networks', optimizers' and EMA's state: what FSDP shards (tdm.sharding.SHARDED_SECTIONS). The
        tensors are the live ones, so loading a checkpoint into them works in place."""
        return {"student": self.student.role_state_dict(), "fake": self.fake.role_state_dict(),
                "opt_student": self.opt_student.state_dict(), "opt_fake": self.opt_fake.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def state_dict(self, step: int, cfg: TDMConfig, extra: dict) -> dict:
        return {
            "step": step, **self.sections(),
            "sched_student": self.sched_student.state_dict(), "sched_fake": self.sched_fake.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "config": cfg.model_dump(mode="json"), **extra,
        }

    def load_state_dict(self, state: dict) -> int:
        self.student.load_role_state_dict(state["student"])
        self.fake.load_role_state_dict(state["fake"])
        self.opt_student.load_state_dict(state["opt_student"])
        self.opt_fake.load_state_dict(state["opt_fake"])
        self.sched_student.load_state_dict(state["sched_student"])
        self.sched_fake.load_state_dict(state["sched_fake"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        return int(state["step"])

    def load_sharded(self, directory: str | Path, rest: dict) -> int:
        """Resume from a sharded checkpoint (`rest`: its statefile part, tdm.sharding.split_state): each rank
        reads its own slices of every network, optimizer and EMA tensor straight into the live (sharded)
        ones, whatever the worker count that wrote them."""
        from .sharding import flatten, init_optimizer_state, join_state, load_sharded

        init_optimizer_state(self.opt_student)
        init_optimizer_state(self.opt_fake)
        live = flatten(self.sections())
        load_sharded(directory, live)
        return self.load_state_dict(join_state(rest, live))


class NonFiniteGuard:
    """Counts iterations whose update was skipped for a non-finite loss or gradient (the distiller skips
    them, tdm.distiller.TDMDistiller._update) and stops the run after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def observe(self, step: int, metrics: dict) -> float:
        """Count this iteration; returns the total so far (logged); raises past the limit."""
        if metrics.get("nonfinite_updates", 0) > 0:
            self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        else:
            self.in_a_row = 0
        if self.in_a_row >= self.limit:
            raise NonFiniteTrainingError(
                f"train.max_nonfinite_steps: {self.in_a_row} iterations in a row (to step {step}) had a non-finite "
                f"loss or gradient and were skipped; the run stops (lower optim.lr_*, set optim.grad_clip, or use "
                f"bf16 instead of fp16). Its checkpoints are kept.")
        return float(self.total)


def make_role(cfg: TDMConfig, backbone, name: str):
    """The student or the fake score: a full trainable copy, or a LoRA adapter on the shared base."""
    st = cfg.student
    step_values = st.steps if st.unify else None
    # every block: the network's own gradient checkpointing; every n-th block (selective): tdm.sharding's
    every = cfg.train.gradient_checkpointing_every
    whole = cfg.train.gradient_checkpointing and every == 1
    if st.finetune == "lora":
        role = backbone.lora_role(name, st.lora_rank, st.lora_alpha or st.lora_rank, st.lora_targets, step_values,
                                  whole)
    else:
        role = backbone.trainable_copy(step_values, whole)
    if cfg.train.gradient_checkpointing and every > 1 and not getattr(role.net, "_tdm_selective_checkpointing", 0):
        from .sharding import checkpoint_every, shard_units
        role.net._tdm_selective_checkpointing = checkpoint_every(shard_units(role.net), every)  # once per network
    return role


def check_teacher_guidance(cfg: TDMConfig, backbone) -> None:
    """loss.teacher_guidance embedded needs a network that takes the scale (Backbone.embeds_guidance)."""
    if cfg.loss.teacher_guidance == "embedded" and not backbone.embeds_guidance:
        raise embedded_guidance_refused(backbone.pipeline_class)


def guided_conditioning(cfg: TDMConfig, backbone, cond, uncond):
    """(cond, uncond) carrying the scale a guidance-embedding network is fed: loss.guidance_scale under
    loss.teacher_guidance embedded (all roles see it: the student learns to sample at it), else 1
    (docs/method.md §9)."""
    scale = embedded_scale(cfg.loss.teacher_guidance, cfg.loss.guidance_scale)
    return backbone.with_guidance(cond, scale), backbone.with_guidance(uncond, 1.0)


def build_roles(cfg: TDMConfig, backbone, device: torch.device | None = None):
    """Teacher (frozen), student and fake score (full copies or LoRA adapters on the teacher), optimizers, EMA.

    The training strategy is set up here and only here: under train.strategy fsdp the roles are sharded
    (tdm.sharding.shard_role, shard_base) before their optimizers and EMA see their parameters; under ddp the caller
    wraps the full roles (DDP needs the process group's device placement, tdm.train.train_loop_per_worker)."""
    check_teacher_guidance(cfg, backbone)
    kw = None
    if cfg.train.strategy == "fsdp":
        from .sharding import fsdp_kwargs, shard_base, shard_role

        device = device or torch.device("cpu")
        kw = fsdp_kwargs(device.type, cfg.train.mixed_precision, cfg.train.fsdp_cpu_offload)
    roles = []
    for name in ("student", "fake"):
        roles.append(make_role(cfg, backbone, name))
        if kw is not None and cfg.student.finetune == "full":  # sharded as soon as it exists: one full copy at a time
            shard_role(roles[-1].to(device), kw)
    student, fake = roles
    teacher = backbone.denoiser()  # after the adapters exist: on a LoRA base it switches them off
    if kw is not None:
        shard_base(backbone.network, roles, kw)   # the teacher; for LoRA the one root of all three roles
    o = cfg.optim
    opt_s = build_optimizer(student, o.lr_student, o)
    opt_f = build_optimizer(fake, o.lr_fake, o)
    state = TrainState(student, fake, opt_s, opt_f, build_scheduler(opt_s, cfg), build_scheduler(opt_f, cfg),
                       EMA(student, cfg.train.ema_decay) if cfg.train.ema_decay else None)
    return teacher, state


def load_state_file(directory: str | Path) -> dict:
    """A checkpoint's training state, read without pickle (tdm.statefile); CheckpointFormatError otherwise."""
    return load_state(directory)


def student_from_state(cfg: TDMConfig, backbone, state: dict, directory: str | Path | None = None):
    """The student of a checkpoint (its EMA weights when EMA is on), frozen, ready to sample. In LoRA
    mode the adapter is added to `backbone`'s network (the teacher stays available with it off).

    A sharded checkpoint (train.strategy fsdp; `directory` is where it lies) is read straight into the
    student's parameters, the EMA shadow when there is one, else the trained weights: one full copy of the
    student in memory, never the optimizer states or a second copy."""
    from .sharding import SHARDED_FORMAT, load_sharded

    student = make_role(cfg, backbone, "student")
    if state.get("format") == SHARDED_FORMAT:
        if directory is None:
            raise ValueError("student_from_state: a sharded checkpoint needs its directory")
        ema = state["sharded"].get("ema")
        if ema is not None:   # shadow i is the i-th trainable parameter (tdm.distiller.EMA)
            params = student.trainable_parameters()
            into = {s["$shard"]: p.data for s, p in zip(ema["shadow"], params)}
        else:
            own = student.role_state_dict()
            into = {ref["$shard"]: own[name] for name, ref in state["sharded"]["student"].items()}
        load_sharded(directory, into)
        return student.eval().requires_grad_(False)
    student.load_role_state_dict(state["student"])
    if state.get("ema") is not None:
        ema = EMA(student, state["ema"]["decay"])
        ema.load_state_dict(state["ema"])
        ema.copy_to(student)
    return student.eval().requires_grad_(False)


def encode_prompt_set(backbone, prompts: list[str], teacher: TeacherRef, use_cache: bool = True,
                      batch_size: int = 64):
    """Text conditioning (Cond, batch = len(prompts)) of the whole prompt set, encoded once in batches
    and cached on disk: `$TDM_HOME/cache/embeddings/<teacher+prompts key>.safetensors`, keyed by the
    teacher's immutable identity, so workers on a node, restarts and later runs with the same teacher
    and prompts skip the text encoders."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from .backbones import cond_cat
    from .paths import cache_dir
    from .sources import prompts_fingerprint

    device = next(backbone.network.parameters()).device
    key = hashlib.sha256(json.dumps([backbone.family, teacher.key, prompts_fingerprint(prompts)]).encode()
                         ).hexdigest()[:20]
    path = cache_dir("embeddings") / f"{key}.safetensors"
    if use_cache and path.is_file():
        return {k: v.to(device) for k, v in load_file(str(path)).items()}
    starts = range(0, len(prompts), batch_size)
    bar = progress(total=len(prompts), desc="encode prompts") if len(starts) > 1 else None
    parts = []
    for i in starts:
        parts.append(backbone.encode_prompts(prompts[i:i + batch_size]))
        if bar is not None:
            bar.update(len(parts[-1][next(iter(parts[-1]))]))
    if bar is not None:
        bar.close()
    cond = cond_cat(*parts)
    if use_cache:  # atomic publish: concurrent workers on a node write the same bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in cond.items()}, str(tmp))
        os.replace(tmp, path)
    return cond


def check_checkpoint_strategy(state: dict, strategy: str) -> None:
    """A sharded checkpoint resumes only under FSDP, a whole one only under DDP (its format says which)."""
    from .sharding import SHARDED_FORMAT

    written = "fsdp" if state.get("format") == SHARDED_FORMAT else "ddp"
    if written != strategy:
        from .errors import ConfigError
        raise ConfigError(f"train.strategy: this run's checkpoints were written under {written}, so it resumes "
                          f"with --train.strategy {written} (or start a new run with another --name)")


def check_checkpoint_teacher(state: dict, teacher: TeacherRef) -> None:
    """A checkpoint resumes only onto the teacher it was trained against."""
    if state.get("teacher") is not None:
        saved = TeacherRef.model_validate(state["teacher"])
    elif state.get("teacher_source"):   # tdm 0.1.0 checkpoints: the location only
        saved = TeacherRef(kind=teacher.kind, uri=state["teacher_source"], location=state["teacher_source"],
                           revision=None)
    else:
        return
    if not saved.same_as(teacher):
        raise TeacherChangedError(f"teacher.uri: the checkpoint was trained against {saved.key}, this run's teacher "
                                  f"is {teacher.key}")


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: {"spec": WorkerSpec}, built and validated by the driver."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from .teacher import teacher_dir
    from .tracking import RankZeroLogger, render_samples

    ws: WorkerSpec = loop_config["spec"]
    cfg = ws.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts them)

    # the frozen teacher (and a LoRA base) needs no fp32 master copy: keep it in the autocast dtype on GPU
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32) \
        if device.type == "cuda" else torch.float32
    backbone = load_backbone(teacher_dir(ws.teacher, ws.tracking_uri), device=device, dtype=teacher_dtype,
                             video=cfg.video.overrides())
    prompts = ws.prompts
    cond_all = encode_prompt_set(backbone, prompts, ws.teacher, cfg.data.embedding_cache)
    uncond_one = backbone.encode_prompts([cfg.teacher.negative_prompt])
    cond_all, uncond_one = guided_conditioning(cfg, backbone, cond_all, uncond_one)
    torch.manual_seed(cfg.train.seed)
    sharded = cfg.train.strategy == "fsdp"
    teacher, state = build_roles(cfg, backbone, device)
    if not sharded:
        state.student.to(device)
        state.fake.to(device)

    start, saved = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_state_file(d)
            check_checkpoint_teacher(saved, ws.teacher)
            check_checkpoint_strategy(saved, cfg.train.strategy)
            start = state.load_sharded(d, saved) if sharded else state.load_state_dict(saved)
    student, fake = state.student, state.fake
    grad_sync = None   # under FSDP the sharded roles reduce-scatter their gradients themselves (tdm.sharding)
    if not sharded and world > 1 and cfg.student.finetune == "full":
        # DDP for the trainable roles only; the frozen teacher is moved, not wrapped
        student = prepare_model(student, move_to_device=False)
        fake = prepare_model(fake, move_to_device=False)
    elif not sharded and world > 1:
        # LoRA roles share one base module, which DDP cannot wrap per role: start every rank from rank 0's
        # adapters and average the (small) adapter gradients before each optimizer step
        import torch.distributed as dist
        for p in state.student.trainable_parameters() + state.fake.trainable_parameters():
            dist.broadcast(p.data, src=0)
        grad_sync = allreduce_mean
    distiller = TDMDistiller(cfg.student, cfg.loss, cfg.optim, backbone.schedule, backbone.latent_shape, teacher,
                             student, fake, state.opt_student, state.opt_fake, state.sched_student,
                             state.sched_fake, state.ema, cfg.train.mixed_precision, device.type, grad_sync,
                             grid_rule=backbone.grid_rule, guide=backbone.guide)
    distiller.load_scaler_state(saved.get("scalers") if saved else None)
    spec = student_spec(cfg, distiller.grids, backbone, ws.teacher)
    logger = RankZeroLogger(ws, backbone, state.student, spec) if rank == 0 else None
    if logger is not None and start > 0:
        logger.log_metric("train/resumed_from", start, step=start)
    monitor = None
    if ctx.get_local_rank() == 0:  # one system-metrics sampler per node
        import socket

        from .tracking import start_system_metrics
        monitor = start_system_metrics(ws.run_id, ws.tracking_uri, f"{socket.gethostname()}", resume=start > 0,
                                       interval_s=cfg.train.system_metrics_interval_s)
    accum = cfg.train.grad_accum_steps
    micro = cfg.train.batch_size // (world * accum)
    nfe_per_sample = {k: k + 5 for k in distiller.step_values}  # rollout K + fake fwd + student fwd + 2 teacher + fake
    bar = progress(total=cfg.train.max_steps, initial=start, desc=f"distill {ctx.get_experiment_name()}") \
        if rank == 0 else None
    t_last = time.perf_counter()
    nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    for step in range(start, cfg.train.max_steps):
        g = torch.Generator(device).manual_seed(step_seed(cfg.train.seed, step, rank))
        K = distiller.sample_num_steps(torch.Generator().manual_seed(step_seed(cfg.train.seed, step, -1)))
        idx = torch.randint(len(prompts), (accum, micro), generator=g, device=device)
        uncond = {k: v.expand(micro, *v.shape[1:]) for k, v in uncond_one.items()}
        metrics = distiller.step([(cond_index(cond_all, i), uncond) for i in idx], K, g)
        metrics["nonfinite_total"] = nonfinite.observe(step + 1, metrics)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        metrics.update(lr_student=state.sched_student.get_last_lr()[0], lr_fake=state.sched_fake.get_last_lr()[0],
                       samples_per_s=cfg.train.batch_size / dt,
                       nfe_per_s=cfg.train.batch_size * nfe_per_sample[K] / dt)
        done = step + 1
        if bar is not None:
            bar.update(1)
        if logger is not None:
            logger.log_step(done, metrics)
        if done % cfg.train.sample_every == 0 or done == cfg.train.max_steps:
            if logger is not None:
                logger.log_samples(done)
            elif sharded:  # a sharded student samples only with every rank taking part in its all-gathers
                render_samples(backbone, spec, state.student, ws.prompts, cfg.student.steps)
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.max_steps:
            report = {"step": done, **{k: float(v) for k, v in metrics.items()}}
            writes = rank == 0 or sharded   # under DDP rank 0 holds the whole state; under FSDP every rank a shard
            with tempfile.TemporaryDirectory() as tmp:
                described = {"teacher": ws.teacher.model_dump(), "spec": spec.model_dump(mode="json"),
                             "scalers": distiller.scaler_state()}
                full = state.state_dict(done, cfg, described) if writes else {}
                if sharded:  # every rank writes its shards; Ray Train merges the ranks' directories
                    from .sharding import save_sharded, split_state
                    full, tensors = split_state(full)
                    save_sharded(tmp, tensors)
                if rank == 0:
                    save_state(tmp, full)
                    # small, human-readable description next to the state (read without loading weights)
                    (Path(tmp) / META_FILE).write_text(json.dumps({
                        "step": done, "run_id": ws.run_id, "config": cfg.model_dump(mode="json"), **described,
                        "metrics": report}, indent=2))
                ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp) if writes else None,
                                 checkpoint_dir_name=checkpoint_dir_name(done))
            if logger is not None:
                logger.log_checkpoint(done, ws.checkpoint_uri(done), metrics)
    if bar is not None:
        bar.close()
    if logger is not None:
        # never raises for the server's sake: a worker that fails here would be restarted by Ray Train
        logger.close()
    if monitor is not None:
        finish_within(monitor, cfg.train.tracking_grace_s)


def finish_within(monitor, timeout_s: float) -> None:
    """Stop an MLflow system-metrics monitor, waiting at most `timeout_s` for its last upload (its HTTP
    retries against an unreachable server would hold the worker for minutes)."""
    import threading

    t = threading.Thread(target=monitor.finish, name="tdm-system-metrics-finish", daemon=True)
    t.start()
    t.join(timeout_s)
