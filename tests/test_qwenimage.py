"""Qwen-Image (QwenImagePipeline) through tdm: the teacher, distillation and exports that stock diffusers
samples identically."""
import json

import pytest
import torch

from tdm.backbones import load_backbone
from tdm.backbones.stock import patch_pack, patch_unpack
from tdm.config import load_config
from tdm.distiller import TDMDistiller
from tdm.export import LORA_DIR
from tdm.generation import TDMPipeline
from tdm.grids import uniform_grid
from tdm.sampler import sample, seeded_noise
from tdm.schedules import dynamic_flow_shift, flow_sigma, to_x0_eps
from tdm.spec import TeacherRef, student_spec, teacher_spec
from tdm.testing import build_tiny_qwenimage
from tdm.train import build_roles

# ---------------------------------------------------------------- tests

PROMPTS, SEEDS = ["a cat", "a red dog"], [3, 4]    # prompts of different token lengths: a padded text mask


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage"))


def _stock(path, **kw):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _roles(path, **overrides):
    cfg = load_config(overrides)
    b = load_backbone(path)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema, guide=b.guide)
    return cfg, b, st, d


def _batch(b, n=2):
    return [(b.encode_prompts(PROMPTS[:n]), b.encode_prompts([""] * n))]


def test_backbone_geometry_schedule_and_text(tiny_qwen_dir):
    b = load_backbone(tiny_qwen_dir)
    assert type(b).__name__ == "QwenImageBackbone" and b.family == "qwenimage"
    assert b.latent_shape == (4, 8, 12) and b.image_size == (32, 48) and b.image_tokens == 24
    noise = seeded_noise(SEEDS, b.latent_shape)
    assert b.stock_latents(noise).shape == (2, 24, 16)      # the stock pipeline's packed latents
    assert torch.equal(patch_unpack(b.stock_latents(noise), 8, 12), noise)
    assert "shift_terminal" not in b.scheduler_config and b.pipe.scheduler.config.shift_terminal == 0.02
    tok = b.pipe.tokenizer   # the tiny tokenizer splits the template's prefix as Qwen's: 34 tokens, then the prompt
    ids = tok(b.pipe.prompt_template_encode.format("a cat"))["input_ids"]
    assert tok.decode(ids[b.pipe.prompt_template_encode_start_idx:][:2]) == "a cat"
    cond = b.encode_prompts(PROMPTS)
    mask = cond["encoder_hidden_states_mask"]
    assert cond["encoder_hidden_states"].shape == (2, b.max_sequence_length, 16) and mask.shape == (2, 512)
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1] and not cond["encoder_hidden_states"][0, lengths[0]:].any()
    # equal to stock encode_prompt of the same batch, up to the padding
    embeds, stock_mask = b.pipe.encode_prompt(PROMPTS)
    assert torch.equal(cond["encoder_hidden_states"][:, :embeds.shape[1]], embeds)
    assert torch.equal(mask[:, :embeds.shape[1]], stock_mask)
    # the time embedding StepEmbedding hooks: (B, inner_dim)
    emb = b.network.get_submodule(b.time_embedding_name)
    assert emb(torch.tensor([0.5, 0.25]), torch.zeros(2, 1, 1)).shape == (2, b.time_embed_dim)
    assert not b.embeds_guidance
    with pytest.raises(Exception, match="AutoencoderKLQwenImage"):
        b.set_decoder(b.vae)


