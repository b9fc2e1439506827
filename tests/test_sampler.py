"""The K-step sampler, its grids and per-sample seeding (tdm/sampler.py)."""
import pytest
import torch

from tdm.grids import grid_levels, uniform_grid
from tdm.sampler import sample, seeded_noise
from tdm.schedules import NoiseSchedule


def test_uniform_grid_hand_values():
    assert uniform_grid(4, 999) == [999, 749, 500, 250]   # round(999 i / 4)
    assert uniform_grid(2, 999) == [999, 500]
    assert uniform_grid(3, 999) == [999, 666, 333]
    assert uniform_grid(1, 899) == [899]
    assert grid_levels([999, 500]) == [0, 500, 999]


@pytest.mark.parametrize("k,t_start", [(0, 999), (1000, 999)])
def test_uniform_grid_rejects_bad_k(k, t_start):
    with pytest.raises(ValueError, match="num_steps"):
        uniform_grid(k, t_start)


def _schedule():
    return NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})


def test_sampler_follows_the_ddim_trajectory_of_an_oracle():
    """With a predictor that always answers x0 = c, DDIM keeps eps fixed at eps_0 = (z - a_K c) / s_K:
    x_{t_i} = a_i c + s_i eps_0, and the final sample is c."""
    sch = _schedule()
    c = torch.full((3, 1, 2, 2), 0.5)
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    def oracle(x, t):
        a, s = sch.alpha_sigma(t)
        return c, (x - a.view(-1, 1, 1, 1) * c) / s.view(-1, 1, 1, 1)

    grid = [999, 500, 100]
    traj = sample(oracle, z, grid, sch, keep_trajectory=True)
    assert traj.states.shape == (3, 3, 1, 2, 2) and traj.timesteps.tolist() == grid
    a_K, s_K = sch.alpha_sigma(torch.tensor([999]))
    eps0 = (z - a_K * c) / s_K
    assert torch.equal(traj.states[0], z)
    for i, ti in enumerate(grid[1:], start=1):
        a, s = sch.alpha_sigma(torch.tensor([ti]))
        assert torch.allclose(traj.states[i], a * c + s * eps0, atol=1e-5)
    assert torch.allclose(traj.final, c)
    assert torch.equal(sample(oracle, z, grid, sch), traj.final)


def test_sampler_rejects_non_descending_grid():
    with pytest.raises(ValueError, match="descending"):
        sample(lambda x, _t: (x, x), torch.zeros(1, 1), [100, 500], _schedule())


def test_seeded_noise_is_per_sample():
    a = seeded_noise([5, 6], (1, 4, 4))
    b = seeded_noise([6], (1, 4, 4))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
