"""Adapter for Wan text-to-video (`WanPipeline`: Wan 2.1 T2V 1.3B/14B and Wan 2.2 TI2V-5B), and for the
embedded toy video teacher, which is the same network in pixel space (`TDMToyVideoPipeline`: a tiny
`WanTransformer3DModel` and UMT5 encoder, no VAE; tdm.toy.video).

- Rectified flow with shift: the hub configs use UniPC with `flow_shift`, diffusers' tests
  FlowMatchEuler with `shift`; both read as tdm's flow schedule (docs/method.md eq. 1.3). The network
  takes T * sigma, like SD3's.
- Latents are (C, F, H, W) per sample; `AutoencoderKLWan` decodes them after undoing the per-channel
  normalisation (latents_mean / latents_std), as the stock pipeline does.
- Text goes through the stock pipeline's `encode_prompt` (UMT5, zero-padded to max_sequence_length).
- Wan 2.2 TI2V-5B (`expand_timesteps`) takes one timestep per token; the A14B models (two experts
  switched by timestep, `transformer_2`) are not supported and are refused by name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from ..schedules import flow_sigma
from .base import Cond, Model
from .video import VideoBackbone, VideoShape

TOY_PIPELINE_CLASS = "TDMToyVideoPipeline"


class WanBackbone(VideoBackbone):
    family = "wan"
    denoiser_name = "transformer"
    time_embedding_name = "condition_embedder.time_embedder"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    max_text_tokens = 512   # WanPipeline.__call__'s max_sequence_length

    def __init__(self, pipe, shape: VideoShape | None = None, pipeline_class: str | None = None):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
            raise InputError("teacher.uri: Wan 2.2 A14B (two experts switched by timestep: transformer_2, "
                             "boundary_ratio) is not supported; distil Wan 2.1 or Wan 2.2 TI2V-5B")
        super().__init__(pipe, shape)
        if pipeline_class is not None:  # the toy: a WanPipeline object saved under its own class name
            self.pipeline_class = pipeline_class
        self.time_embed_dim = self.network.condition_embedder.time_embedder.linear_2.out_features

    @classmethod
    def family_shape_of(cls, transformer_config, model_index, spatial: int) -> VideoShape:  # noqa: ARG003
        # Wan 2.1 T2V 480p (1.3B release): 81 frames at 16 fps, 480x832; Wan 2.2 TI2V-5B: 121 at 24, 704x1280
        if model_index.get("expand_timesteps"):
            return VideoShape(frames=121, height=704, width=1280, fps=24.0)
        return VideoShape(frames=81, height=480, width=832, fps=16.0)

    @classmethod
    def factors(cls, transformer_config, vae_config) -> tuple[int, int, tuple[int, int]]:
        p = transformer_config["patch_size"]
        if vae_config is None:
            return 1, 1, (int(p[1]), int(p[2]))
        return int(vae_config["scale_factor_temporal"]), int(vae_config["scale_factor_spatial"]), (int(p[1]), int(p[2]))

    @classmethod
    def frame_patch(cls, transformer_config) -> int:
        return int(transformer_config["patch_size"][0])   # 1 in every release; the toy video teacher: 5

    def layout(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        return (self.network.config.in_channels, frames, height, width)

    def to_bcfhw(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return self.vae.decode(z * std + mean).sample

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"encoder_hidden_states": embeds}

    def call_network(self, net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        s = self.schedule
        t_net = s.num_train_timesteps * flow_sigma(t.float(), s.num_train_timesteps, s.shift)
        if self.pipe.config.get("expand_timesteps"):  # Wan 2.2 TI2V: the same timestep on every token
            p = net.config.patch_size
            tokens = (x.shape[2] // p[0]) * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
            t_net = t_net[:, None].expand(-1, tokens)
        dtype = net.dtype
        return net(hidden_states=x.to(dtype), timestep=t_net,
                   encoder_hidden_states=cond["encoder_hidden_states"].to(dtype)).sample

    # ------------------------------------------------------------------ the toy's own layout
    @classmethod
    def load_pipeline(cls, path: str | Path, model_index: dict, dtype):
        if model_index.get("_class_name") != TOY_PIPELINE_CLASS:
            return super().load_pipeline(path, model_index, dtype)
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = str(path)
        return WanPipeline(tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
                           text_encoder=UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder",
                                                                         torch_dtype=dtype, use_safetensors=True),
                           transformer=WanTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                                             torch_dtype=dtype, use_safetensors=True),
                           vae=None,
                           scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"))

    @classmethod
    def from_pretrained(cls, path: str | Path, model_index: dict, device="cpu", dtype=torch.float32,
                        video: dict | None = None):
        backbone = super().from_pretrained(path, model_index, device, dtype, video)
        if model_index.get("_class_name") == TOY_PIPELINE_CLASS:
            backbone.pipeline_class = TOY_PIPELINE_CLASS
        return backbone

    def save_pretrained(self, path: str | Path, network: Model | None = None,
                        scheduler_config: dict | None = None) -> None:
        if self.vae is not None:
            return super().save_pretrained(path, network, scheduler_config)
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (network if network is not None else self.network).save_pretrained(path / "transformer")
        self.pipe.text_encoder.save_pretrained(path / "text_encoder")
        self.pipe.tokenizer.save_pretrained(path / "tokenizer")
        sched_cfg = scheduler_config or self.scheduler_config
        sched_cls = getattr(diffusers, sched_cfg["_class_name"])
        sched_cls.from_config(sched_cfg).save_pretrained(path / "scheduler")
        index = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__,
                 "transformer": ["diffusers", type(self.network).__name__],
                 "text_encoder": ["transformers", type(self.pipe.text_encoder).__name__],
                 "tokenizer": ["transformers", type(self.pipe.tokenizer).__name__],
                 "scheduler": ["diffusers", sched_cls.__name__], "vae": [None, None],
                 "tdm_video": self.shape.to_dict()}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