def test_dynamic_shift_matches_the_stock_scheduler(tiny_qwen_dir):
    """tdm resolves the shift once from the image token count; the stock pipeline computes mu from the same
    count at every call (calculate_shift) and its scheduler shifts the given sigmas with it."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    b = load_backbone(tiny_qwen_dir)
    c = b.pipe.scheduler.config
    for tokens in (24, 4096, 8192):   # this pipeline's, and Qwen-Image at 1024x1024 and at ~1328x1328
        mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        assert dynamic_flow_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift) \
            == pytest.approx(np.exp(mu), rel=1e-12)
    mu = calculate_shift(b.image_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert b.schedule.shift == pytest.approx(np.exp(mu), rel=1e-12)
    grid = uniform_grid(4, 1000)
    ours = flow_sigma(torch.tensor(grid, dtype=torch.float64), 1000, b.schedule.shift).double()
    sched = FlowMatchEulerDiscreteScheduler.from_config(b.scheduler_config)   # as an export writes it
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    assert torch.allclose(sched.sigmas[:-1].double(), ours, atol=1e-6) and sched.sigmas[-1] == 0
    hub = FlowMatchEulerDiscreteScheduler.from_config(c)                       # shift_terminal 0.02: stretched
    hub.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    assert hub.sigmas[-2].item() == pytest.approx(0.02, abs=1e-6) and not torch.allclose(hub.sigmas[:-1].double(), ours)


def test_teacher_matches_stock_diffusers(tiny_qwen_dir, monkeypatch):
    """The teacher's CFG sampling through tdm against stock QwenImagePipeline (true CFG, negative prompt "",
    tdm's default negative prompt: encoded by the same encode_prompt).

    True CFG rescales the guided velocity to the conditional velocity's norm per packed token
    (`comb_pred * |cond| / |comb|`): QwenImageBackbone.guide does it too, for the teacher's samples and its
    target in distillation. One difference is by design: the hub scheduler's shift_terminal (0.02) stretches
    stock's K levels so that the last is 0.02, while tdm's teacher walks the uniform grid.
    So: (a) the adapter's pieces on stock's own levels reproduce the unmodified stock call; (b) TDMPipeline's
    teacher reproduces stock without shift_terminal; (c) the linear CFG would not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    b = load_backbone(tiny_qwen_dir)
    g, noise = 3.0, seeded_noise(SEEDS, b.latent_shape)
    stock = _stock(tiny_qwen_dir)
    cfg_call = dict(negative_prompt=[""] * 2, true_cfg_scale=g, height=32, width=48, num_inference_steps=4,
                    output_type="pt")
    ref = stock(PROMPTS, latents=b.stock_latents(noise), **cfg_call).images

    # (a) stock's own levels (shift_terminal-stretched) and rescale, on tdm's pieces
    s = b.schedule.shift
    sig = stock.scheduler.sigmas[:-1].double()
    grid = (1000 * sig / (s - (s - 1) * sig)).tolist()               # sigma -> tdm's unshifted t
    teacher = b.denoiser()
    both = {k: torch.cat([v, w]) for (k, v), w in zip(b.encode_prompts(PROMPTS).items(),
                                                       b.encode_prompts([""] * 2).values())}

    def predict(x, t, guide=b.guide):
        vc, vu = teacher(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
        pc, pg = patch_pack(vc), patch_pack(vu + g * (vc - vu))
        v = patch_unpack(pg * (pc.norm(dim=-1, keepdim=True) / pg.norm(dim=-1, keepdim=True)), 8, 12)
        assert torch.allclose(guide(vc, vu, g), v, atol=1e-6)       # Backbone.guide is stock's true CFG
        a, sd = b.schedule.alpha_sigma(t)
        return to_x0_eps(v, x, a, sd, "flow")

    with torch.no_grad():
        ours = b.decode(sample(predict, noise, grid, b.schedule))
    assert ours.shape == ref.shape == (2, 3, 32, 48)
    assert (ours - ref).abs().max().item() < 1e-4

    # (b) TDMPipeline's teacher = stock without shift_terminal
    tdm_teacher = TDMPipeline(b, teacher_spec(b, 4, g))(PROMPTS, seeds=SEEDS)
    assert (tdm_teacher - ref).abs().max().item() > 1e-3            # shift_terminal's stretch is real
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(b.scheduler_config)
    same_levels = stock(PROMPTS, latents=b.stock_latents(noise), **cfg_call).images
    assert (tdm_teacher - same_levels).abs().max().item() < 1e-4
    # (c) the linear CFG is a different teacher (the rescale matters)
    monkeypatch.setattr(type(b), "guide", lambda _self, c, u, s: u + s * (c - u))
    linear = TDMPipeline(b, teacher_spec(b, 4, g))(PROMPTS, seeds=SEEDS)
    assert (linear - same_levels).abs().max().item() > 1e-3
    # without CFG the teacher is stock's plain call
    plain = stock(PROMPTS, latents=b.stock_latents(noise), height=32, width=48, num_inference_steps=4,
                  output_type="pt").images
    assert (TDMPipeline(b, teacher_spec(b, 4, 1.0))(PROMPTS, seeds=SEEDS) - plain).abs().max().item() < 1e-4


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_export_loads_in_stock_diffusers_and_matches_our_sampler(tiny_qwen_dir, tmp_path, finetune):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg, b, st, d = _roles(tiny_qwen_dir, student={"finetune": finetune, "lora_rank": 4, "lora_alpha": 8},
                           optim={"lr_student": 1e-2, "lr_fake": 1e-2})   # large steps: a visibly moved student
    guided = []
    d.guide = lambda c, u, s: guided.append(s) or b.guide(c, u, s)   # as tdm.train passes it
    for _ in range(2):  # move the student away from the teacher
        d.step(_batch(b), 4, torch.Generator().manual_seed(0))
    assert guided == [cfg.loss.guidance_scale] * 2      # the teacher's target: Qwen's true CFG, once per step
    teacher_ref = TeacherRef(kind="local", uri=str(tiny_qwen_dir), location=str(tiny_qwen_dir), revision=None)
    ours = TDMPipeline(b, student_spec(cfg, d.grids, b, teacher_ref), denoiser=st.student)
    ours.save_pretrained(tmp_path / "export")
    ref = ours(PROMPTS, seeds=SEEDS)
    teacher = TDMPipeline(b, teacher_spec(b, 4, 1.0))(PROMPTS, seeds=SEEDS)
    assert (ref - teacher).abs().max().item() > 1e-2          # the student moved

    usage = json.loads((tmp_path / "export" / "tdm_model.json").read_text())["diffusers"]
    assert usage["pipeline"] == "QwenImagePipeline" and usage["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert usage["call"] == {"num_inference_steps": 4, "guidance_scale": 1.0, "height": 32, "width": 48,
                             "true_cfg_scale": 1.0, "max_sequence_length": 512, "sigmas": [1.0, 0.75, 0.5, 0.25]}
    latents = b.stock_latents(seeded_noise(SEEDS, b.latent_shape))
    stock = _stock(tmp_path / "export")
    assert stock.scheduler.config.shift_terminal is None
    out = stock(PROMPTS, latents=latents, output_type="pt", **usage["call"]).images
    assert (out - ref).abs().max().item() < 1e-4

    again = TDMPipeline.from_pretrained(tmp_path / "export")   # the image size comes from tdm_model.json
    assert again.backbone.image_size == (32, 48)
    assert (again(PROMPTS, seeds=SEEDS) - ref).abs().max().item() < 1e-5

    if finetune == "lora":  # the adapter alone, on the teacher, in stock diffusers
        assert usage["lora"] == f"{LORA_DIR}/pytorch_lora_weights.safetensors"
        base = _stock(tiny_qwen_dir)
        base.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
        base.load_lora_weights(tmp_path / "export" / LORA_DIR)
        out = base(PROMPTS, latents=latents, output_type="pt", **usage["call"]).images
        assert (out - ref).abs().max().item() < 1e-4
    else:
        assert "lora" not in usage and not (tmp_path / "export" / LORA_DIR).exists()


def test_unify_student_conditions_on_the_step_count(tiny_qwen_dir):
    cfg, b, st, d = _roles(tiny_qwen_dir, student={"num_steps": 4, "step_set": [1, 2, 4]})
    assert d.grids == {1: [1000], 2: [1000, 500], 4: [1000, 750, 500, 250]}
    metrics = d.step(_batch(b), 2, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    rows = st.student.step_embedding.embedding.weight.grad.abs().sum(1)
    assert rows[1] > 0 and rows[0] == 0 and rows[2] == 0       # only K = 2's row learns, through the hook
    x = seeded_noise([0, 1], b.latent_shape)
    t, cond = torch.tensor([500.0, 500.0]), b.encode_prompts(PROMPTS)
    with torch.no_grad():
        k1, k2 = (st.student(x, t, cond, torch.tensor([k, k])) for k in (1, 2))
        base = b.call_network(st.student.net, x, t, cond)
    assert torch.equal(k1, base) and not torch.allclose(k2, base)   # K = 1's row is still zero
