"""Student grids: the K network timesteps a few-step sampler visits (docs/method.md, eqs. 2.1 and 2.2).

Plain Python, no torch: the model spec (tdm.spec) and the serving HTTP tier use these without loading
a tensor library. tdm.sampler re-exports them.
"""
from __future__ import annotations

from typing import Literal, Sequence


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
