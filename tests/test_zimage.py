"""Z-Image (ZImagePipeline): tdm's teacher and exported students sample as stock diffusers does."""
import json

import pytest
import torch

from tdm.backbones import cond_cat, cond_index, load_backbone
from tdm.backbones.zimage import ZImageBackbone
from tdm.config import load_config
from tdm.distiller import TDMDistiller
from tdm.export import LORA_DIR
from tdm.generation import TDMPipeline
from tdm.sampler import seeded_noise
from tdm.spec import TeacherRef, student_spec, teacher_spec
from tdm.testing import build_tiny_zimage
from tdm.train import build_roles

#: ZImagePipeline rewrites the prompt list it is given in place (chat template applied): pass it a copy
PROMPTS, SEEDS = ["a cat", "a red dog on a hill"], [3, 4]


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage"))


def _roles(path, **overrides):
    cfg = load_config({"student": {"lora_rank": 4, "lora_alpha": 8}, **overrides})
    b = load_backbone(path)
    teacher, st = build_roles(cfg, b)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    return cfg, b, st, d


def test_backbone_shapes_and_conditioning(zimage_dir):
    from diffusers import ZImagePipeline

    b = load_backbone(zimage_dir)
    assert isinstance(b, ZImageBackbone) and b.family == "zimage"
    assert b.latent_shape == (4, 16, 16) and b.image_size == (32, 32)
    assert b.schedule.kind == "flow" and b.schedule.shift == 3.0
    assert b.time_embed_dim == 32 and b.network.get_submodule(b.time_embedding_name) is b.network.t_embedder
    # the conditioning is stock encode_prompt's, padded to one length; concatenation and indexing keep it
    cond = cond_cat(b.encode_prompts(PROMPTS), b.encode_prompts([""]))
    assert PROMPTS == ["a cat", "a red dog on a hill"]   # unlike the stock pipeline, no rewrite in place
    assert cond["cap_feats"].shape == (3, b.max_sequence_length, 32)
    stock = ZImagePipeline.from_pretrained(zimage_dir)
    prompts = PROMPTS + [""]
    embeds, _ = stock.encode_prompt(list(prompts), do_classifier_free_guidance=False)
    assert cond["cap_lens"].tolist() == [len(e) for e in embeds] and len(set(cond["cap_lens"].tolist())) == 3
    for i, e in enumerate(embeds):
        assert torch.equal(cond["cap_feats"][i, :len(e)], e)
        assert not cond["cap_feats"][i, len(e):].any()
    assert torch.equal(cond_index(cond, [2])["cap_lens"], cond["cap_lens"][2:])
    tok, limit = b.prompt_tokenizer()
    assert 0 < limit < b.max_sequence_length
    # the network reads 1 - sigma (shift 3: t = 500 is sigma 0.75) and predicts minus tdm's velocity
    x = torch.randn(3, *b.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0, 500.0, 0.0])
    raw = b.network(list(x.unsqueeze(2).unbind(0)), torch.tensor([0.0, 0.25, 1.0]),
                    list(embeds), return_dict=False)[0]
    assert torch.allclose(b.call_network(b.network, x, t, cond), -torch.stack(raw).squeeze(2), atol=1e-5)


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_teacher_cfg_sampling_matches_stock(zimage_dir, tmp_path, dynamic_shift):
    """tdm's guidance 3.0 (uncond + 3 (cond - uncond)) is ZImagePipeline's guidance_scale 2.0 (pos + 2 (pos -
    neg)); the stock defaults (its sigmas linspace(1, 1/K, K), cfg_truncation 1.0, no cfg_normalization) are
    tdm's uniform grid and plain CFG."""
    from diffusers import ZImagePipeline

    path = build_tiny_zimage(tmp_path, dynamic_shift=True) if dynamic_shift else zimage_dir
    b = load_backbone(path)
    if dynamic_shift:  # 64 image tokens: mu = 0.5 + 0.65 * (64 - 256) / 3840, the shift e^mu
        assert abs(b.schedule.shift - 2.718281828 ** (0.5 - 0.65 * 192 / 3840)) < 1e-6
    ours = TDMPipeline(b, teacher_spec(b, 4, 3.0))(PROMPTS, seeds=SEEDS)
    stock = ZImagePipeline.from_pretrained(path)
    out = stock(list(PROMPTS), latents=b.stock_latents(seeded_noise(SEEDS, b.latent_shape)), num_inference_steps=4,
                guidance_scale=2.0, height=32, width=32, output_type="pt").images
    assert out.shape == ours.shape == (2, 3, 32, 32)
    assert (out - ours).abs().max().item() < 1e-4
    # and without guidance: tdm's 1.0 is stock's 0.0
    plain = TDMPipeline(b, teacher_spec(b, 4, 1.0))(PROMPTS, seeds=SEEDS)
    out = stock(list(PROMPTS), latents=seeded_noise(SEEDS, b.latent_shape), num_inference_steps=4, guidance_scale=0.0,
                height=32, width=32, output_type="pt").images
    assert (out - plain).abs().max().item() < 1e-4 and (plain - ours).abs().max().item() > 1e-3


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_export_matches_stock_diffusers(zimage_dir, tmp_path, finetune):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    cfg, b, st, d = _roles(zimage_dir, student={"finetune": finetune, "lora_rank": 4, "lora_alpha": 8})
    before = TDMPipeline(b, teacher_spec(b, 4, 1.0), denoiser=st.student)(PROMPTS, seeds=SEEDS)
    for _ in range(2):  # move the student away from the teacher
        d.step([(b.encode_prompts(["a cat"] * 2), b.encode_prompts([""] * 2))], 4, torch.Generator().manual_seed(0))
    teacher = TeacherRef(kind="local", uri=str(zimage_dir), location=str(zimage_dir), revision=None)
    ours = TDMPipeline(b, student_spec(cfg, d.grids, b, teacher), denoiser=st.student)
    ours.save_pretrained(tmp_path / "export")
    ref = ours(PROMPTS, seeds=SEEDS)
    assert (ref - before).abs().max().item() > 1e-4     # the student moved

    usage = json.loads((tmp_path / "export" / "tdm_model.json").read_text())["diffusers"]
    assert usage["pipeline"] == "ZImagePipeline" and usage["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert usage["call"] == {"num_inference_steps": 4, "guidance_scale": 0.0, "height": 32, "width": 32,
                             "max_sequence_length": 512, "sigmas": [1.0, 0.75, 0.5, 0.25]}
    latents = b.stock_latents(seeded_noise(SEEDS, b.latent_shape))
    stock = ZImagePipeline.from_pretrained(tmp_path / "export")
    out = stock(list(PROMPTS), latents=latents, output_type="pt", **usage["call"]).images
    assert (out - ref).abs().max().item() < 1e-4
    again = TDMPipeline.from_pretrained(tmp_path / "export")     # tdm reloads the export at its size
    assert (again(PROMPTS, seeds=SEEDS) - ref).abs().max().item() < 1e-5

    if finetune == "lora":  # the adapter alone, on the teacher, in stock diffusers
        assert usage["lora"] == f"{LORA_DIR}/pytorch_lora_weights.safetensors"
        base = ZImagePipeline.from_pretrained(zimage_dir)
        base.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
        base.load_lora_weights(tmp_path / "export" / LORA_DIR)
        out = base(list(PROMPTS), latents=latents, output_type="pt", **usage["call"]).images
        assert (out - ref).abs().max().item() < 1e-4
    else:
        assert "lora" not in usage and not (tmp_path / "export" / LORA_DIR).exists()


