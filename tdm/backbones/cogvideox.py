"""Adapter for CogVideoX text-to-video (`CogVideoXPipeline`: CogVideoX-2B and -5B).

- v-prediction DDPM on SD's scaled-linear betas with CogVideoX's SNR shift (`snr_shift_scale`, 3) and zero
  terminal SNR (docs/method.md eqs. 1.7-1.8): timestep 999 is pure noise, where only the v
  parameterisation defines x0.
- Latents are (F, C, H, W) per sample, the transformer's own layout; `AutoencoderKLCogVideoX` decodes
  them in (C, F, H, W) after dividing by its scaling factor, as the stock pipeline does.
- Text goes through the stock pipeline's `encode_prompt` (T5, 226 tokens).
- The 5B model's 3D rotary position embeddings are computed as the stock pipeline computes them.
  CogVideoX 1.5 (temporal patches, `patch_size_t`) is not supported and is refused by name.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError
from .base import Cond, Model
from .stock import TRANSFORMER_LORA_TARGETS
from .video import VideoBackbone, VideoShape


class CogVideoXBackbone(VideoBackbone):
    family = "cogvideox"
    denoiser_name = "transformer"
    time_embedding_name = "time_embedding"
    lora_targets = TRANSFORMER_LORA_TARGETS
    max_text_tokens = 226   # CogVideoXPipeline.__call__'s max_sequence_length

    def __init__(self, pipe, shape: VideoShape | None = None):
        c = pipe.transformer.config
        if c.get("patch_size_t") is not None:
            raise InputError("teacher.uri: CogVideoX 1.5 (temporal patches, patch_size_t) is not supported; "
                             "distil CogVideoX-2B or -5B")
        super().__init__(pipe, shape)
        self.time_embed_dim = int(c.time_embed_dim)
        self._rotary: dict = {}

    @classmethod
    def family_shape_of(cls, transformer_config, model_index, spatial: int) -> VideoShape:  # noqa: ARG003
        # the transformer's training geometry (CogVideoX-2B: 49 frames, 60x90 latents = 480x720) at 8 fps
        c = transformer_config
        return VideoShape(frames=int(c["sample_frames"]), height=int(c["sample_height"]) * spatial,
                          width=int(c["sample_width"]) * spatial, fps=8.0)

    @classmethod
    def factors(cls, transformer_config, vae_config) -> tuple[int, int, tuple[int, int]]:
        p = int(transformer_config["patch_size"])
        # as CogVideoXPipeline derives them
        return int(vae_config["temporal_compression_ratio"]), 2 ** (len(vae_config["block_out_channels"]) - 1), (p, p)

    def layout(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        return (frames, self.network.config.in_channels, height, width)

    def to_bcfhw(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.permute(0, 2, 1, 3, 4)

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.vae.config.scaling_factor).sample

    def set_shape(self, shape: VideoShape) -> None:
        super().set_shape(shape)
        self._rotary = {}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"encoder_hidden_states": embeds}

    def _rotary_embedding(self, device: torch.device):
        """The 5B model's 3D RoPE for the current geometry (None for the 2B model), cached per device."""
        if not self.network.config.use_rotary_positional_embeddings:
            return None
        if device not in self._rotary:
            self._rotary[device] = self.pipe._prepare_rotary_positional_embeddings(
                self.shape.height, self.shape.width, self.latent_shape[0], device)
        return self._rotary[device]

    def call_network(self, net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = net.dtype
        return net(hidden_states=x.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                   timestep=t, image_rotary_emb=self._rotary_embedding(x.device)).sample
