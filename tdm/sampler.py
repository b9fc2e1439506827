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
