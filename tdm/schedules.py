"""Noise schedules and parameterisation conversions (docs/method.md §1 and §3).

Every noise level is a pair (alpha, sigma) with x_t = alpha * x0 + sigma * eps. The functions in
this module are pure tensor math on those pairs; `NoiseSchedule` only maps a teacher's timestep
`t` to its pair.

Shapes: `x`, `x0`, `eps`, `z` are (B, ...) tensors; `alpha` and `sigma` are (B,) tensors (one level
per sample) or Python floats, and are broadcast over the trailing dimensions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "flow"]


def _bc(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Reshape a per-sample (B,) tensor so it broadcasts against `like` (B, ...)."""
    if isinstance(v, torch.Tensor) and v.ndim == 1:
        return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)
    return v


def vp_alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP/DDPM level: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) (Ho et al. 2020, eq. 4; docs/method.md eq. 1.2).
    `t` is an integer index."""
    abar = alphas_cumprod.to(t.device)[t.long()]
    return abar.sqrt(), (1.0 - abar).sqrt()


def flow_sigma(t: torch.Tensor, num_train_timesteps: int, shift: float) -> torch.Tensor:
    """Rectified-flow sigma with time shift: sigma = s*u / (1 + (s-1)*u), u = t/T (SD3, Esser et al. 2024, eq. 23;
    docs/method.md eq. 1.3)."""
    u = t.float() / num_train_timesteps
    return shift * u / (1.0 + (shift - 1.0) * u)


def dynamic_flow_shift(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                       max_shift: float = 1.15, time_shift_type: str = "exponential") -> float:
    """The constant shift s of flow_sigma equal to a resolution-dependent ("dynamic") time shift at `seq_len`
    image tokens (FLUX.1, Qwen-Image; docs/method.md eq. 1.3b): mu is linear in seq_len through (base_seq_len,
    base_shift) and (max_seq_len, max_shift); exponential: sigma' = e^mu / (e^mu + 1/sigma - 1), i.e. s = e^mu;
    linear: sigma' = mu / (mu + 1/sigma - 1), i.e. s = mu."""
    mu = base_shift + (max_shift - base_shift) * (seq_len - base_seq_len) / (max_seq_len - base_seq_len)
    if time_shift_type == "exponential":
        return math.exp(mu)
    if time_shift_type == "linear":
        return mu
    raise ValueError(f"time_shift_type must be exponential or linear, got {time_shift_type!r}")