def test_unify_student_is_step_conditioned(zimage_dir):
    cfg, b, st, d = _roles(zimage_dir, student={"num_steps": 4, "step_set": [1, 2, 4]})
    assert d.grids == {1: [1000], 2: [1000, 500], 4: [1000, 750, 500, 250]}
    emb = d.student.step_embedding
    assert emb is not None and emb.embedding.weight.shape == (3, b.time_embed_dim)
    m = d.step([(b.encode_prompts(["a cat"] * 2), b.encode_prompts([""] * 2))], 2, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss_student", "loss_fake"))
    assert emb.embedding.weight.grad is not None
    grad_rows = emb.embedding.weight.grad.abs().sum(1)
    assert grad_rows[1] > 0 and grad_rows[0] == 0 and grad_rows[2] == 0     # only K = 2's row learns
    # the hook reaches the network: K = 2's moved row changes the output, K = 1's zero row does not
    x = torch.randn(2, *b.latent_shape, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([1000.0, 500.0]), b.encode_prompts(["a cat"] * 2)
    with torch.no_grad():
        out1, out2 = (d.student(x, t, cond, torch.tensor([k])) for k in (1, 2))
        emb._current = None
        bare = b.call_network(d.student.net, x, t, cond)
    assert torch.equal(out1, bare) and not torch.allclose(out2, bare)
