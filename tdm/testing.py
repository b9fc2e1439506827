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


#: a Qwen-style chat template (what ZImagePipeline._encode_prompt applies to each prompt)
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


#: the words of QwenImagePipeline's prompt template, so the tiny tokenizer splits its prefix into the 34
#: tokens the pipeline drops (prompt_template_encode_start_idx), as Qwen2.5-VL's tokenizer does
_QWEN_TEMPLATE_TEXT = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                       "relationships of the objects and background:\nsystem\nuser\nassistant\n a an the cat dog red")


def qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE with Qwen's pre-tokenizer) trained offline on Qwen-Image's prompt
    template words, with Qwen's chat special tokens and a chat template (Z-Image applies it)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])._tokenizer.pre_tokenizer
    bpe.train_from_iterator([_QWEN_TEMPLATE_TEXT] * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in model["merges"]], chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    return tok


def build_tiny_qwenimage(path: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image-shaped pipeline (QwenImageTransformer2DModel, AutoencoderKLQwenImage with x4 latents
    and non-trivial latents_mean/std, Qwen2.5-VL with a vision tower, the hub scheduler config: dynamic
    shift and shift_terminal 0.02), for 32x48 images: (4, 8, 12) latents, 24 image tokens."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    z = 4
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z, out_channels=z, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.05],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok), "max_position_embeddings": 1024,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=len(tok))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(path / "pipe")
    return record_image_size(path / "pipe", (32, 48))


def build_tiny_zimage(path: str | Path, seed: int = 0, dynamic_shift: bool = False) -> Path:
    """A tiny Z-Image-shaped pipeline (32x32 images, (4, 16, 16) latents): ZImageTransformer2DModel with one
    refiner and two main layers, a 2-layer Qwen3 text encoder with a chat-template tokenizer, a FLUX-style VAE
    (scaling and shift factors) and Z-Image-Turbo's scheduler (constant shift 3; `dynamic_shift`: resolution-
    dependent shift instead)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, max_position_embeddings=1024,
                                          pad_token_id=tok.pad_token_id))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                           axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    vae = _tiny_vae(shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                use_dynamic_shifting=dynamic_shift)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                          transformer=transformer)
    pipe.save_pretrained(path / "pipe")
    return record_image_size(path / "pipe", (32, 32))


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