def flow_alpha_sigma(t: torch.Tensor, num_train_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow level: x_t = (1 - sigma) x0 + sigma eps, so alpha = 1 - sigma."""
    sigma = flow_sigma(t, num_train_timesteps, shift)
    return 1.0 - sigma, sigma


def to_x0_eps(out: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: PredictionType):
    """Convert a network output at x_t = alpha x0 + sigma eps into (x0, eps) (docs/method.md table 1.4).

    epsilon: x0 = (x - sigma out) / alpha,  eps = out
    v_prediction (v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1): x0 = alpha x - sigma out, eps = sigma x + alpha out
    flow (velocity v = eps - x0, alpha = 1 - sigma): x0 = x - sigma out, eps = x + alpha out
    """
    a, s = _bc(alpha, x), _bc(sigma, x)
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - s * out, s * x + a * out
    if prediction_type == "flow":
        return x - s * out, x + a * out
    raise ValueError(f"prediction_type must be one of epsilon, v_prediction, flow; got {prediction_type!r}")


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: PredictionType) -> torch.Tensor:
    """Inverse of `to_x0_eps`: the network output that predicts (x0, eps) at level (alpha, sigma)."""
    a, s = _bc(alpha, x0), _bc(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(f"prediction_type must be one of epsilon, v_prediction, flow; got {prediction_type!r}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_next, sigma_next) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) move to a new level: x' = alpha' x0 + sigma' eps (Song et al. 2021, eq. 12;
    docs/method.md eq. 1.5).

    For rectified flow this is exactly the Euler step of the velocity ODE.
    """
    return _bc(alpha_next, x0) * x0 + _bc(sigma_next, x0) * eps


def transition_coefficients(alpha_r, sigma_r, alpha_tau, sigma_tau):
    """Coefficients (A, B) of the forward kernel q(x_tau | x_r) = N(A x_r, B^2 I), tau noisier than r
    (docs/method.md eq. 3.2).

    A = alpha_tau / alpha_r,  B = sqrt(sigma_tau^2 - (A sigma_r)^2)  (clamped at 0 for rounding).
    """
    A = alpha_tau / alpha_r
    B2 = sigma_tau**2 - (A * sigma_r) ** 2
    B = B2.clamp_min(0.0).sqrt() if isinstance(B2, torch.Tensor) else max(B2, 0.0) ** 0.5
    return A, B


def transition(x_r: torch.Tensor, alpha_r, sigma_r, alpha_tau, sigma_tau, z: torch.Tensor) -> torch.Tensor:
    """Diffuse x_r forward to the noisier level tau: x_tau = A x_r + B z, z ~ N(0, I) (demo `Predictor.add_noise`)."""
    A, B = transition_coefficients(alpha_r, sigma_r, alpha_tau, sigma_tau)
    return _bc(A, x_r) * x_r + _bc(B, x_r) * z


def mixed_noise(eps_hat: torch.Tensor, alpha_r, sigma_r, alpha_tau, sigma_tau, z: torch.Tensor) -> torch.Tensor:
    """The noise m with x_tau = alpha_tau x0_hat + sigma_tau m when x_r = ddim(x0_hat, eps_hat, r).

    m = (A sigma_r eps_hat + B z) / sigma_tau (docs/method.md eq. 3.3; demo `obtain_mixed_noise`, with the sigma_r
    factor of commit 2f938bf).
    """
    A, B = transition_coefficients(alpha_r, sigma_r, alpha_tau, sigma_tau)
    return (_bc(A * sigma_r, eps_hat) * eps_hat + _bc(B, z) * z) / _bc(sigma_tau, z)


#: the terminal abar of a zero-terminal-SNR schedule, as diffusers' DPM-Solver and Euler schedulers floor it
TERMINAL_ALPHA_CUMPROD = 2.0 ** -24


def snr_shifted(alphas_cumprod: torch.Tensor, scale: float) -> torch.Tensor:
    """abar' = abar / (s + (1 - s) abar), i.e. SNR' = SNR / s: CogVideoX's `snr_shift_scale` (Yang et al. 2024,
    §3.1; docs/method.md eq. 1.7). (T,) -> (T,)."""
    return alphas_cumprod / (scale + (1.0 - scale) * alphas_cumprod)


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale sqrt(abar) linearly so that abar_0 is kept and abar_{T-1} = 0 (Lin et al. 2024, Algorithm 1;
    docs/method.md eq. 1.8). (T,) -> (T,)."""
    r = alphas_cumprod.double().sqrt()
    first, last = r[0].clone(), r[-1].clone()
    r = (r - last) * first / (first - last)
    return r.square().to(alphas_cumprod.dtype)


def snr(alpha, sigma):
    """Signal-to-noise ratio alpha^2 / sigma^2 (Kingma et al. 2021; docs/method.md eq. 1.6)."""
    return alpha**2 / sigma**2


#: FlowMatchEulerDiscreteScheduler config keys of dynamic shifting -> dynamic_flow_shift arguments
_DYNAMIC_KEYS = {"base_image_seq_len": "base_seq_len", "max_image_seq_len": "max_seq_len", "base_shift": "base_shift",
                 "max_shift": "max_shift", "time_shift_type": "time_shift_type"}


@dataclass(frozen=True)
class NoiseSchedule:
    """A teacher's noise schedule: maps timesteps t (teacher units, 0 = cleanest) to (alpha, sigma).

    kind "vp": DDPM/VP with `alphas_cumprod` (length T); t are integer indices in [0, T).
    kind "flow": rectified flow with `shift`; t are continuous in [0, T].
    """

    kind: Literal["vp", "flow"]
    prediction_type: PredictionType
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None
    shift: float = 1.0

    @property
    def discrete(self) -> bool:
        """Whether timesteps are integers (VP teachers are trained on integer t)."""
        return self.kind == "vp"

    @property
    def max_timestep(self) -> int:
        """Largest valid network timestep (T - 1 for VP; T for flow)."""
        return self.num_train_timesteps - 1 if self.kind == "vp" else self.num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float32 (B,) tensors for timesteps t (B,)."""
        if self.kind == "vp":
            if self.alphas_cumprod is None:
                raise ValueError("a VP schedule needs alphas_cumprod")
            return vp_alpha_sigma(self.alphas_cumprod.float(), t)
        return flow_alpha_sigma(t, self.num_train_timesteps, self.shift)

    def to_dict(self) -> dict:
        """JSON-able description (stored in checkpoints and exported artifacts)."""
        return {"kind": self.kind, "prediction_type": self.prediction_type,
                "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}

    @classmethod
    def from_scheduler_config(cls, config: dict, seq_len: int | None = None) -> "NoiseSchedule":
        """Build from a diffusers scheduler config: VP (DDPM/DDIM/PNDM/Euler/DPM-Solver/..., with CogVideoX's
        `snr_shift_scale` and `rescale_betas_zero_snr`) or rectified flow (FlowMatchEulerDiscrete `shift`;
        UniPC/DPM-Solver with `use_flow_sigmas` or prediction_type "flow_prediction" and `flow_shift`, as in
        Wan's hub configs). `seq_len`: the network's image tokens per sample, which a FlowMatch scheduler with
        `use_dynamic_shifting` turns into its shift (dynamic_flow_shift); without it, the config's `shift`."""
        T = int(config.get("num_train_timesteps", 1000))
        if "FlowMatch" in config.get("_class_name", "") or config.get("prediction_type") == "flow":
            if config.get("use_dynamic_shifting") and seq_len is not None:
                # the stock pipeline computes mu from its image token count and shifts with it
                shift = dynamic_flow_shift(seq_len, **{arg: config[k] for k, arg in _DYNAMIC_KEYS.items()
                                                       if config.get(k) is not None})
            else:
                shift = float(config.get("shift", 1.0))
            return cls(kind="flow", prediction_type="flow", num_train_timesteps=T, shift=shift)
        if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
            return cls(kind="flow", prediction_type="flow", num_train_timesteps=T,
                       shift=float(config.get("flow_shift") or 1.0))
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        abar = ddpm.alphas_cumprod.clone()  # type: ignore[attr-defined]
        if config.get("snr_shift_scale") is not None:
            abar = snr_shifted(abar, float(config["snr_shift_scale"]))
        if config.get("rescale_betas_zero_snr"):
            # Algorithm 1 ends at exactly 0; keep diffusers' floor (its DPM-Solver and Euler schedulers use
            # 2^-24) so the last level has a finite log-SNR and an exported DPM-Solver samples it
            abar = zero_terminal_snr(abar).clamp_min(TERMINAL_ALPHA_CUMPROD)
        pred = config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type must be epsilon or v_prediction for VP teachers, got {pred!r}")
        if pred == "epsilon" and config.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler: an epsilon-prediction model cannot have zero terminal SNR "
                             "(rescale_betas_zero_snr): x0 = (x - sigma eps) / alpha is undefined at alpha = 0")
        return cls(kind="vp", prediction_type=pred, num_train_timesteps=T, alphas_cumprod=abar)
