"""Adapter for `UNet2DConditionModel` teachers with a CLIP-style text encoder: SD 1.x/2.x (epsilon or
v prediction, VAE latents) and the embedded toy (pixel space, no VAE). Both load through the same
diffusers-layout directory code path (`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`, optional `vae/`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..schedules import NoiseSchedule
from .base import Backbone, Cond, Model


class UNetBackbone(Backbone):
    family = "unet"
    time_embedding_name = "time_embedding"
    #: the LCM-LoRA target set: attention, feed-forward, resnet and resampling convolutions
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")

    def __init__(self, unet: Model, text_encoder: Model, tokenizer, scheduler_config: dict,
                 vae: Model | None = None, pipeline_class: str = "StableDiffusionPipeline"):
        self.network = unet.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.scheduler_config = dict(scheduler_config)
        self.pipeline_class = pipeline_class
        self.schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config)
        c = unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        self.latent_shape = (c.in_channels, size, size)
        self.time_embed_dim = unet.time_embedding.linear_2.out_features

    @classmethod
    def from_pretrained(cls, path: str | Path, model_index: dict, device="cpu", dtype=torch.float32) -> "UNetBackbone":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        path = str(path)
        # safetensors only: a pickled .bin in a model directory is refused, never unpickled
        weights = {"torch_dtype": dtype, "use_safetensors": True}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights) if "vae" in model_index and \
            model_index["vae"][0] is not None else None
        from diffusers import DDPMScheduler

        sched_cfg = DDPMScheduler.load_config(path, subfolder="scheduler")
        return cls(unet, text_encoder, tokenizer, sched_cfg, vae, model_index.get("_class_name", "")).to(device)

    def modules(self) -> dict[str, nn.Module]:
        mods = {"unet": self.network, "text_encoder": self.text_encoder}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(next(self.text_encoder.parameters()).device)
        return {"encoder_hidden_states": self.text_encoder(ids)[0]}

    @staticmethod
    def call_network(net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = next(net.parameters()).dtype
        return net(x.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype)).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # pixel-space model (the toy): samples are images in [-1, 1]
            return ((latents.float() + 1) / 2).clamp(0, 1)
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    def save_pretrained(self, path: str | Path, network: Model | None = None,
                        scheduler_config: dict | None = None) -> None:
        import diffusers

        self._require_own_vae()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (network if network is not None else self.network).save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        sched_cfg = scheduler_config or self.scheduler_config
        sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
        sched_cls.from_config(sched_cfg).save_pretrained(path / "scheduler")
        index: dict = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", "UNet2DConditionModel"],
                 "text_encoder": ["transformers", type(self.text_encoder).__name__],
                 "tokenizer": ["transformers", type(self.tokenizer).__name__],
                 "scheduler": ["diffusers", sched_cls.__name__]}
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
            index["vae"] = ["diffusers", type(self.vae).__name__]
        if self.pipeline_class.startswith("StableDiffusion"):
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
