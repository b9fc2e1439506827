"""Adapters that drive a stock diffusers pipeline object: SDXL (UNet with pooled text embeddings and
size/crop conditioning), PixArt-alpha/sigma (DiT with T5, learned-sigma output) and SD3 (MMDiT,
rectified flow with shift).

Text encoding calls the pipeline's own `encode_prompt`, so the conditioning is exactly what stock
diffusers computes (three encoders for SD3, zeroed empty prompts for SDXL, T5 masks for PixArt); the
adapter only maps it to a `Cond` dict, calls the network and decodes. All components stay shared with
the pipeline object: nothing is copied.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..schedules import NoiseSchedule, flow_sigma
from .base import Backbone, Cond, Model

TRANSFORMER_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class StockPipelineBackbone(Backbone):
    """Common part: load/save through the pipeline class, VAE decoding, latent shape."""

    pipeline_class: str
    denoiser_name: str            # "unet" or "transformer"

    def __init__(self, pipe):
        self.pipe = pipe
        for comp in pipe.components.values():
            if isinstance(comp, nn.Module):
                comp.eval().requires_grad_(False)
        self.network = getattr(pipe, self.denoiser_name)
        self.lora_prefix = self.denoiser_name
        self.pipeline_class = type(pipe).__name__
        # a scheduler built in memory has no _class_name in its config until it is saved
        self.scheduler_config = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
        self.schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config)
        c = self.network.config
        if getattr(c, "sample_size", None) is not None:  # image networks; a video network's geometry is chosen
            size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
            self.latent_shape = (c.in_channels, size, size)

    @classmethod
    def from_pretrained(cls, path: str | Path, model_index: dict, device="cpu", dtype=torch.float32):
        import diffusers

        pipe_cls = getattr(diffusers, model_index["_class_name"])
        # safetensors only: a pickled .bin in a model directory is refused, never unpickled
        return cls(pipe_cls.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)).to(device)

    def modules(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.pipe.components.items() if isinstance(v, nn.Module)}

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def vae(self) -> Model:
        return self.pipe.vae

    @vae.setter
    def vae(self, vae: Model) -> None:  # set_decoder: the pipeline object keeps it, as `pipe.vae = ...` does
        self.pipe.vae = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    def save_pretrained(self, path: str | Path, network: Model | None = None,
                        scheduler_config: dict | None = None) -> None:
        import diffusers

        self._require_own_vae()
        comps = dict(self.pipe.components)
        if network is not None:
            comps[self.denoiser_name] = network
        if scheduler_config is not None:
            comps["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
        extra = {k: self.pipe.config[k] for k in ("force_zeros_for_empty_prompt", "expand_timesteps")
                 if k in self.pipe.config}
        type(self.pipe)(**comps, **extra).save_pretrained(str(path))


def recorded_image_size(path: str | Path, model_index: dict) -> tuple[int, int] | None:
    """(height, width) a model directory records for a family whose network has no sample size (FLUX.1,
    Qwen-Image, Z-Image): its tdm_model.json `image_size` (an export), else model_index.json `tdm_image_size`
    (a tiny test pipeline); None for a stock hub pipeline (the family's release size applies)."""
    from ..spec import SPEC_FILE, ModelSpec

    if (Path(path) / SPEC_FILE).is_file():
        size = ModelSpec.load(path).image_size
        if size:
            return (int(size[0]), int(size[1]))
    size = model_index.get("tdm_image_size")
    return (int(size[0]), int(size[1])) if size else None


def patch_pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches, in FluxPipeline._pack_latents' order."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def patch_unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of patch_pack: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class PatchedImageBackbone(StockPipelineBackbone):
    """Image families whose network has no sample size and reads 2x2 latent patches (FLUX.1, Qwen-Image,
    Z-Image). The resolution is the directory's record (recorded_image_size), else the release size; the
    shift follows the resolution's image tokens (docs/method.md eq. 1.3b)."""

    denoiser_name = "transformer"
    release_size: tuple[int, int] = (1024, 1024)
    #: latent channels per network input channel: 4 where the pipeline packs 2x2 patches into channels
    packed_channels: int = 1
    #: text tokens per prompt (the stock pipeline's default max_sequence_length)
    max_sequence_length: int

    def __init__(self, pipe, image_size: tuple[int, int] | None = None):
        super().__init__(pipe)
        f = pipe.vae_scale_factor
        h, w = image_size or self.release_size
        if h <= 0 or w <= 0 or h % (2 * f) or w % (2 * f):
            from ..errors import InputError
            raise InputError(f"image_size: {self.pipeline_class} needs a height and width that are positive "
                             f"multiples of {2 * f} (VAE x{f}, 2x2 patches), got {h}x{w}")
        c = self.network.config
        self.latent_shape = (c.in_channels // self.packed_channels, h // f, w // f)
        self.schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config, seq_len=self.image_tokens)
        if isinstance(c.get("num_attention_heads"), int) and isinstance(c.get("attention_head_dim"), int):
            self.time_embed_dim = c.num_attention_heads * c.attention_head_dim   # an MMDiT's (B, inner_dim)
        # a guidance-distilled network (FLUX.1-dev) takes the scale as an input
        self.embeds_guidance = bool(c.get("guidance_embeds", False))

    @classmethod
    def from_pretrained(cls, path: str | Path, model_index: dict, device="cpu", dtype=torch.float32):
        import diffusers

        pipe_cls = getattr(diffusers, model_index["_class_name"])
        # safetensors only: a pickled .bin in a model directory is refused, never unpickled
        pipe = pipe_cls.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
        return cls(pipe, recorded_image_size(path, model_index)).to(device)

    @property
    def image_tokens(self) -> int:
        """Image tokens per sample: the latent's 2x2 patches."""
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    @property
    def image_size(self) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        return self.latent_shape[1] * f, self.latent_shape[2] * f

    @property
    def stock_call_kwargs(self) -> dict:
        h, w = self.image_size
        return {"height": h, "width": w, "max_sequence_length": self.max_sequence_length}


class SDXLBackbone(StockPipelineBackbone):
    """Stable Diffusion XL: two CLIP encoders, pooled embedding and (size, crop, target) time ids."""

    family = "sdxl"
    denoiser_name = "unet"
    time_embedding_name = "time_embedding"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")

    def __init__(self, pipe):
        super().__init__(pipe)
        self.time_embed_dim = self.network.time_embedding.linear_2.out_features

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            # stock SDXL uses zero embeddings, not the encoded "", for an empty negative prompt
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        size = self.image_size
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                               text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": time_ids.to(embeds.device).repeat(len(prompts), 1)}

    @staticmethod
    def call_network(net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = net.dtype
        return net(x.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                   added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype),
                                      "time_ids": cond["time_ids"].to(dtype)}).sample


