"""Tiny random-weight pipelines built from configs, for tests and benchmarks (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def clip_tokenizer(path: Path):
    """A CLIPTokenizer from a hand-written vocabulary (byte-level BPE with no merges)."""
    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)


def build_tiny_sd15(path: str | Path, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 1.5-shaped pipeline (UNet + VAE + CLIP, SD 1.5's scheduler) saved with
    save_pretrained under path/pipe; returns that directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(path / "_tok")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


def build_tiny_toy(path: str | Path, seed: int = 0) -> Path:
    """The toy teacher's architecture at minimum width (8, 16), random weights, diffusers layout."""
    from .toy.teacher import build_toy_backbone

    build_toy_backbone(seed=seed, channels=(8, 16)).save_pretrained(path)
    return Path(path)


def _tiny_clip(tokenizer, projection: bool, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, projection_dim=projection_dim)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _tiny_t5(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1))


def _tiny_vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=16, sample_size=16, **kw)


def build_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL-shaped pipeline (UNet with text_time added conditioning, two CLIP encoders, VAE)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=64,
                                norm_num_groups=16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=_tiny_clip(tok, False),
                                     text_encoder_2=_tiny_clip(tok, True), tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=scheduler)
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


def build_tiny_pixart(path: str | Path, seed: int = 0, layers: int = 2, heads: int = 3, head_dim: int = 8,
                      sample_size: int = 8) -> Path:
    """A tiny PixArt-alpha-shaped pipeline (DiT with learned sigma, T5 encoder, VAE); the transformer's depth,
    heads, head width and latent size can be raised (bench/bench_fsdp.py)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    transformer = PixArtTransformer2DModel(sample_size=sample_size, num_layers=layers, patch_size=2,
                                           attention_head_dim=head_dim, num_attention_heads=heads, caption_channels=32,
                                           in_channels=4,
                                           cross_attention_dim=heads * head_dim, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=_tiny_t5(tok), vae=_tiny_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


def build_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """A tiny SD3-shaped pipeline (MMDiT, two CLIP encoders with projection + T5, flow matching, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
                                    text_encoder=_tiny_clip(tok, True), tokenizer=tok,
                                    text_encoder_2=_tiny_clip(tok, True), tokenizer_2=tok,
                                    text_encoder_3=_tiny_t5(tok), tokenizer_3=tok)
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


def record_image_size(pipe_dir: Path, size: tuple[int, int]) -> Path:
    """Record the resolution of a family whose network has no sample size (FLUX.1, Qwen-Image, Z-Image) in
    the pipeline's model_index.json (`tdm_image_size`, read by tdm.backbones.stock.recorded_image_size)."""
    index = pipe_dir / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "tdm_image_size": list(size)}, indent=2))
    return pipe_dir


def build_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1-shaped pipeline (16x16 images): one double- and one single-stream block, CLIP (pooled) +
    T5, 2x2-packed latents, dynamic shifting; `guidance_embeds` True is FLUX.1-dev's guidance-distilled
    network, False schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler,
                        vae=_tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=_tiny_clip(tok, False), tokenizer=tok, text_encoder_2=_tiny_t5(tok),
                        tokenizer_2=tok)
    pipe.save_pretrained(path / "pipe")
    return record_image_size(path / "pipe", (16, 16))


def build_tiny_clip(path: str | Path, seed: int = 0, mean=(0.48145466, 0.4578275, 0.40821073),
                    std=(0.26862954, 0.26130258, 0.27577711)) -> Path:
    """A tiny random CLIP (text + vision, 32x32 images) with tokenizer and preprocessor config, for the
    real-teacher evaluation (eval.clip_model) in tests."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    tokenizer = clip_tokenizer(path / "_tok")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True}))
    return path


#: family -> builder of a tiny random-weight pipeline
TINY_BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "pixart": build_tiny_pixart, "sd3": build_tiny_sd3}


def _tiny_umt5(tokenizer, d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8, pad_token_id=1,
                                       eos_token_id=1, decoder_start_token_id=0))


def build_tiny_wan(path: str | Path, seed: int = 0) -> Path:
    """A tiny Wan 2.1-shaped pipeline (WanTransformer3DModel, AutoencoderKLWan, UMT5; UniPC with flow
    sigmas and flow_shift 3, as the hub configs), diffusers' own test sizes; 32x32 videos of 5 frames
    make (16, 2, 4, 4) latents."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tok, text_encoder=_tiny_umt5(tok), transformer=transformer, vae=vae,
                       scheduler=scheduler)
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


def build_tiny_cogvideox(path: str | Path, seed: int = 0) -> Path:
    """A tiny CogVideoX-2B-shaped pipeline (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX, T5;
    CogVideoX's DDIM schedule: v-prediction, SNR shift 3, zero terminal SNR); its training geometry is
    9 frames of 16x16 ((3, 4, 2, 2) latents)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = clip_tokenizer(path / "_tok")
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", snr_shift_scale=3.0,
                                       rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                       clip_sample=False, set_alpha_to_one=True)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=_tiny_t5(tok), transformer=transformer, vae=vae,
                             scheduler=scheduler)
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


#: video family -> builder of a tiny random-weight pipeline
TINY_VIDEO_BUILDERS = {"wan": build_tiny_wan, "cogvideox": build_tiny_cogvideox}
