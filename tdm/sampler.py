"""The deterministic K-step sampler shared by the student, the teacher baselines and export.

A grid is the list of K network timesteps t_K > ... > t_1 (teacher units). Starting from pure noise
labelled t_K, each step predicts (x0, eps) and moves deterministically (DDIM, eta = 0) to the next
grid point; the last step returns its x0 prediction, i.e. the terminal level t_0 is "clean".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence, overload

import torch

from .schedules import NoiseSchedule, ddim_step

#: predict(x_t, t) -> (x0, eps); t is a (B,) tensor of timesteps.
Predictor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def uniform_grid(num_steps: int, t_start: int) -> list[int]:
    """Uniform student grid t_i = round(T_start * i / K) for i = K..1 (docs/method.md eq. 2.1), descending."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps > t_start:
        raise ValueError(f"num_steps ({num_steps}) must be <= t_start ({t_start}) so grid points are distinct")
    return [(t_start * i * 2 + num_steps) // (2 * num_steps) for i in range(num_steps, 0, -1)]


#: how a model's default K-step grid is laid out: "uniform" (eq. 2.1), or "flow_match" for a flow teacher
#: whose stock pipeline takes no timesteps or sigmas (Wan), so that its exported scheduler walks the same
#: grid (eq. 2.2)
GridRule = Literal["uniform", "flow_match"]


def flow_match_grid(num_steps: int, num_train_timesteps: int, shift: float) -> list[float]:
    """The K-step grid (tdm units: unshifted t in [0, T], descending) that diffusers'
    FlowMatchEulerDiscreteScheduler(shift=s, shift_terminal=sigma_K) walks for num_inference_steps=K, with
    sigma_K the uniform grid's last level sigma(T/K) (docs/method.md eq. 2.2): K levels linear in t from T to
    T * sigma(1/T), shifted, stretched in 1 - sigma to end at sigma_K, unshifted back."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    T, s = float(num_train_timesteps), float(shift)
    if num_steps == 1:
        return [T]

    def sigma(u):
        return s * u / (1 + (s - 1) * u)

    s_min = sigma(1 / T)                                     # the scheduler's own smallest sigma
    u = [1 + (s_min - 1) * i / (num_steps - 1) for i in range(num_steps)]
    sig = [sigma(x) for x in u]
    end = sigma(1 / num_steps)                               # shift_terminal: the uniform grid's last level
    scale = (1 - sig[-1]) / (1 - end)
    sig = [1 - (1 - x) / scale for x in sig]
    return [T * x / (s - (s - 1) * x) for x in sig]          # sigma -> t (inverse shift)


def default_grid(num_steps: int, t_start: int, rule: GridRule = "uniform", num_train_timesteps: int = 1000,
                 shift: float = 1.0) -> list:
    """The default grid of K steps under `rule` (flow_match ignores t_start: it starts at T)."""
    if rule == "flow_match":
        return flow_match_grid(num_steps, num_train_timesteps, shift)
    return uniform_grid(num_steps, t_start)


def grid_levels(timesteps: Sequence[int]) -> list[int]:
    """Ascending levels [t_0 = 0, t_1, ..., t_K] of a descending grid; index k is trajectory point k."""
    return [0] + sorted(timesteps)


@dataclass
class Trajectory:
    """A sampler run. Index i follows the sampling order (i = 0 is the noisiest point t_K).

    timesteps: (K,) descending; states: (K, B, ...) the x_t fed to the network at each step;
    x0, eps: (K, B, ...) its predictions. `final` is the sample (x0 of the last step).
    """

    timesteps: torch.Tensor
    states: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.x0[-1]


@overload
def sample(predict: Predictor, noise: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
           keep_trajectory: Literal[False] = False) -> torch.Tensor: ...


@overload
def sample(predict: Predictor, noise: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
           keep_trajectory: Literal[True]) -> Trajectory: ...


def sample(predict: Predictor, noise: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
           keep_trajectory: bool = False) -> torch.Tensor | Trajectory:
    """Run the K-step DDIM sampler from `noise` (labelled t_K) over a descending grid.

    Returns the final sample (B, ...), or the full `Trajectory` when keep_trajectory is set.
    """
    B, device = noise.shape[0], noise.device
    ts = torch.as_tensor(list(timesteps), device=device)
    if ts.ndim != 1 or len(ts) == 0 or (len(ts) > 1 and not bool((ts[:-1] > ts[1:]).all())):
        raise ValueError(f"timesteps must be a non-empty strictly descending list, got {list(timesteps)}")
    x = noise
    states, x0s, epss = [], [], []
    for i, t in enumerate(ts):
        x0, eps = predict(x, t.expand(B))
        if keep_trajectory:
            states.append(x)
            x0s.append(x0)
            epss.append(eps)
        if i + 1 < len(ts):
            a, s = schedule.alpha_sigma(ts[i + 1].expand(B))
            x = ddim_step(x0, eps, a, s)
    if keep_trajectory:
        return Trajectory(ts, torch.stack(states), torch.stack(x0s), torch.stack(epss))
    return x0


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Initial noise (len(seeds), *shape), one generator per sample, so a sample never depends on its batch."""
    out = torch.empty(len(seeds), *shape, dtype=torch.float32)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(*shape, generator=torch.Generator().manual_seed(int(s)))
    return out.to(device=device, dtype=dtype)
