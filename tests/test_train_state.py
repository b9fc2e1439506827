"""Training-state plumbing: LR schedules, per-step seeds, and a checkpoint round trip of every piece."""
import random

import numpy as np
import pytest
import torch

from tdm.backbones import load_backbone
from tdm.config import load_config
from tdm.distiller import TDMDistiller
from tdm.statefile import save_state
from tdm.train import build_roles, load_state_file, lr_factor, step_seed, student_from_state


def test_lr_factor_hand_values():
    assert lr_factor(0, 10, 100, "constant") == pytest.approx(0.1)
    assert lr_factor(50, 0, 100, "constant") == 1.0
    assert lr_factor(0, 0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 0, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 0, 100, "cosine") == pytest.approx(0.0)
    assert lr_factor(60, 20, 100, "cosine") == pytest.approx(0.5)   # half-way through the post-warm-up part


def test_step_seeds_are_distinct_streams():
    seeds = {step_seed(0, s, r) for s in range(50) for r in (-1, 0, 1)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1) != step_seed(1, 3, 1)


def _trained_state(tiny_toy_dir, steps=2):
    cfg = load_config({"train": {"ema_decay": 0.9}, "student": {"num_steps": 2, "step_set": [1, 2]}})
    b = load_backbone(tiny_toy_dir)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    cond, uncond = b.encode_prompts(["a handwritten digit 1"] * 2), b.encode_prompts([""] * 2)
    for i in range(steps):
        d.step([(cond, uncond)], 2, torch.Generator().manual_seed(i))
    return cfg, b, st


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


def test_checkpoint_round_trip_restores_every_piece(tiny_toy_dir, tmp_path):
    cfg, b, st = _trained_state(tiny_toy_dir)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    saved = st.state_dict(2, cfg, {"spec": {"kind": "student"}})
    save_state(tmp_path, saved)
    assert saved["opt_student"]["state"] and "exp_avg_sq" in saved["opt_student"]["state"][0]

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    _, fresh = build_roles(cfg, b)
    step = fresh.load_state_dict(load_state_file(tmp_path))
    assert step == 2
    again = fresh.state_dict(step, cfg, {"spec": {"kind": "student"}})
    for key in ("student", "fake", "opt_student", "opt_fake", "sched_student", "sched_fake", "ema", "rng", "config"):
        _assert_same(saved[key], again[key], key)   # networks incl. step embeddings, Adam moments, EMA, RNG
    after_resume = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    assert torch.equal(after_resume[0], torch.rand(3)) and np.array_equal(after_resume[1], np.random.rand(3))
    assert after_resume[2] == random.random()


def test_student_from_state_uses_the_ema(tiny_toy_dir):
    cfg, b, st = _trained_state(tiny_toy_dir)
    state = st.state_dict(2, cfg, {})
    student = student_from_state(cfg, b, state)
    trainable = [p for p in student.parameters()]
    assert all(torch.equal(p, s) for p, s in zip(trainable, st.ema.shadow))
    assert not any(p.requires_grad for p in trainable)


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_toy_dir, tmp_path):
    """Deterministic mode on CPU: 6 steps straight vs 3 steps, checkpoint, fresh process state, 3 steps.
    Per-step generators come from (seed, step, rank), so only the saved state carries over."""
    cfg = load_config({"student": {"num_steps": 2}})
    b = load_backbone(tiny_toy_dir)
    cond, uncond = b.encode_prompts(["a handwritten digit 1"] * 2), b.encode_prompts([""] * 2)

    def make():
        torch.manual_seed(0)
        teacher, st = build_roles(cfg, b)
        d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student,
                         st.fake, st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
        return d, st

    def run(d, steps):
        return [d.step([(cond, uncond)], 2, torch.Generator().manual_seed(step_seed(0, s, 0)))
                for s in steps]

    d, _ = make()
    straight = run(d, range(6))
    d, st = make()
    first = run(d, range(3))
    save_state(tmp_path, st.state_dict(3, cfg, {}))
    d, st = make()
    assert st.load_state_dict(load_state_file(tmp_path)) == 3
    resumed = first + run(d, range(3, 6))
    for key in ("loss_fake", "loss_student", "grad_norm_student"):
        assert [m[key] for m in resumed] == [m[key] for m in straight], key   # bit-identical


def test_fp16_loss_scaler_state_round_trips_through_a_checkpoint(tmp_path, tiny_toy_dir):
    """No GPU here: the scalers of an fp16 distiller (CPU GradScaler), moved off their initial scale, are
    saved in the pickle-free checkpoint and restored into a fresh distiller."""
    from tdm.statefile import load_state, save_state

    cfg = load_config({})
    b = load_backbone(tiny_toy_dir)

    def fp16_distiller():
        teacher, st = build_roles(cfg, b)
        return TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student,
                            st.fake, st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema,
                            "fp16", "cpu")

    d = fp16_distiller()
    for scaler, scale in ((d.scaler_student, 1024.0), (d.scaler_fake, 8.0)):
        scaler.scale(torch.ones(()))          # a first scaled loss creates the scale
        scaler.update(new_scale=scale)        # as after overflows
        scaler._growth_tracker.fill_(7)       # noqa: SLF001 - steps since the last overflow
    save_state(tmp_path, {"scalers": d.scaler_state()})
    fresh = fp16_distiller()
    assert fresh.scaler_student.get_scale() == 65536.0           # what a resume without it would use
    fresh.load_scaler_state(load_state(tmp_path)["scalers"])
    assert fresh.scaler_student.get_scale() == 1024.0 and fresh.scaler_fake.get_scale() == 8.0
    assert fresh.scaler_state() == d.scaler_state()
    _, bf = build_roles(cfg, b)
    fp32 = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, None, bf.student, bf.fake,
                        bf.opt_student, bf.opt_fake, bf.sched_student, bf.sched_fake, bf.ema)
    assert fp32.scaler_state() is None       # nothing to keep without fp16


def test_raising_max_steps_on_resume_says_what_it_does_to_the_lr():
    from tdm.job import max_steps_change

    # cosine, no warm-up: step 599 of 600 -> 0.5 (1 + cos(pi 599/600)) = 6.85e-6; of 900 -> 0.5 (1 + cos(pi 599/900))
    # = 0.5 (1 - 0.49697) = 0.25151
    msg = max_steps_change(600, 900, "cosine", 0)
    assert msg == ("train.max_steps 600 -> 900: the cosine LR schedule now decays to 0 at step 900; at step 600 the "
                   "LR factor is 0.2515 on the new curve (it was 0.0000 on the old one)")
    assert max_steps_change(8, 12, "constant", 0) == ("train.max_steps 8 -> 12: the constant LR schedule is "
                                                       "unchanged; training continues to 12")