class DiTBackbone(StockPipelineBackbone):
    """Transformer denoisers: the timestep embedding is as wide as the attention (heads x head dim)."""

    denoiser_name = "transformer"
    lora_targets = TRANSFORMER_LORA_TARGETS

    def __init__(self, pipe):
        super().__init__(pipe)
        c = self.network.config
        self.time_embed_dim = c.num_attention_heads * c.attention_head_dim


class PixArtBackbone(DiTBackbone):
    """PixArt-alpha / sigma: DiT with T5 conditioning; a learned-sigma output keeps its first half."""

    family = "pixart"
    time_embedding_name = "adaln_single.emb"
    #: T5 tokens per prompt, as the stock pipelines (alpha: 120)
    max_sequence_length = 120

    @property
    def stock_call_kwargs(self) -> dict:
        # caption cleaning and resolution binning would change what the stock pipeline computes
        return {"clean_caption": False, "use_resolution_binning": False,
                "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, mask, _, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                     device=self.device, clean_caption=False,
                                                     max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    @staticmethod
    def call_network(net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = net.dtype
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if net.config.sample_size == 128:  # PixArt-alpha 1024px: micro-conditions, as its pipeline passes them
            h = w = x.shape[-1] * 8
            added = {"resolution": torch.tensor([[h, w]], device=x.device, dtype=dtype).repeat(x.shape[0], 1),
                     "aspect_ratio": torch.tensor([[h / w]], device=x.device, dtype=dtype).repeat(x.shape[0], 1)}
        out = net(x.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                  encoder_attention_mask=cond["encoder_attention_mask"], timestep=t, added_cond_kwargs=added).sample
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma: [eps, variance]; the sampler uses eps only
            out = out[:, :x.shape[1]]
        return out


class SD3Backbone(DiTBackbone):
    """Stable Diffusion 3: MMDiT, two CLIP + T5 encoders, rectified flow with shift."""

    family = "sd3"
    time_embedding_name = "time_text_embed"
    lora_targets = TRANSFORMER_LORA_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                               "ff_context.net.0.proj", "ff_context.net.2")
    max_sequence_length = 256

    @property
    def stock_call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def prompt_tokenizer(self):
        """T5 reads max_sequence_length tokens (its CLIP encoders read their 77); without T5, CLIP's."""
        t5 = getattr(self.pipe, "tokenizer_3", None)
        if t5 is None:
            tok = self.pipe.tokenizer
            return (tok, int(tok.model_max_length)) if tok is not None else None
        return t5, self.max_sequence_length

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def call_network(self, net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # tdm's flow t is the unshifted level in [0, T]; the network (like the stock scheduler) takes
        # T * sigma, with sigma the shifted level
        s = self.schedule
        t_net = s.num_train_timesteps * flow_sigma(t.float(), s.num_train_timesteps, s.shift)
        dtype = net.dtype
        return net(hidden_states=x.to(dtype), timestep=t_net,
                   encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                   pooled_projections=cond["pooled_projections"].to(dtype)).sample
