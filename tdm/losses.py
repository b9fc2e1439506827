"""The TDM objectives (docs/method.md §3-§5): noise-level sampling, the fake-score loss and the
generator loss. Pure functions over tensors; `tdm.distiller` wires them to the three networks.

Conventions: x0 tensors are (B, ...); per-sample quantities are (B,); `levels` is the ascending
list [t_0 = 0, t_1, ..., t_K] of a student grid (see `tdm.grids.grid_levels`).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

IntervalMode = Literal["separate", "to_terminal"]
GeneratorLoss = Literal["huber", "huber_vector", "mse"]


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG, diffusers / Ho & Salimans convention: uncond + scale (cond - uncond); scale 1 = conditional only
    (docs/method.md eq. 3.5).

    Linear in the prediction, so it is the same in x0, eps and v space for a fixed x_t. The demo's
    `cond + (cfg - 1)(cond - uncond)` is this formula with scale = cfg.
    """
    return uncond + scale * (cond - uncond)


def check_grid_margins(levels: Sequence[float], mode: IntervalMode, margin_low: float, margin_high: float,
                       randmid: bool, randmid_margin: float) -> None:
    """Raise ValueError unless every trajectory interval leaves a non-empty range for tau (and randmid's r)."""
    top = levels[-1]
    for k in range(1, len(levels)):
        r, u = levels[k - 1], levels[k]
        if randmid and u - randmid_margin <= r:
            raise ValueError(f"interval ({r}, {u}] is not wider than randmid_margin={randmid_margin}")
        r_max = u - randmid_margin if randmid else r
        hi = (u if mode == "separate" else top) - margin_high
        if hi <= max(r_max, margin_low):
            raise ValueError(f"interval ({r}, {u}] leaves no room for tau in [max(r, margin_low={margin_low}), "
                             f"{'u' if mode == 'separate' else 't_K'} - margin_high={margin_high})")


def sample_trajectory_index(batch: int, num_steps: int, generator: torch.Generator,
                            last_step_weight: float = 1.0) -> torch.Tensor:
    """Per-sample trajectory point k in {1..K}: which rollout state each sample trains on (docs/method.md §4
    step 1). Uniform (demo line 1103) at last_step_weight 1; otherwise P(k = 1) = w / (w + K - 1), the student's
    last step (the one that lands on clean samples), and 1 / (w + K - 1) for each other point. (batch,) int64."""
    if last_step_weight == 1.0 or num_steps == 1:   # keeps the uniform draw's random stream exactly
        return torch.randint(1, num_steps + 1, (batch,), generator=generator, device=generator.device)
    p = torch.ones(num_steps, dtype=torch.float64, device=generator.device)
    p[0] = last_step_weight
    return torch.multinomial(p, batch, replacement=True, generator=generator) + 1


