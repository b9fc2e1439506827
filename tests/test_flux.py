"""FLUX.1 (tdm.backbones.flux) on tiny random-weight pipelines: the teacher against stock FluxPipeline in both
guidance modes, a student distilled with the guidance embedded (one teacher pass) or with CFG, exported and
reloaded in stock diffusers, and the refusals of an embedded mode on a teacher that embeds no guidance."""
import json

import pytest
import torch

from tdm.backbones import FluxBackbone, load_backbone
from tdm.config import load_config
from tdm.distiller import TDMDistiller
from tdm.errors import ConfigError
from tdm.export import LORA_DIR
from tdm.generation import TDMPipeline
from tdm.sampler import seeded_noise
from tdm.spec import TeacherRef, student_spec, teacher_spec
from tdm.train import build_roles, guided_conditioning

PROMPTS, SEEDS = ["a cat", "a red dog"], [3, 4]


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    from tdm.testing import build_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    return {"dev": build_tiny_flux(root / "dev"), "schnell": build_tiny_flux(root / "schnell", guidance_embeds=False)}


def _stock(path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(path)


def test_resolution_shift_and_layout(flux_dirs):
    b = load_backbone(flux_dirs["dev"])
    assert isinstance(b, FluxBackbone) and b.embeds_guidance
    assert b.latent_shape == (4, 8, 8) and b.image_size == (16, 16)      # tdm_image_size 16 / VAE x2
    # 16 image tokens (8x8 latents in 2x2 patches): mu = 0.5 + 0.65 * (16 - 256) / 3840, shift = e^mu
    assert b.schedule.shift == pytest.approx(1.5830842, rel=1e-6)
    x = torch.randn(2, *b.latent_shape)
    assert b.stock_latents(x).shape == (2, 16, 16)                        # FluxPipeline's packed layout
    assert not load_backbone(flux_dirs["schnell"]).embeds_guidance


@pytest.mark.parametrize("mode", ["embedded", "cfg"])
def test_teacher_samples_as_stock_flux(flux_dirs, mode):
    """Embedded: one pass with the scale fed to the network (stock guidance_scale). CFG: two branches on the
    velocity, the network fed 1 (stock true_cfg_scale with an empty negative prompt, guidance_scale 1)."""
    b = load_backbone(flux_dirs["dev"])
    ours = TDMPipeline(b, teacher_spec(b, 4, 3.5, guidance_mode=mode))
    ref = ours(PROMPTS, seeds=SEEDS)
    guidance = {"guidance_scale": 3.5} if mode == "embedded" else \
        {"guidance_scale": 1.0, "true_cfg_scale": 3.5, "negative_prompt": ["", ""]}
    out = _stock(flux_dirs["dev"])(PROMPTS, latents=b.stock_latents(seeded_noise(SEEDS, b.latent_shape)),
                                   num_inference_steps=4, output_type="pt", **b.stock_call_kwargs, **guidance).images
    assert (out - ref).abs().max().item() < 1e-4
    # the two modes are different samplers: the embedded scale reaches the network
    other = TDMPipeline(b, teacher_spec(b, 4, 3.5, guidance_mode="cfg" if mode == "embedded" else "embedded"))
    assert (other(PROMPTS, seeds=SEEDS) - ref).abs().max().item() > 1e-3


def _distil(path, mode: str, finetune: str, steps: int = 2, **student):
    cfg = load_config({"student": {"finetune": finetune, "lora_rank": 4, "lora_alpha": 8, **student},
                       "loss": {"guidance_scale": 3.5, "teacher_guidance": mode}})
    b = load_backbone(path)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    batches = []
    teacher_batches = []
    teacher.register_forward_hook(lambda _m, args, _out: teacher_batches.append(args[0].shape[0]))
    for _ in range(steps):
        cond, uncond = guided_conditioning(cfg, b, b.encode_prompts(["a cat"] * 2), b.encode_prompts([""] * 2))
        batches.append(cond)
        d.step([(cond, uncond)], max(cfg.student.steps), torch.Generator().manual_seed(0))
    return cfg, b, st, d, batches, teacher_batches


@pytest.mark.parametrize("mode,finetune", [("embedded", "lora"), ("embedded", "full"), ("cfg", "lora")])
def test_student_exports_and_reloads_in_stock_flux(flux_dirs, tmp_path, mode, finetune):
    cfg, b, st, d, batches, teacher_batches = _distil(flux_dirs["dev"], mode, finetune)
    # embedded: the teacher runs once per generator step on the batch alone, the scale in its conditioning
    assert teacher_batches == ([2, 2] if mode == "embedded" else [4, 4])
    assert torch.equal(batches[0]["guidance"], torch.full((2,), 3.5 if mode == "embedded" else 1.0))
    spec = student_spec(cfg, d.grids, b, TeacherRef(kind="local", uri=str(flux_dirs["dev"]),
                                                    location=str(flux_dirs["dev"]), revision=None))
    assert spec.guidance_mode == mode
    ours = TDMPipeline(b, spec, denoiser=st.student)
    ours.save_pretrained(tmp_path / "export")
    ref = ours(PROMPTS, seeds=SEEDS)
    usage = json.loads((tmp_path / "export" / "tdm_model.json").read_text())["diffusers"]
    # the student samples at its distilled scale: stock FLUX feeds guidance_scale to the network
    assert usage["call"]["guidance_scale"] == (3.5 if mode == "embedded" else 1.0)
    assert usage["call"]["height"] == usage["call"]["width"] == 16
    latents = b.stock_latents(seeded_noise(SEEDS, b.latent_shape))
    out = _stock(tmp_path / "export")(PROMPTS, latents=latents, output_type="pt", **usage["call"]).images
    assert (out - ref).abs().max().item() < 1e-4
    again = TDMPipeline.from_pretrained(tmp_path / "export")     # the export records its resolution
    assert again.backbone.latent_shape == b.latent_shape
    assert (again(PROMPTS, seeds=SEEDS) - ref).abs().max().item() < 1e-5
    assert ("lora" in usage) == (finetune == "lora")
    if finetune == "lora":   # the adapter alone on the teacher, in stock diffusers
        base = _stock(flux_dirs["dev"])
        base.scheduler = type(base.scheduler).from_pretrained(tmp_path / "export", subfolder="scheduler")
        base.load_lora_weights(tmp_path / "export" / LORA_DIR)
        out = base(PROMPTS, latents=latents, output_type="pt", **usage["call"]).images
        assert (out - ref).abs().max().item() < 1e-4


def test_unify_student_with_embedded_guidance(flux_dirs):
    *_, d, _, teacher_batches = _distil(flux_dirs["dev"], "embedded", "lora", steps=1, step_set=[1, 2, 4])
    assert teacher_batches == [2] and sorted(d.grids) == [1, 2, 4]


def test_embedded_guidance_needs_a_guidance_distilled_teacher(flux_dirs):
    from tdm.preflight import check_teacher_guidance

    cfg = load_config({"loss": {"teacher_guidance": "embedded"}})
    with pytest.raises(ConfigError, match=r"^loss.teacher_guidance: 'embedded' .* \(FluxPipeline\) takes none"):
        build_roles(cfg, load_backbone(flux_dirs["schnell"]))
    schnell = TeacherRef(kind="local", uri=str(flux_dirs["schnell"]), location=str(flux_dirs["schnell"]),
                         revision=None)
    with pytest.raises(ConfigError, match="loss.teacher_guidance"):   # before any work, from configs alone
        check_teacher_guidance(cfg, schnell, "FluxPipeline")
    dev = TeacherRef(kind="local", uri=str(flux_dirs["dev"]), location=str(flux_dirs["dev"]), revision=None)
    check_teacher_guidance(cfg, dev, "FluxPipeline")
    with pytest.raises(ConfigError, match="loss.teacher_guidance"):
        check_teacher_guidance(cfg, None, None)                       # the toys embed no guidance
    # schnell distils with CFG like any teacher
    *_, teacher_batches = _distil(flux_dirs["schnell"], "cfg", "lora", steps=1)
    assert teacher_batches == [4]
