"""One TDM iteration on tiny models: it learns, touches only what it should, and spends no wasted passes."""
import math

import pytest
import torch

from tdm.backbones import load_backbone
from tdm.config import load_config
from tdm.distiller import TDMDistiller, student_grids
from tdm.sampler import Trajectory
from tdm.train import build_roles


def _distiller(tiny_dir, **overrides):
    cfg = load_config(overrides)
    b = load_backbone(tiny_dir)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    cond = b.encode_prompts(["a handwritten digit 1", "a handwritten digit 2"] * 2)
    uncond = b.encode_prompts([""] * 4)
    return d, cond, uncond, st


class CallCounter:
    """Counts forward calls and samples of a module (through its forward hooks)."""

    def __init__(self, module):
        self.calls, self.samples, self.grad_calls = 0, 0, 0
        module.register_forward_hook(self.hook)

    def hook(self, _module, args, _output):
        self.calls += 1
        self.samples += args[0].shape[0]
        self.grad_calls += int(torch.is_grad_enabled())


@pytest.mark.parametrize("resample", [True, False])
def test_minimal_forward_passes(tiny_toy_dir, resample):
    d, cond, uncond, _ = _distiller(tiny_toy_dir, loss={"resample_for_generator": resample})
    counters = {name: CallCounter(getattr(d, name)) for name in ("teacher", "student", "fake")}
    d.step([(cond, uncond)], 4, torch.Generator().manual_seed(0))
    s, t, f = counters["student"], counters["teacher"], counters["fake"]
    assert (s.calls, s.grad_calls) == (4 + 1, 1)      # K rollout forwards (no grad) + one with grad
    assert (t.calls, t.samples) == (1, 2 * 4)          # cond and uncond in ONE batched call, no fake-step forward
    assert (f.calls, f.grad_calls) == (2, 1)           # fake-score update + no-grad target


def test_step_updates_student_and_fake_only(tiny_toy_dir):
    d, cond, uncond, st = _distiller(tiny_toy_dir, train={"ema_decay": 0.9})
    before = {n: [p.detach().clone() for p in getattr(d, n).parameters()] for n in ("teacher", "student", "fake")}
    m = d.step([(cond, uncond)], 4, torch.Generator().manual_seed(0))
    for key in ("loss_fake", "loss_student", "grad_norm_fake", "grad_norm_student", "importance_weight"):
        assert torch.isfinite(torch.tensor(m[key])), key
    changed = {n: any(not torch.equal(a, b) for a, b in zip(before[n], getattr(d, n).parameters())) for n in before}
    assert changed == {"teacher": False, "student": True, "fake": True}
    assert any(not torch.equal(e, p) for e, p in zip(st.ema.shadow, d.student.parameters()))


def test_unify_conditions_student_and_fake_on_k(tiny_toy_dir):
    d, cond, uncond, _ = _distiller(tiny_toy_dir, student={"num_steps": 4, "step_set": [1, 2, 4]})
    assert d.grids == {1: [999], 2: [999, 500], 4: [999, 749, 500, 250]}
    assert d.student.step_embedding is not None and d.fake.step_embedding is not None
    d.step([(cond, uncond)], 2, torch.Generator().manual_seed(0))
    grad_rows = d.student.step_embedding.embedding.weight.grad.abs().sum(1)
    assert grad_rows[1] > 0 and grad_rows[0] == 0 and grad_rows[2] == 0   # only K = 2's row learns
    ks = [d.sample_num_steps(torch.Generator().manual_seed(i)) for i in range(300)]
    assert set(ks) == {1, 2, 4}


def test_step_probabilities_follow_the_given_order(tiny_toy_dir):
    d, *_ = _distiller(tiny_toy_dir, student={"num_steps": 4, "step_set": [4, 1], "step_probs": [1.0, 0.0]})
    assert {d.sample_num_steps(torch.Generator().manual_seed(i)) for i in range(50)} == {4}


def test_unify_grids_explicit_per_step_count(tiny_toy_dir):
    """TDM-unify with a grid given for K=2 only: K=2 trains and samples on it, 1 and 4 stay uniform."""
    b = load_backbone(tiny_toy_dir)
    cfg = load_config({"student": {"step_set": [1, 2, 4], "timesteps": {"2": [999, 399]}}})
    assert student_grids(cfg.student, b.schedule) == {1: [999], 2: [999, 399], 4: [999, 749, 500, 250]}
    fixed = load_config({"student": {"num_steps": 3, "timesteps": [999, 600, 200]}})
    assert student_grids(fixed.student, b.schedule) == {3: [999, 600, 200]}


