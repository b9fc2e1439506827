"""Video families on CPU with tiny random-weight pipelines built from configs: the schedules they bring
(CogVideoX's SNR shift and zero terminal SNR, Wan's flow-sigma UniPC), the adapters' layouts, geometry
and refusals, the toy video data and its metrics, and the MP4/GIF encodings."""
import json

import pytest
import torch

from tdm.errors import InputError


@pytest.fixture(scope="module")
def tiny_video_dirs(tmp_path_factory):
    from tdm.testing import TINY_VIDEO_BUILDERS

    root = tmp_path_factory.mktemp("video")
    return {name: build(root / name) for name, build in TINY_VIDEO_BUILDERS.items()}


WAN_SHAPE = {"frames": 5, "height": 32, "width": 32, "fps": 8.0}


# ---------------------------------------------------------------- schedules

def test_snr_shift_and_zero_terminal_snr_by_hand():
    from tdm.schedules import snr_shifted, zero_terminal_snr

    abar = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    # SNR 9, 1, 1/9 divided by 3 -> abar = snr / (1 + snr): 0.75, 0.25, 1/28
    assert torch.allclose(snr_shifted(abar, 3.0), torch.tensor([0.75, 0.25, 1 / 28], dtype=torch.float64))
    # sqrt(abar) = .9487, .7071, .3162 -> shifted by .3162 and scaled back to .9487 at the start
    r = abar.sqrt()
    expected = ((r - r[-1]) * r[0] / (r[0] - r[-1])).square()
    out = zero_terminal_snr(abar)
    assert torch.allclose(out, expected) and out[0] == pytest.approx(0.9) and out[-1] == 0


