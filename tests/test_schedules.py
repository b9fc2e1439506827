"""Hand-computed checks of the noise-schedule math (tdm/schedules.py)."""
import math

import pytest
import torch

from tdm.schedules import (
    NoiseSchedule,
    ddim_step,
    flow_alpha_sigma,
    flow_sigma,
    from_x0_eps,
    mixed_noise,
    snr,
    to_x0_eps,
    transition,
    transition_coefficients,
    vp_alpha_sigma,
)

A_R, S_R = 0.9, math.sqrt(0.19)     # level r: abar = 0.81
A_T, S_T = 0.6, 0.8                 # level tau: abar = 0.36


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_vp_alpha_sigma():
    a, s = vp_alpha_sigma(t(0.81, 0.36), torch.tensor([0, 1]))
    assert torch.allclose(a, t(0.9, 0.6)) and torch.allclose(s, t(math.sqrt(0.19), 0.8))


def test_flow_sigma_shift():
    assert flow_sigma(torch.tensor([500.0]), 1000, 3.0).item() == pytest.approx(0.75)  # 3*.5/(1+2*.5)
    assert flow_sigma(torch.tensor([250.0]), 1000, 1.0).item() == pytest.approx(0.25)
    a, s = flow_alpha_sigma(torch.tensor([1000.0]), 1000, 3.0)
    assert (a.item(), s.item()) == pytest.approx((0.0, 1.0))


@pytest.mark.parametrize("pred,alpha,sigma,out", [
    ("epsilon", 0.6, 0.8, 2.0),          # out = eps
    ("v_prediction", 0.6, 0.8, 0.4),     # v = a eps - s x0 = 1.2 - 0.8
    ("flow", 0.75, 0.25, 1.0),           # v = eps - x0
])
def test_to_x0_eps_hand_values(pred, alpha, sigma, out):
    x0, eps = 1.0, 2.0
    x = torch.tensor([[alpha * x0 + sigma * eps]])
    got_x0, got_eps = to_x0_eps(torch.tensor([[out]]), x, torch.tensor([alpha]), torch.tensor([sigma]), pred)
    assert got_x0.item() == pytest.approx(1.0) and got_eps.item() == pytest.approx(2.0)
    assert from_x0_eps(got_x0, got_eps, torch.tensor([alpha]), torch.tensor([sigma]), pred).item() == pytest.approx(out)


def test_to_x0_eps_rejects_unknown_parameterisation():
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(torch.zeros(1, 1), torch.zeros(1, 1), 1.0, 0.0, "sample")


def test_ddim_step_and_snr():
    assert ddim_step(t(1.0), t(2.0), A_T, S_T).item() == pytest.approx(2.2)
    assert snr(A_T, S_T) == pytest.approx(0.5625)


def test_transition_hand_value():
    A, B = transition_coefficients(t(A_R), t(S_R), t(A_T), t(S_T))
    assert A.item() == pytest.approx(2 / 3)
    assert B.item() == pytest.approx(math.sqrt(0.64 - 4 / 9 * 0.19))  # 0.745356
    x = transition(t(1.0), t(A_R), t(S_R), t(A_T), t(S_T), t(1.0))
    assert x.item() == pytest.approx(2 / 3 + 0.745356, abs=1e-6)


def test_transition_preserves_the_marginal():
    """x_r ~ N(a_r x0, s_r^2) diffused to tau must have variance s_tau^2 around a_tau x0."""
    g = torch.Generator().manual_seed(0)
    x_r = A_R * 1.0 + S_R * torch.randn(200_000, generator=g, dtype=torch.float64)
    x_t = transition(x_r, A_R, S_R, A_T, S_T, torch.randn(200_000, generator=g, dtype=torch.float64))
    assert x_t.mean().item() == pytest.approx(A_T, abs=5e-3)
    assert x_t.std().item() == pytest.approx(S_T, abs=5e-3)


def test_mixed_noise_reconstructs_x_tau():
    """x_tau = a_tau x0_hat + s_tau m (hand value m = 1.658179 for x0 = 1, eps = 2, z = 1)."""
    x0, eps, z = t(1.0), t(2.0), t(1.0)
    x_r = ddim_step(x0, eps, A_R, S_R)
    x_tau = transition(x_r, t(A_R), t(S_R), t(A_T), t(S_T), z)
    m = mixed_noise(eps, t(A_R), t(S_R), t(A_T), t(S_T), z)
    assert m.item() == pytest.approx(1.658179, abs=1e-6)
    assert (A_T * x0 + S_T * m).item() == pytest.approx(x_tau.item())


def test_schedule_from_diffusers_config():
    s = NoiseSchedule.from_scheduler_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                                             "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})
    a, sig = s.alpha_sigma(torch.tensor([0, 1]))
    beta1 = 1e-4 + (0.02 - 1e-4) / 999
    assert a[0].item() ** 2 == pytest.approx(1 - 1e-4)
    assert a[1].item() ** 2 == pytest.approx((1 - 1e-4) * (1 - beta1), rel=1e-6)
    assert (a**2 + sig**2).tolist() == pytest.approx([1.0, 1.0])
    assert s.discrete and s.max_timestep == 999 and s.prediction_type == "epsilon"
    f = NoiseSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert f.kind == "flow" and not f.discrete and f.max_timestep == 1000
    assert f.alpha_sigma(torch.tensor([500.0]))[1].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_scheduler_config({"prediction_type": "sample"})


def test_dynamic_flow_shift_is_the_schedulers_resolution_shift():
    """FLUX.1 at 1024px: 4096 tokens, mu = max_shift = 1.15, s = e^1.15; at 256 tokens mu = 0.5 (eq. 1.3b);
    and the stock scheduler's shifted sigmas are flow_sigma's at that s."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tdm.schedules import dynamic_flow_shift, flow_sigma

    assert dynamic_flow_shift(4096) == pytest.approx(math.exp(1.15))
    assert dynamic_flow_shift(256) == pytest.approx(math.exp(0.5))
    assert dynamic_flow_shift(2176) == pytest.approx(math.exp(0.825))           # halfway
    assert dynamic_flow_shift(2176, time_shift_type="linear") == pytest.approx(0.825)
    with pytest.raises(ValueError, match="time_shift_type"):
        dynamic_flow_shift(16, time_shift_type="cubic")
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = 0.5 + 0.65 * (1024 - 256) / 3840
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    schedule = NoiseSchedule.from_scheduler_config(dict(sched.config, _class_name="FlowMatchEulerDiscreteScheduler"),
                                                   seq_len=1024)
    ours = flow_sigma(torch.tensor([1000.0, 750.0, 500.0, 250.0]), 1000, schedule.shift)
    assert torch.allclose(ours, sched.sigmas[:4].float(), atol=1e-6)
    # without a token count, the config's fixed shift
    assert NoiseSchedule.from_scheduler_config(dict(sched.config, _class_name="FlowMatchEulerDiscreteScheduler")
                                               ).shift == 1.0