def test_grid_validation_names_the_problem(tiny_toy_dir):
    b = load_backbone(tiny_toy_dir)
    cfg = load_config({"student": {"num_steps": 2, "t_start": 1500}})
    with pytest.raises(ValueError, match="t_start"):
        student_grids(cfg.student, b.schedule)
    cfg = load_config({"student": {"step_set": [1, 2], "num_steps": 2, "timesteps": {2: [1500, 500]}}})
    with pytest.raises(ValueError, match="student.timesteps start at 1500 for K=2"):
        student_grids(cfg.student, b.schedule)
    cfg = load_config({"student": {"num_steps": 1000}})
    with pytest.raises(ValueError, match="larger than the schedule"):
        student_grids(cfg.student, b.schedule)
    with pytest.raises(ValueError, match="margin"):
        _distiller(tiny_toy_dir, student={"num_steps": 40})      # intervals of 25 < 20 + 10


def test_fake_score_fits_the_student_on_a_fixed_batch(tiny_toy_dir):
    """Repeated iterations on one batch and noise: the fake-score loss goes down."""
    d, cond, uncond, _ = _distiller(tiny_toy_dir, student={"num_steps": 1}, optim={"lr_student": 1e-5, "lr_fake": 1e-3})
    first = d.step([(cond, uncond)], 1, torch.Generator().manual_seed(0))["loss_fake"]
    last = [d.step([(cond, uncond)], 1, torch.Generator().manual_seed(0))["loss_fake"] for _ in range(15)][-1]
    assert last < first


def test_gradient_accumulation_steps_each_network_once(tiny_toy_dir):
    d, cond, uncond, st = _distiller(tiny_toy_dir)
    counters = {name: CallCounter(getattr(d, name)) for name in ("teacher", "student", "fake")}
    m = d.step([(cond, uncond), (cond, uncond)], 4, torch.Generator().manual_seed(0))
    assert st.sched_student.last_epoch == 1 and st.sched_fake.last_epoch == 1
    assert counters["student"].calls == 2 * (4 + 1) and counters["teacher"].calls == 2
    assert torch.isfinite(torch.tensor(m["loss_student"]))


def test_mixed_precision_requires_a_gpu():
    from tdm.errors import ConfigError

    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config({"train": {"mixed_precision": "bf16"}})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_code_path(tiny_toy_dir, precision):
    """The autocast / loss-scaling path (run on CPU here; the config only allows it with GPUs)."""
    cfg = load_config({})
    b = load_backbone(tiny_toy_dir)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema, precision, "cpu")
    assert (d.scaler_student is not None) == (precision == "fp16")
    cond, uncond = b.encode_prompts(["a handwritten digit 1"] * 2), b.encode_prompts([""] * 2)
    m = d.step([(cond, uncond)], 4, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss_fake", "loss_student"))
    assert all(p.dtype == torch.float32 for p in d.student.parameters())   # master weights stay fp32


def test_a_non_finite_update_is_skipped_counted_and_stops_the_run_after_n_in_a_row(tiny_toy_dir):
    from tdm.errors import NonFiniteTrainingError
    from tdm.train import NonFiniteGuard

    d, cond, uncond, st = _distiller(tiny_toy_dir)
    first = next(p for p in st.fake.trainable_parameters())
    with torch.no_grad():
        first.view(-1)[0] = float("inf")          # the fake score now produces non-finite losses
    before = {n: p.detach().clone() for n, p in st.fake.named_trainable_parameters()}
    m = d.step([(cond, uncond)], 4, torch.Generator().manual_seed(0))
    assert m["nonfinite_updates"] == 1.0 and not math.isfinite(m["grad_norm_fake"])
    after = dict(st.fake.named_trainable_parameters())
    assert all(torch.equal(torch.nan_to_num(before[n]), torch.nan_to_num(after[n].detach())) for n in before)
    assert not d.opt_fake.state                    # the optimizer never stepped

    guard = NonFiniteGuard(limit=3)
    bad, good = {"nonfinite_updates": 1.0}, {"nonfinite_updates": 0.0}
    assert [guard.observe(s, m) for s, m in enumerate([bad, bad, good, bad, bad], 1)] == [1, 2, 2, 3, 4]
    with pytest.raises(NonFiniteTrainingError, match="train.max_nonfinite_steps: 3 iterations in a row"):
        guard.observe(6, bad)


def test_last_step_weight_reaches_the_trajectory_draw(tiny_toy_dir):
    # loss.last_step_weight 3 with K = 4: half the samples train the last step (u = t_1, rollout index K - 1)
    d, *_ = _distiller(tiny_toy_dir, loss={"last_step_weight": 3.0})
    grid, B = d.grids[4], 3000
    zeros = torch.zeros(4, B, *d.latent_shape)
    traj = Trajectory(torch.tensor(grid), zeros, zeros, zeros)
    lv, i = d._draw_levels(traj, 4, torch.Generator().manual_seed(0))
    last = lv.u == grid[-1]
    assert abs(float(last.double().mean()) - 0.5) < 0.03
    assert set(i[last].tolist()) == {3} and set(i[~last].tolist()) == {0, 1, 2}