def test_video_scheduler_configs_read_as_their_schedules():
    from diffusers import CogVideoXDDIMScheduler, UniPCMultistepScheduler

    from tdm.schedules import NoiseSchedule

    cog = CogVideoXDDIMScheduler(snr_shift_scale=3.0, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                 beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = NoiseSchedule.from_scheduler_config(dict(cog.config))
    assert ours.kind == "vp" and ours.prediction_type == "v_prediction"
    assert torch.allclose(ours.alphas_cumprod.double(), cog.alphas_cumprod.double(), atol=1e-6)
    # the last timestep is pure noise, floored at diffusers' 2^-24 (finite log-SNR): x0 = alpha x - sigma v ~ -v
    assert cog.alphas_cumprod[-1] == 0 and ours.alphas_cumprod[-1].item() == 2.0 ** -24
    a, s = ours.alpha_sigma(torch.tensor([999]))
    assert a.item() == pytest.approx(2.0 ** -12) and s.item() == pytest.approx(1.0)

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    flow = NoiseSchedule.from_scheduler_config(dict(unipc.config))
    assert (flow.kind, flow.prediction_type, flow.shift) == ("flow", "flow", 3.0)

    with pytest.raises(ValueError, match="epsilon-prediction model cannot have zero terminal SNR"):
        NoiseSchedule.from_scheduler_config({"rescale_betas_zero_snr": True, "prediction_type": "epsilon"})


# ---------------------------------------------------------------- adapters

def test_wan_adapter_layout_geometry_and_text(tiny_video_dirs):
    from tdm.backbones import WanBackbone, load_backbone

    b = load_backbone(tiny_video_dirs["wan"], video=WAN_SHAPE)
    assert isinstance(b, WanBackbone) and b.family == "wan"
    assert b.latent_shape == (16, 2, 4, 4)          # (C, F, H, W): 5 frames -> 2 latent frames, 32 px -> 4
    assert (b.frames, b.fps, b.image_size) == (5, 8.0, (32, 32))
    cond = b.encode_prompts(["a red cat", "a dog"])
    stock, _ = b.pipe.encode_prompt(["a red cat", "a dog"], do_classifier_free_guidance=False,
                                    max_sequence_length=b.max_sequence_length)
    assert torch.equal(cond["encoder_hidden_states"], stock)
    x = torch.randn(2, *b.latent_shape)
    out = b.call_network(b.network, x, torch.tensor([1000, 500]), cond)
    assert out.shape == x.shape
    videos = b.decode(x)
    assert videos.shape == (2, 5, 3, 32, 32) and 0 <= videos.min() and videos.max() <= 1
    # the network sees T * sigma: t = 500 on the shift-3 schedule is sigma 0.75, timestep 750
    ref = b.network(hidden_states=x, timestep=torch.tensor([1000.0, 750.0]),
                    encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert torch.allclose(out, ref, atol=1e-6)


def test_cogvideox_adapter_layout_geometry_and_decoding(tiny_video_dirs):
    from tdm.backbones import CogVideoXBackbone, load_backbone

    b = load_backbone(tiny_video_dirs["cogvideox"])   # the transformer's training geometry
    assert isinstance(b, CogVideoXBackbone)
    assert b.latent_shape == (3, 4, 2, 2)            # (F, C, H, W): 9 frames -> 3, 16 px -> 2
    assert (b.frames, b.image_size) == (9, (16, 16))
    x = torch.randn(2, *b.latent_shape)
    cond = b.encode_prompts(["a red cat", "a dog"])
    assert b.call_network(b.network, x, torch.tensor([999, 10]), cond).shape == x.shape
    videos = b.decode(x)
    ref = b.pipe.decode_latents(x)                   # the stock pipeline's own decoding: (B, C, F, H, W)
    assert videos.shape == (2, 9, 3, 16, 16)
    assert torch.allclose(videos, ((ref + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4), atol=1e-6)


@pytest.mark.parametrize("field,value,match", [("frames", 6, "video.frames: must be 1 \\+ a multiple of 4"),
                                               ("height", 40, "video.height: must be a positive multiple of 16"),
                                               ("width", 8, "video.width: must be a positive multiple of 16")])
def test_video_geometry_errors_name_the_field(tiny_video_dirs, field, value, match):
    from tdm.backbones import load_backbone

    with pytest.raises(InputError, match=match):
        load_backbone(tiny_video_dirs["wan"], video={**WAN_SHAPE, field: value})


def test_image_teacher_refuses_video_geometry(tiny_toy_dir):
    from tdm.backbones import load_backbone

    with pytest.raises(InputError, match="video.frames: the teacher .* is an image model"):
        load_backbone(tiny_toy_dir, video={"frames": 5})


def test_unsupported_video_variants_are_refused_by_name(tiny_video_dirs):
    import diffusers

    from tdm.backbones import CogVideoXBackbone, WanBackbone

    pipe = diffusers.WanPipeline.from_pretrained(str(tiny_video_dirs["wan"]))
    two = diffusers.WanPipeline(**{**pipe.components, "transformer_2": pipe.transformer}, boundary_ratio=0.875)
    with pytest.raises(InputError, match="Wan 2.2 A14B"):
        WanBackbone(two)
    cog = diffusers.CogVideoXPipeline.from_pretrained(str(tiny_video_dirs["cogvideox"]))
    cog.transformer.register_to_config(patch_size_t=2)
    with pytest.raises(InputError, match="CogVideoX 1.5"):
        CogVideoXBackbone(cog)


def test_wan22_per_token_timesteps_and_step_embedding(tiny_video_dirs):
    """Wan 2.2 TI2V takes one timestep per token; a TDM-unify role's step embedding reaches every token."""
    import diffusers

    from tdm.backbones import WanBackbone
    from tdm.backbones.video import VideoShape

    pipe = diffusers.WanPipeline.from_pretrained(str(tiny_video_dirs["wan"]))
    b = WanBackbone(diffusers.WanPipeline(**pipe.components, expand_timesteps=True), VideoShape(5, 32, 32, 8.0))
    cond = b.encode_prompts(["a red cat"])
    x = torch.randn(1, *b.latent_shape)
    role = b.trainable_copy(step_values=[1, 2])
    base = role(x, torch.tensor([400]), cond, torch.tensor([1]))
    with torch.no_grad():
        role.step_embedding.embedding.weight[0].fill_(0.5)
    moved = role(x, torch.tensor([400]), cond, torch.tensor([1]))
    assert base.shape == x.shape and not torch.allclose(base, moved)
    with torch.no_grad():  # zero rows: exactly the teacher
        role.step_embedding.embedding.weight.zero_()
    assert torch.allclose(role(x, torch.tensor([400]), cond, torch.tensor([2])),
                          b.call_network(b.network, x, torch.tensor([400]), cond), atol=1e-6)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_lora_roles_start_at_the_teacher(tiny_video_dirs, family):
    from tdm.backbones import load_backbone

    b = load_backbone(tiny_video_dirs[family], video=WAN_SHAPE if family == "wan" else None)
    student = b.lora_role("student", rank=4, alpha=4, gradient_checkpointing=True)
    teacher = b.denoiser()
    cond = b.encode_prompts(["a red cat"])
    x = torch.randn(1, *b.latent_shape)
    t = torch.tensor([500])
    assert student.trainable_parameters()
    assert torch.allclose(student(x, t, cond), teacher(x, t, cond), atol=1e-6)


def test_video_model_dir_round_trip_records_its_geometry(tiny_video_dirs, tmp_path):
    from tdm.backbones import load_backbone
    from tdm.generation import TDMPipeline
    from tdm.spec import ModelSpec, teacher_spec

    b = load_backbone(tiny_video_dirs["wan"], video=WAN_SHAPE)
    pipe = TDMPipeline(b, teacher_spec(b, 3, 2.0))
    pipe.save_pretrained(tmp_path / "m")
    spec = ModelSpec.load(tmp_path / "m")
    assert (spec.frames, spec.fps, spec.image_size, spec.family) == (5, 8.0, (32, 32), "wan")
    again = TDMPipeline.from_pretrained(tmp_path / "m")     # no geometry given: the spec's
    assert again.backbone.latent_shape == b.latent_shape
    out = again(["a red cat"], seeds=[3])
    assert out.shape == (1, 5, 3, 32, 32)
    assert torch.allclose(out, pipe(["a red cat"], seeds=[3]), atol=1e-5)


# ---------------------------------------------------------------- the toy video teacher

def test_moving_digits_data():
    from tdm.toy.motion import DIRECTIONS, TRACK, VIDEO_CAPTIONS, MovingDigits, caption_target, moving_digits, offsets

    assert len(VIDEO_CAPTIONS) == 40 and VIDEO_CAPTIONS[13] == "a handwritten digit 3 moving right"
    assert caption_target("a handwritten digit 3 moving right") == (3, 1) and caption_target("a cat") is None
    # two pixels per frame; 'along' is where the travel starts, 'across' the other coordinate
    assert offsets(DIRECTIONS.index("left"), 0, 3) == [(3, 8), (3, 6), (3, 4), (3, 2), (3, 0)]
    assert offsets(DIRECTIONS.index("down"), 0, 5) == [(0, 5), (2, 5), (4, 5), (6, 5), (8, 5)]
    videos, digits, dirs = moving_digits(torch.tensor([0, 1]))
    assert videos.shape == (8, 1, 5, 16, 16) and digits.tolist() == [0, 1] * 4
    assert dirs.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # every training video runs on the centre line: 'left' starts at column 8 of row 4 and ends at 0
    assert TRACK == (0, 4) and offsets(DIRECTIONS.index("left"), *TRACK)[::4] == [(4, 8), (4, 0)]
    left = videos[0, 0, 0] > -1
    assert left[4:12, 8:16].any() and not left[:4].any() and not left[12:].any() and not left[:, :8].any()
    assert torch.equal(videos, moving_digits(torch.tensor([0, 1]))[0])
    # the classifier's augmentation: random places, drawn with a generator
    data = MovingDigits(torch.tensor([0, 1]))
    jittered = data.videos(torch.arange(8), torch.Generator().manual_seed(0))
    assert jittered.shape == videos.shape and not torch.equal(jittered, videos)
    cols = torch.arange(16.0)
    for v, d in zip(videos[:, 0], dirs.tolist()):     # the ink's centre moves two pixels per frame its way
        ink = v + 1
        axis = 0 if DIRECTIONS[d] in ("left", "right") else 1     # sum over rows: the column profile
        centre = [(ink[f].sum(axis) * cols).sum() / ink[f].sum() for f in range(5)]
        step = -2 if DIRECTIONS[d] in ("left", "up") else 2
        assert all(abs((b - a).item() - step) < 1e-4 for a, b in zip(centre, centre[1:]))


def test_toy_video_teacher_saves_and_loads_as_a_wan_pipeline(tmp_path):
    from tdm.backbones import TOY_VIDEO_PIPELINE_CLASS, WanBackbone, load_backbone
    from tdm.toy.video_teacher import build_toy_video_backbone

    b = build_toy_video_backbone(seed=0, patch=4, patch_frames=5)   # the default teacher's patches
    b.save_pretrained(tmp_path / "toy")
    index = json.loads((tmp_path / "toy" / "model_index.json").read_text())
    assert index["_class_name"] == TOY_VIDEO_PIPELINE_CLASS and index["tdm_video"]["frames"] == 5
    again = load_backbone(tmp_path / "toy")
    assert isinstance(again, WanBackbone) and again.vae is None and again.latent_shape == (1, 5, 16, 16)
    assert again.pipeline_class == TOY_VIDEO_PIPELINE_CLASS
    cond = again.encode_prompts(["a handwritten digit 3 moving left"])
    x = torch.randn(1, 1, 5, 16, 16)
    assert torch.allclose(again.call_network(again.network, x, torch.tensor([300]), cond),
                          b.call_network(b.network, x, torch.tensor([300]), b.encode_prompts(
                              ["a handwritten digit 3 moving left"])), atol=1e-6)
    assert again.decode(x).shape == (1, 5, 1, 16, 16)


def test_latent_geometry_counts_the_temporal_patch():
    from tdm.backbones.video import VideoShape, latent_geometry

    # 9 frames under a 4x temporal VAE: 1 + 8/4 = 3 latent frames; 32 px / 8 = 4 latents per side
    shape = VideoShape(frames=9, height=32, width=32, fps=8.0)
    assert latent_geometry(shape, 4, 8, (2, 2), "Wan", frame_patch=3) == (3, 4, 4)
    with pytest.raises(InputError, match=r"video.frames: must make a multiple of 2 latent frames .*got 9"):
        latent_geometry(shape, 4, 8, (2, 2), "Wan", frame_patch=2)
    # the toy video teacher: pixel space, its 5 frames in one temporal patch
    assert latent_geometry(VideoShape(frames=5, height=16, width=16, fps=4.0), 1, 1, (4, 4), "toy", 5) == (5, 16, 16)


def test_temporal_consistency_and_frame_consistency_by_hand():
    from tdm.evaluation.clip import frame_consistency
    from tdm.evaluation.toy_video import temporal_consistency

    assert temporal_consistency(torch.tensor([[3, 3, 3], [3, 5, 3], [1, 1, 1], [0, 0, 2]])) == 50.0
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])   # cos 1 then cos 0: mean 0.5
    assert frame_consistency(f) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="F >= 2"):
        frame_consistency(torch.zeros(2, 1, 4))


