"""LoRA roles on one shared base, and exports that stock diffusers loads and samples identically."""
import json

import pytest
import torch

from tdm.backbones import load_backbone
from tdm.config import load_config
from tdm.distiller import TDMDistiller
from tdm.export import LORA_DIR
from tdm.generation import TDMPipeline
from tdm.spec import TeacherRef, student_spec
from tdm.train import TrainState, build_roles

LORA = {"student": {"finetune": "lora", "lora_rank": 4, "lora_alpha": 8}}


def _teacher(path) -> TeacherRef:
    return TeacherRef(kind="local", uri=str(path), location=str(path), revision=None)


def _roles(tiny_dir, **overrides):
    cfg = load_config({**LORA, **overrides})
    b = load_backbone(tiny_dir)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    return cfg, b, teacher, st, d


def _out(role, b, x, t, cond):
    with torch.no_grad():
        return role(x, t, cond)


def test_lora_roles_share_one_base(tiny_sd_dir):
    cfg, b, teacher, st, _ = _roles(tiny_sd_dir)
    assert st.student.net is st.fake.net is teacher.net is b.network          # one copy of the weights
    base = [p for n, p in b.network.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    names_s = [n for n, _ in st.student.named_trainable_parameters()]
    names_f = [n for n, _ in st.fake.named_trainable_parameters()]
    assert names_s and all(".student." in n for n in names_s) and all(".fake." in n for n in names_f)
    n_lora = sum(p.numel() for p in st.student.trainable_parameters())
    assert n_lora < 0.5 * sum(p.numel() for p in base)
    # the optimizers hold exactly the role's adapter
    assert {id(p) for g in st.opt_student.param_groups for p in g["params"]} == {id(p) for p in
                                                                                  st.student.trainable_parameters()}


def test_lora_roles_start_at_the_teacher_and_train_only_their_adapter(tiny_sd_dir):
    cfg, b, teacher, st, d = _roles(tiny_sd_dir, train={"ema_decay": 0.9})
    x = torch.randn(2, *b.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500])
    cond = b.encode_prompts(["a cat", "a dog"])
    ref = _out(teacher, b, x, t, cond)
    assert torch.equal(_out(st.student, b, x, t, cond), ref)   # LoRA B = 0: exactly the teacher
    base_before = {n: p.clone() for n, p in b.network.named_parameters() if "lora_" not in n}
    lora_before = {n: p.clone() for n, p in b.network.named_parameters() if "lora_" in n}
    d.step([(b.encode_prompts(["a cat"] * 4), b.encode_prompts([""] * 4))], 4, torch.Generator().manual_seed(0))
    after = dict(b.network.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())      # the base never moves
    moved = {n for n, p in lora_before.items() if not torch.equal(after[n], p)}
    assert any(".student." in n for n in moved) and any(".fake." in n for n in moved)
    assert torch.equal(_out(teacher, b, x, t, cond), ref)      # adapters off = the unchanged teacher
    assert not torch.equal(_out(st.student, b, x, t, cond), ref)
    assert all(p.requires_grad for p in st.student.trainable_parameters() + st.fake.trainable_parameters())