def _uniform(lo: torch.Tensor, hi: torch.Tensor, discrete: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample U[lo, hi): integers (floor) for discrete timesteps, reals otherwise."""
    u = torch.rand(lo.shape, generator=generator, device=generator.device).to(lo.device)
    v = lo + u * (hi - lo)
    return v.floor().clamp(max=hi - 1) if discrete else v


def sample_noise_levels(levels: torch.Tensor, k: torch.Tensor, *, mode: IntervalMode, margin_low: float,
                        margin_high: float, randmid: bool, randmid_margin: float, discrete: bool,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (u, r, tau) per sample for trajectory points k (B,) (docs/method.md §4 steps 1-3, eq. 4.1).

    u = t_k is where the student is evaluated, r = t_{k-1} the next grid point (randmid: r ~ U[r, u - randmid_margin)),
    tau ~ U[max(r, margin_low), u - margin_high) in mode "separate" (disjoint intervals, eq. 5) or
    U[max(r, margin_low), t_K - margin_high) in mode "to_terminal". All in teacher timestep units.
    """
    levels = levels.to(k.device, torch.float32)
    u, r = levels[k], levels[k - 1]
    if randmid:
        r = _uniform(r, u - randmid_margin, discrete, generator)
    hi = (u if mode == "separate" else levels[-1].expand_as(u)) - margin_high
    tau = _uniform(torch.maximum(r, torch.full_like(r, margin_low)), hi, discrete, generator)
    return u, r, tau


def importance_weight(m: torch.Tensor, z: torch.Tensor, max_weight: float | None = None) -> torch.Tensor:
    """Tempered importance weight q(x_tau|x0_hat)/q(x_tau|x_r) per dimension: exp(-mean(m^2)/2 + mean(z^2)/2)
    (paper eq. 7; docs/method.md eq. 4.3).

    m is the mixed noise (target kernel), z the transition noise (proposal kernel); (B,) float32 out.
    """
    dims = tuple(range(1, m.ndim))
    log_w = -0.5 * m.float().square().mean(dims) + 0.5 * z.float().square().mean(dims)
    w = log_w.exp()
    return w if max_weight is None else w.clamp(max=max_weight)


def fake_score_loss(x0_fake: torch.Tensor, x0_target: torch.Tensor, snr_tau: torch.Tensor, weight: torch.Tensor,
                    snr_gamma: float | None) -> torch.Tensor:
    """Fake-score loss (paper eq. 7; docs/method.md eq. 4.2):
    mean_b[ w_b * min(SNR(tau_b), gamma) * mean_j (f_psi - x0_hat)^2 ].

    Min-SNR-gamma on an x0-MSE equals min(1, gamma/SNR) on the eps-MSE; gamma None disables the clamp
    (weight = SNR, i.e. plain eps-MSE).
    """
    mse = (x0_fake.float() - x0_target.detach().float()).square().mean(tuple(range(1, x0_fake.ndim)))
    w_snr = snr_tau if snr_gamma is None else snr_tau.clamp(max=snr_gamma)
    return (weight.detach() * w_snr.detach() * mse).mean()


def generator_normaliser(x0: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """Per-sample DMD normaliser n_b = mean_j |x0 - x0_real| (Yin et al. 2024, eq. 8; docs/method.md §3), float64,
    no grad."""
    n = (x0.detach().double() - x0_real.double()).abs().mean(tuple(range(1, x0.ndim)))
    return n.clamp_min(1e-12)


def pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """Element-wise pseudo-Huber sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, iCT)."""
    return (diff.square() + c * c).sqrt() - c


def generator_loss(x0: torch.Tensor, target: torch.Tensor, normaliser: torch.Tensor | None, kind: GeneratorLoss,
                   c: float) -> torch.Tensor:
    """Regression of the student's x0 onto the stop-gradient TDM target (paper eq. 6 and its surrogate objective;
    docs/method.md eqs. 3.6-3.8).

    huber:        mean_{b,j} [ pseudo_huber(x0 - target, c) / n_b ]           (demo, c = 1e-3)
    huber_vector: mean_b     [ (sqrt(||x0 - target||^2 + c^2) - c) / n_b ]      (paper, c = 0.00054 sqrt(d))
    mse:          mean_{b,j} [ (x0 - target)^2 / n_b ]
    With normaliser None, n_b = 1.
    """
    diff = x0.float() - target.detach().float()
    dims = tuple(range(1, x0.ndim))
    if kind == "huber":
        per_sample = pseudo_huber(diff, c).mean(dims)
    elif kind == "mse":
        per_sample = diff.square().mean(dims)
    elif kind == "huber_vector":
        per_sample = (diff.square().sum(dims) + c * c).sqrt() - c
    else:
        raise ValueError(f"generator loss kind must be huber, huber_vector or mse; got {kind!r}")
    if normaliser is not None:
        per_sample = per_sample / normaliser.to(per_sample.dtype)
    return per_sample.mean()


def tdm_target(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Stop-gradient revised sample x0 + (x0_real - x0_fake): one step along s_real - s_fake (paper eq. 6;
    docs/method.md eq. 3.4; demo `coop_samples`)."""
    return (x0 + (x0_real - x0_fake)).detach()
