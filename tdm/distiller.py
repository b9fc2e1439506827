"""One TDM iteration over the three roles (teacher, student, fake score). No Ray, no MLflow.

Forward passes per iteration, the minimum the method needs (docs/method.md §8):
  rollout          K student forwards, no grad, keeping every (x_t, x0, eps)
  fake-score step  1 fake forward + backward; x0/eps come from the rollout (the demo recomputes them,
                   and runs a teacher forward whose output it never reads)
  generator step   1 student forward + backward, 1 teacher forward on [cond; uncond] (one batched
                   call; cond alone under loss.teacher_guidance embedded), 1 fake forward, no grad
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .backbones.base import Cond, guided_x0_eps, predict_x0_eps, trainable_parameters
from .config import LossConfig, OptimConfig, StudentConfig
from .grids import GridRule, default_grid, grid_levels
from .losses import (
    check_grid_margins,
    fake_score_loss,
    generator_loss,
    generator_normaliser,
    importance_weight,
    sample_noise_levels,
    sample_trajectory_index,
    tdm_target,
)
from .sampler import Trajectory, sample
from .schedules import NoiseSchedule, ddim_step, mixed_noise, snr, transition


def student_grids(student: StudentConfig, schedule: NoiseSchedule, rule: GridRule = "uniform") -> dict[int, list]:
    """The descending timestep grid for every step count the student is trained for: explicit ones, else
    the default grid under `rule` (the backbone's `grid_rule`)."""
    t_start = student.t_start if student.t_start is not None else schedule.max_timestep
    if t_start > schedule.max_timestep:
        raise ValueError(f"student.t_start ({t_start}) exceeds the teacher's last timestep {schedule.max_timestep}")
    if rule == "flow_match" and student.t_start is not None:
        raise ValueError("student.t_start: this teacher's stock pipeline walks its scheduler's own grid from the "
                         "last timestep; give student.timesteps instead (not reproducible in stock diffusers)")
    explicit, grids = student.explicit_grids, {}
    for k in student.steps:
        if k in explicit:
            if explicit[k][0] > schedule.max_timestep:
                raise ValueError(f"student.timesteps start at {explicit[k][0]} for K={k}, beyond the teacher's "
                                 f"last timestep {schedule.max_timestep}")
            grids[k] = explicit[k]
        elif k > t_start:
            raise ValueError(f"student.num_steps/step_set: K={k} is larger than the schedule allows "
                             f"(t_start={t_start} timesteps)")
        else:
            grids[k] = default_grid(k, t_start, rule, schedule.num_train_timesteps, schedule.shift)
    return grids


def validate_grids(grids: dict[int, list[int]], loss: LossConfig) -> None:
    """Every interval of every grid must leave room for tau under the configured margins."""
    for k, grid in grids.items():
        try:
            check_grid_margins(grid_levels(grid), loss.interval, loss.margin_low, loss.margin_high, loss.randmid,
                               loss.randmid_margin)
        except ValueError as e:
            raise ValueError(f"loss margins vs student grid for K={k} {grid}: {e}") from None


class EMA:
    """Exponential moving average of a role's trainable parameters (kept in float32)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in trainable_parameters(module)]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = [p.detach().float() for p in trainable_parameters(module)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)  # one fused kernel per dtype/device

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for s, p in zip(self.shadow, trainable_parameters(module)):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = [t.clone() for t in state["shadow"]]


@dataclass
class _Levels:
    """Per-sample draws of one loss evaluation (all (B,) or (B, ...))."""

    u: torch.Tensor        # student timestep t_k
    x_u: torch.Tensor      # rollout state at t_k
    r: torch.Tensor        # intermediate level (t_{k-1}, or randmid)
    tau: torch.Tensor      # diffusion level in the interval
    z: torch.Tensor        # transition noise


def _grad_norm(params, max_norm: float | None) -> float:
    """Clip to max_norm; returns the pre-clip norm. Sharded (FSDP) gradients give a DTensor norm: its full
    value is the global norm over all shards, the same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


class TDMDistiller:
    """Runs TDM iterations. `student` and `fake` may be DDP-wrapped Denoisers; `teacher` is frozen.

    Step-count conditioning (TDM-unify) is active when the student config has a step set; then the
    student and the fake score receive K, the teacher does not.
    """

    def __init__(self, student_cfg: StudentConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig,
                 schedule: NoiseSchedule, latent_shape: Sequence[int], teacher: nn.Module, student: nn.Module,
                 fake: nn.Module, opt_student, opt_fake, sched_student=None, sched_fake=None, ema: EMA | None = None,
                 mixed_precision: str = "no", device_type: str = "cpu", grad_sync=None,
                 grid_rule: GridRule = "uniform", guide=None):
        self.student_cfg, self.loss_cfg, self.optim_cfg = student_cfg, loss_cfg, optim_cfg
        self.schedule, self.latent_shape = schedule, tuple(latent_shape)
        self.teacher, self.student, self.fake = teacher, student, fake
        self.opt_student, self.opt_fake = opt_student, opt_fake
        self.sched_student, self.sched_fake = sched_student, sched_fake
        self.ema = ema
        # how the teacher's two CFG branches combine (Backbone.guide; None: linear CFG)
        self.guide = guide
        # data-parallel gradient averaging for roles that are not DDP-wrapped (LoRA roles share one base,
        # which DDP cannot wrap twice): called with a role's parameters before its optimizer step
        self.grad_sync = grad_sync
        # bf16/fp16 autocast for the network calls; the TDM math (conversions, losses) stays in float32.
        # fp16 needs loss scaling: one GradScaler per optimizer.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
        fp16 = mixed_precision == "fp16"
        self.scaler_student = torch.amp.GradScaler(device_type) if fp16 else None
        self.scaler_fake = torch.amp.GradScaler(device_type) if fp16 else None
        self.grids = student_grids(student_cfg, schedule, grid_rule)
        validate_grids(self.grids, loss_cfg)
        self.step_values = student_cfg.steps
        given = student_cfg.step_set or self.step_values
        probs = student_cfg.step_probs or [1.0] * len(given)
        self.step_probs = torch.tensor([probs[given.index(v)] for v in self.step_values], dtype=torch.float64)
        self.step_probs /= self.step_probs.sum()
        d = math.prod(self.latent_shape)
        c = loss_cfg.huber_c
        self.huber_c = c if c is not None else (1e-3 if loss_cfg.generator_loss == "huber" else 0.00054 * math.sqrt(d))

    # ------------------------------------------------------------------ helpers
    def sample_num_steps(self, generator: torch.Generator) -> int:
        """K for this iteration (fixed K, or drawn from the TDM-unify set). Use a rank-independent generator."""
        if len(self.step_values) == 1:
            return self.step_values[0]
        u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device).cpu()
        idx = int(torch.searchsorted(self.step_probs.cumsum(0), u).clamp(max=len(self.step_values) - 1))
        return self.step_values[idx]

    def _steps_cond(self, K: int, batch: int, device) -> torch.Tensor | None:
        return torch.full((batch,), K, device=device) if self.student_cfg.unify else None

    def rollout(self, cond: Cond, K: int, noise: torch.Tensor) -> Trajectory:
        """Student K-step sampling from `noise` without grad, keeping every state and prediction."""
        steps = self._steps_cond(K, noise.shape[0], noise.device)
        with torch.no_grad():
            return sample(lambda x, t: predict_x0_eps(self.student, self.schedule, x, t, cond, steps),
                          noise, self.grids[K], self.schedule, keep_trajectory=True)

    def _draw_levels(self, traj: Trajectory, K: int, generator: torch.Generator) -> tuple[_Levels, torch.Tensor]:
        """Trajectory point k in {1..K} per sample (uniform unless loss.last_step_weight) and its (u, r, tau, z);
        returns the levels and the rollout's sampling-order index of each sample's point."""
        B, lc = traj.states.shape[1], self.loss_cfg
        k = sample_trajectory_index(B, K, generator, lc.last_step_weight).to(traj.states.device)
        levels = torch.tensor(grid_levels(self.grids[K]), device=k.device)
        u, r, tau = sample_noise_levels(levels, k, mode=lc.interval, margin_low=lc.margin_low,
                                        margin_high=lc.margin_high, randmid=lc.randmid,
                                        randmid_margin=lc.randmid_margin, discrete=self.schedule.discrete,
                                        generator=generator)
        i = K - k  # trajectory point k sits at sampling index K - k (index 0 is the noisiest, t_K)
        rows = torch.arange(B, device=k.device)
        z = torch.randn(traj.states.shape[1:], generator=generator, device=generator.device).to(traj.states)
        return _Levels(u=u, x_u=traj.states[i, rows], r=r, tau=tau, z=z), i

    def _diffuse(self, x0, eps, lv: _Levels):
        """x_r = DDIM(x0, eps -> r), x_tau ~ q(x_tau | x_r), plus the level coefficients."""
        a_r, s_r = self.schedule.alpha_sigma(lv.r)
        a_t, s_t = self.schedule.alpha_sigma(lv.tau)
        x_r = ddim_step(x0, eps, a_r, s_r)
        x_tau = transition(x_r, a_r, s_r, a_t, s_t, lv.z)
        return x_tau, (a_r, s_r, a_t, s_t)

    def scaler_state(self) -> dict | None:
        """The fp16 loss scalers' state (scale, growth tracker: plain numbers), for a checkpoint; None
        without fp16. A resume that dropped it would restart from scale 65536 and skip steps again."""
        if self.scaler_student is None or self.scaler_fake is None:
            return None
        return {"student": self.scaler_student.state_dict(), "fake": self.scaler_fake.state_dict()}

    def load_scaler_state(self, state: dict | None) -> None:
        if state is not None and self.scaler_student is not None and self.scaler_fake is not None:
            self.scaler_student.load_state_dict(state["student"])
            self.scaler_fake.load_state_dict(state["fake"])

    def _update(self, opt, sched, scaler) -> float:
        """(All-reduce,) unscale, clip (returns the pre-clip grad norm), optimizer and LR-scheduler step.
        A non-finite gradient (from a non-finite loss, or an overflow) skips the optimizer step: the
        weights stay as they were (the fp16 scaler also lowers its scale). The LR schedule still advances,
        so it stays a function of the iteration. Every rank sees the same all-reduced gradients, hence
        makes the same choice."""
        params = [p for group in opt.param_groups for p in group["params"]]  # this role's, not the shared base's
        if self.grad_sync is not None:
            self.grad_sync(params)
        if scaler is not None:
            scaler.unscale_(opt)
        gn = _grad_norm(params, self.optim_cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)   # skips the step itself on inf/NaN gradients
            scaler.update()
        elif math.isfinite(gn):
            opt.step()
        if sched is not None:
            sched.step()
        return gn

    def _backward(self, loss: torch.Tensor, module: nn.Module, scaler, last: bool) -> None:
        """Accumulate gradients; DDP all-reduces, and FSDP reduce-scatters, only on the last micro-batch."""
        # an FSDP2 role, or a LoRA role whose shared base is the FSDP root (tdm.sharding.shard_base)
        set_sync = getattr(module, "set_requires_gradient_sync", None) or \
            getattr(getattr(module, "net", None), "set_requires_gradient_sync", None)
        if set_sync is not None:
            set_sync(last)
        no_sync = getattr(module, "no_sync", None)
        sync = no_sync() if (not last and no_sync is not None) else contextlib.nullcontext()
        with sync:
            (scaler.scale(loss) if scaler is not None else loss).backward()

    # ------------------------------------------------------------------ the iteration
    def fake_loss(self, traj: Trajectory, cond: Cond, K: int, generator: torch.Generator):
        """Fake-score loss on the rollout's own predictions (eq. 7). Returns (levels, loss, weights)."""
        lv, i = self._draw_levels(traj, K, generator)
        rows = torch.arange(len(i), device=i.device)
        x0, eps = traj.x0[i, rows], traj.eps[i, rows]
        x_tau, (a_r, s_r, a_t, s_t) = self._diffuse(x0, eps, lv)
        if self.loss_cfg.importance_weight:
            w = importance_weight(mixed_noise(eps, a_r, s_r, a_t, s_t, lv.z), lv.z, self.loss_cfg.importance_weight_max)
        else:
            w = torch.ones_like(lv.tau)
        with self.autocast():
            x0_fake, _ = predict_x0_eps(self.fake, self.schedule, x_tau, lv.tau, cond,
                                        self._steps_cond(K, len(i), x_tau.device))
        return lv, fake_score_loss(x0_fake, x0, snr(a_t, s_t), w, self.loss_cfg.snr_gamma), w

    def generator_loss(self, lv: _Levels, cond: Cond, uncond: Cond, K: int):
        """Student loss: single-step grad through the student at x_{t_k}; TDM target from the teacher
        (CFG) minus the fake score at x_tau (eq. 6); pseudo-Huber / MSE with the DMD normaliser.
        Returns (loss, rms score gap)."""
        steps = self._steps_cond(K, lv.u.shape[0], lv.u.device)
        with self.autocast():
            x0, eps = predict_x0_eps(self.student, self.schedule, lv.x_u, lv.u, cond, steps)
        x_tau, _ = self._diffuse(x0.detach(), eps.detach(), lv)
        with torch.no_grad(), self.autocast():
            if self.loss_cfg.teacher_guidance == "embedded":   # the scale is in `cond` (Backbone.with_guidance)
                x0_real, _ = predict_x0_eps(self.teacher, self.schedule, x_tau, lv.tau, cond)
            else:
                x0_real, _ = guided_x0_eps(self.teacher, self.schedule, x_tau, lv.tau, cond, uncond,
                                           self.loss_cfg.guidance_scale, self.guide)
            x0_fake, _ = predict_x0_eps(self.fake, self.schedule, x_tau, lv.tau, cond, steps)
        target = tdm_target(x0.detach(), x0_real, x0_fake)
        norm = generator_normaliser(x0, x0_real) if self.loss_cfg.normalize else None
        loss = generator_loss(x0, target, norm, self.loss_cfg.generator_loss, self.huber_c)
        return loss, (x0_real - x0_fake).float().square().mean().sqrt()

    def step(self, micro_batches: Sequence[tuple[Cond, Cond]], K: int, generator: torch.Generator) -> dict:
        """One TDM iteration over micro-batches [(cond, uncond), ...] (gradient accumulation: the
        losses are averaged, each network steps once). Returns scalar metrics."""
        n = len(micro_batches)
        with self.autocast():
            trajs = [self.rollout(c, K, torch.randn((cond_batch(c), *self.latent_shape), generator=generator,
                                                    device=generator.device)) for c, _ in micro_batches]
        metrics: dict[str, float] = {}
        for _ in range(self.optim_cfg.fake_updates_per_step):
            self.opt_fake.zero_grad(set_to_none=True)
            levels, loss_f, w_mean = [], 0.0, 0.0
            for j, (traj, (cond, _)) in enumerate(zip(trajs, micro_batches)):
                lv, loss, w = self.fake_loss(traj, cond, K, generator)
                self._backward(loss / n, self.fake, self.scaler_fake, last=j == n - 1)
                levels.append(lv)
                loss_f += loss.item() / n
                w_mean += w.mean().item() / n
            gn = self._update(self.opt_fake, self.sched_fake, self.scaler_fake)
            metrics.update(loss_fake=loss_f, grad_norm_fake=gn, importance_weight=w_mean)
        if self.loss_cfg.resample_for_generator:
            levels = [self._draw_levels(traj, K, generator)[0] for traj in trajs]
        self.opt_student.zero_grad(set_to_none=True)
        loss_s, gap = 0.0, 0.0
        for j, (lv, (cond, uncond)) in enumerate(zip(levels, micro_batches)):
            loss, g = self.generator_loss(lv, cond, uncond, K)
            self._backward(loss / n, self.student, self.scaler_student, last=j == n - 1)
            loss_s += loss.item() / n
            gap += g.item() / n
        gn = self._update(self.opt_student, self.sched_student, self.scaler_student)
        if self.ema is not None:
            self.ema.update(self.student)
        metrics.update(loss_student=loss_s, grad_norm_student=gn, score_gap=gap, num_steps=K)
        # updates skipped for a non-finite loss or gradient, this iteration (tdm.train stops the run after
        # train.max_nonfinite_steps iterations in a row with one)
        metrics["nonfinite_updates"] = float(sum(not math.isfinite(metrics[k]) for k in
                                                 ("grad_norm_fake", "grad_norm_student", "loss_fake", "loss_student")
                                                 if k in metrics) > 0)
        return metrics


def cond_batch(cond: Cond) -> int:
    return next(iter(cond.values())).shape[0]


def allreduce_mean(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of `params` over the process group, in one flat buffer (a missing grad
    counts as zero, so ranks stay in lock-step)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = g.view_as(p)