# ---------------------------------------------------------------- encodings

@pytest.mark.parametrize("shape", [(5, 1, 12, 12), (9, 3, 17, 33)])
def test_mp4_round_trip_keeps_frames_and_size(shape):
    from tdm.video import mp4_frames, to_gif_bytes, to_mp4_bytes

    video = torch.rand(*shape)
    frames, fps = mp4_frames(to_mp4_bytes(video, 8.0))
    h, w = shape[2] + shape[2] % 2, shape[3] + shape[3] % 2        # yuv420p: even sizes
    assert frames.shape == (shape[0], h, w, 3) and fps == pytest.approx(8.0)
    flat = torch.full(shape, 0.5)                                   # a flat grey video decodes to grey
    grey, _ = mp4_frames(to_mp4_bytes(flat, 8.0))
    assert abs(float(grey.mean()) - 127.5) < 3
    import io

    from PIL import Image
    gif = Image.open(io.BytesIO(to_gif_bytes(video, 8.0)))
    assert gif.n_frames == shape[0]


def test_flow_match_grid_is_what_the_stock_euler_scheduler_walks():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tdm.grids import flow_match_grid
    from tdm.schedules import flow_sigma

    assert flow_match_grid(1, 1000, 3.0) == [1000.0]
    assert flow_match_grid(2, 1000, 3.0) == pytest.approx([1000.0, 500.0])   # both ends of the uniform grid
    g = flow_match_grid(4, 1000, 3.0)
    assert g[0] == 1000.0 and g[-1] == pytest.approx(250.0) and g == sorted(g, reverse=True)
    # shift 1: levels linear in t from T to 1, stretched linearly to end at T/K: exactly the uniform grid
    assert flow_match_grid(3, 1000, 1.0) == pytest.approx([1000.0, 2000 / 3, 1000 / 3])
    for K in (2, 3, 4, 8):
        grid = flow_match_grid(K, 1000, 3.0)
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=float(flow_sigma(torch.tensor(grid[-1]),
                                                                                              1000, 3.0)))
        sched.set_timesteps(K)
        ours = flow_sigma(torch.tensor(grid, dtype=torch.float64), 1000, 3.0)
        assert torch.allclose(sched.sigmas[:-1].double(), ours.double(), atol=1e-6) and sched.sigmas[-1] == 0


def test_wan_students_get_the_flow_match_grid_and_the_toy_the_uniform_one(tiny_video_dirs, tmp_path):
    from tdm.backbones import load_backbone
    from tdm.toy.video_teacher import build_toy_video_backbone

    assert load_backbone(tiny_video_dirs["wan"], video=WAN_SHAPE).grid_rule == "flow_match"
    assert load_backbone(tiny_video_dirs["cogvideox"]).grid_rule == "uniform"       # takes timesteps
    assert build_toy_video_backbone().grid_rule == "uniform"                          # tdm's own pipeline
