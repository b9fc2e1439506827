"""Hand-computed checks of the TDM loss terms (tdm/losses.py)."""
import math

import pytest
import torch

from tdm.losses import (
    check_grid_margins,
    classifier_free_guidance,
    fake_score_loss,
    generator_loss,
    generator_normaliser,
    importance_weight,
    pseudo_huber,
    sample_noise_levels,
    sample_trajectory_index,
    tdm_target,
)


def test_cfg_convention():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert classifier_free_guidance(cond, uncond, 2.0).item() == 5.0  # uncond + 2 (cond - uncond)
    assert classifier_free_guidance(cond, uncond, 1.0).item() == 3.0  # scale 1 = conditional only


def test_trajectory_index_range():
    k = sample_trajectory_index(10_000, 4, torch.Generator().manual_seed(0))
    assert set(k.tolist()) == {1, 2, 3, 4}


def test_trajectory_index_last_step_weight():
    # weight 1 is the paper's uniform draw, bit for bit (same random stream as before the option existed)
    uniform = torch.randint(1, 5, (1000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_trajectory_index(1000, 4, torch.Generator().manual_seed(3), 1.0), uniform)
    # w = 3, K = 4: P(k=1) = 3 / (3 + 3) = 1/2, P(k=2..4) = 1/6 each
    k = sample_trajectory_index(60_000, 4, torch.Generator().manual_seed(0), 3.0)
    freq = torch.bincount(k, minlength=5)[1:].double() / len(k)
    assert torch.allclose(freq, torch.tensor([1 / 2, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64), atol=0.01)
    # w = 0.5, K = 2: P(k=1) = 0.5 / 1.5 = 1/3
    k = sample_trajectory_index(60_000, 2, torch.Generator().manual_seed(1), 0.5)
    assert abs(float((k == 1).double().mean()) - 1 / 3) < 0.01 and set(k.tolist()) == {1, 2}
    # K = 1: the one point, whatever the weight
    assert sample_trajectory_index(7, 1, torch.Generator().manual_seed(0), 5.0).tolist() == [1] * 7


def _levels(mode, randmid=False):
    levels = torch.tensor([0, 250, 500])
    k = torch.tensor([1] * 5000 + [2] * 5000)
    return k, sample_noise_levels(levels, k, mode=mode, margin_low=20, margin_high=10, randmid=randmid,
                                  randmid_margin=20, discrete=True, generator=torch.Generator().manual_seed(0))


def test_noise_levels_separate_intervals():
    k, (u, r, tau) = _levels("separate")
    one, two = k == 1, k == 2
    assert u[one].unique().tolist() == [250] and r[one].unique().tolist() == [0]
    assert tau[one].min() == 20 and tau[one].max() == 239          # [max(0, 20), 250 - 10)
    assert tau[two].min() == 250 and tau[two].max() == 489         # [250, 500 - 10)
    assert torch.equal(tau, tau.floor())


def test_noise_levels_to_terminal_and_randmid():
    k, (u, r, tau) = _levels("to_terminal")
    assert tau[k == 1].min() == 20 and tau[k == 1].max() == 489    # up to t_K - 10
    k, (u, r, tau) = _levels("separate", randmid=True)
    assert r[k == 1].min() == 0 and r[k == 1].max() == 229         # r ~ U[0, 250 - 20)
    assert bool((tau >= torch.clamp(r, min=20)).all()) and bool((tau < u - 10).all())


def test_grid_margin_check():
    check_grid_margins([0, 250, 500], "separate", 20, 10, False, 20)
    with pytest.raises(ValueError, match="no room for tau"):
        check_grid_margins([0, 25, 500], "separate", 20, 10, False, 20)
    with pytest.raises(ValueError, match="randmid_margin"):
        check_grid_margins([0, 15, 500], "separate", 0, 0, True, 20)


def test_importance_weight_hand_values():
    z = torch.zeros(2, 4)
    m = torch.ones(2, 4)
    assert importance_weight(m, z).tolist() == pytest.approx([math.exp(-0.5)] * 2)
    assert importance_weight(z, m).tolist() == pytest.approx([math.exp(0.5)] * 2)
    assert importance_weight(z, m, max_weight=1.2).tolist() == pytest.approx([1.2] * 2)
    assert importance_weight(m, m).tolist() == [1.0, 1.0]


def test_fake_score_loss_hand_value():
    x0_fake, target = torch.ones(2, 4), torch.zeros(2, 4)   # per-sample mse 1
    snr_tau = torch.tensor([10.0, 2.0])                      # min(snr, 5) -> 5, 2
    w = torch.tensor([0.5, 1.0])
    assert fake_score_loss(x0_fake, target, snr_tau, w, 5.0).item() == pytest.approx((2.5 + 2.0) / 2)
    assert fake_score_loss(x0_fake, target, snr_tau, w, None).item() == pytest.approx((5.0 + 2.0) / 2)


def test_normaliser_and_huber():
    assert generator_normaliser(torch.tensor([[1.0, -3.0]]), torch.zeros(1, 2)).item() == 2.0
    assert pseudo_huber(torch.tensor([0.0, 3.0]), 4.0).tolist() == [0.0, 1.0]   # sqrt(9 + 16) - 4


def test_generator_loss_variants_hand_values():
    x0, target = torch.full((1, 4), 3.0, requires_grad=True), torch.zeros(1, 4)
    n = torch.tensor([2.0], dtype=torch.float64)
    assert generator_loss(x0, target, n, "huber", 4.0).item() == pytest.approx(0.5)           # 1 / 2
    assert generator_loss(x0, target, n, "mse", 1.0).item() == pytest.approx(4.5)             # 9 / 2
    assert generator_loss(x0, target, n, "huber_vector", 8.0).item() == pytest.approx(1.0)    # (10 - 8) / 2
    assert generator_loss(x0, target, None, "huber_vector", 8.0).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="generator loss"):
        generator_loss(x0, target, None, "l1", 1.0)


def test_generator_gradient_points_along_the_score_gap():
    """d L / d x0 for MSE = 2 (x0 - target) / (d n) = -2 (real - fake) / (d n): the DMD/TDM update direction."""
    x0 = torch.zeros(1, 4, requires_grad=True)
    real, fake = torch.tensor([[1.0, -1.0, 2.0, 0.0]]), torch.zeros(1, 4)
    target = tdm_target(x0, real, fake)
    assert not target.requires_grad
    generator_loss(x0, target, None, "mse", 1.0).backward()
    assert torch.allclose(x0.grad, -2 * (real - fake) / 4)