def test_lora_checkpoint_holds_adapters_only_and_round_trips(tiny_sd_dir):
    cfg, b, teacher, st, d = _roles(tiny_sd_dir, train={"ema_decay": 0.9})
    d.step([(b.encode_prompts(["a cat"] * 2), b.encode_prompts([""] * 2))], 4, torch.Generator().manual_seed(0))
    state = st.state_dict(1, cfg, {})
    assert all(".student." in k or k.startswith("step_embedding") for k in state["student"])
    cfg2, b2, _, st2, _ = _roles(tiny_sd_dir, train={"ema_decay": 0.9})
    assert TrainState.load_state_dict(st2, state) == 1
    for (n, p), (_, q) in zip(st.student.named_trainable_parameters(), st2.student.named_trainable_parameters()):
        assert torch.equal(p, q), n
    for a, c in zip(st.opt_fake.state_dict()["state"].values(), st2.opt_fake.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], c["exp_avg_sq"])
    full = load_config({})
    with pytest.raises(ValueError, match="adapter"):
        st2.student.load_role_state_dict({"bogus": torch.zeros(1)})
    assert full.student.finetune == "full"


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_export_loads_in_stock_diffusers_and_matches_our_sampler(tiny_sd_dir, tmp_path, finetune):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    cfg, b, teacher, st, d = _roles(tiny_sd_dir, student={"finetune": finetune, "lora_rank": 4, "lora_alpha": 8})
    for _ in range(2):  # move the student away from the teacher
        d.step([(b.encode_prompts(["a cat"] * 2), b.encode_prompts([""] * 2))], 4, torch.Generator().manual_seed(0))
    spec = student_spec(cfg, d.grids, b, _teacher(tiny_sd_dir))
    ours = TDMPipeline(b, spec, denoiser=st.student)
    ours.save_pretrained(tmp_path / "export")
    prompts, seeds = ["a cat", "a red dog"], [3, 4]
    ref = ours(prompts, seeds=seeds)

    saved = json.loads((tmp_path / "export" / "tdm_model.json").read_text())
    usage = saved["diffusers"]
    assert usage["call"] == {"num_inference_steps": 4, "guidance_scale": 1.0, "timesteps": [999, 749, 500, 250]}
    from tdm.sampler import seeded_noise
    latents = seeded_noise(seeds, b.latent_shape)

    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(stock.scheduler, DPMSolverMultistepScheduler)
    out = stock(prompts, latents=latents, output_type="pt", **usage["call"]).images
    assert (out - ref).abs().max().item() < 1e-4

    # reloading through tdm gives the same sampler, too
    again = TDMPipeline.from_pretrained(tmp_path / "export")
    assert (again(prompts, seeds=seeds) - ref).abs().max().item() < 1e-5

    if finetune == "lora":  # the adapter alone, on the teacher, in stock diffusers
        assert usage["lora"] == f"{LORA_DIR}/pytorch_lora_weights.safetensors"
        base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        base.scheduler = DPMSolverMultistepScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
        base.load_lora_weights(tmp_path / "export" / LORA_DIR)
        out = base(prompts, latents=latents, output_type="pt", **usage["call"]).images
        assert (out - ref).abs().max().item() < 1e-4
    else:
        assert not (tmp_path / "export" / LORA_DIR).exists()


@pytest.fixture(scope="module")
def tiny_family_dirs(tmp_path_factory):
    from tdm.testing import TINY_BUILDERS

    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in TINY_BUILDERS.items() if name != "sd15"}


@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3"])
def test_family_export_matches_stock_diffusers(tiny_family_dirs, tmp_path, family):
    import diffusers

    from tdm.sampler import seeded_noise

    cfg, b, teacher, st, d = _roles(tiny_family_dirs[family])
    for _ in range(2):
        d.step([(b.encode_prompts(["a cat"] * 2), b.encode_prompts([""] * 2))], 4, torch.Generator().manual_seed(0))
    spec = student_spec(cfg, d.grids, b, _teacher(tiny_family_dirs[family]))
    ours = TDMPipeline(b, spec, denoiser=st.student)
    ours.save_pretrained(tmp_path / "export")
    prompts, seeds = ["a cat", "a red dog"], [3, 4]
    ref = ours(prompts, seeds=seeds)
    usage = json.loads((tmp_path / "export" / "tdm_model.json").read_text())["diffusers"]
    stock = getattr(diffusers, usage["pipeline"]).from_pretrained(tmp_path / "export")
    assert type(stock.scheduler).__name__ == usage["scheduler"]
    out = stock(prompts, latents=seeded_noise(seeds, b.latent_shape), output_type="pt", **usage["call"]).images
    assert (out - ref).abs().max().item() < 1e-4
    assert ("lora" in usage) == (family != "pixart")   # PixArt's stock pipeline has no LoRA loader
    if family == "sd3":
        assert usage["call"]["sigmas"] == [1.0, 0.75, 0.5, 0.25]
