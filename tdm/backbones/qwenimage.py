"""Adapter for Qwen-Image text-to-image (`QwenImagePipeline`: MMDiT over packed 2x2 latent patches,
Qwen2.5-VL text encoder, rectified flow with resolution-dependent ("dynamic") shift, true CFG).

- Text goes through the stock pipeline's `encode_prompt`, so the conditioning is exactly diffusers'.
  Stock pads each batch to its longest prompt; tdm concatenates batches encoded apart (cond + uncond,
  the cached prompt set), so `encode_prompts` pads to max_sequence_length with a zero mask, and
  `call_network` trims the all-padding tail again (exact: masked keys and text RoPE positions of the
  kept tokens are unchanged), so a batch costs what stock's does.
- The network takes the shifted level sigma itself (the pipeline passes timestep / 1000).
- The shift is resolved once from the image token count (docs/method.md eq. 1.3b). The hub scheduler's
  `shift_terminal` (0.02) only stretches the stock sampler's own grid, never the noise levels the network
  was trained on; it is left out of `scheduler_config`, so an exported student's stock scheduler walks
  exactly the sigmas tdm's sampler walks.
- Latents are (C, H, W) here; the stock pipeline takes them packed (`stock_latents`) and decodes through
  `AutoencoderKLQwenImage` (a video VAE: one frame) after undoing latents_mean / latents_std.
- Stock true CFG rescales the guided velocity to the conditional one's norm per packed token; `guide` does
  the same, so the teacher's target in distillation and its samples are the stock pipeline's guidance
  (docs/method.md §9).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError
from ..schedules import flow_sigma
from .base import Cond, Model
from .stock import PatchedImageBackbone, patch_pack, patch_unpack


class QwenImageBackbone(PatchedImageBackbone):
    family = "qwenimage"
    time_embedding_name = "time_text_embed"   # QwenTimestepProjEmbeddings: (B, inner_dim)
    #: diffusers' train_dreambooth_lora_qwen_image.py default
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    #: text tokens per prompt (QwenImagePipeline.__call__'s default max_sequence_length)
    max_sequence_length = 512

    #: the pipeline packs 2x2 latent patches into the network's input channels
    packed_channels = 4

    def __init__(self, pipe, image_size: tuple[int, int] | None = None):
        # the schedule's shift: from the packed image tokens, the stock pipeline's image_seq_len (same mu)
        super().__init__(pipe, image_size)
        self.scheduler_config = {k: v for k, v in self.scheduler_config.items() if k != "shift_terminal"}

    def guide(self, out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG on velocities (B, C, H, W): the linear combination, rescaled to the
        conditional velocity's norm over each packed 2x2 token (its 4C channels)."""
        h, w = out_cond.shape[-2:]
        cond, comb = patch_pack(out_cond), patch_pack(out_uncond + scale * (out_cond - out_uncond))
        return patch_unpack(comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)), h, w)

    def set_decoder(self, vae: Model, source: str | None = None, field: str = "decoder") -> None:  # noqa: ARG002
        raise InputError(f"{field}: a {self.pipeline_class} decodes with its own AutoencoderKLQwenImage; "
                         f"leave {field} unset")

    @property
    def stock_call_kwargs(self) -> dict:
        # no negative prompt and true_cfg_scale 1: one conditional pass per step, as a student samples
        return {**super().stock_call_kwargs, "true_cfg_scale": 1.0}

    def stock_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return patch_pack(noise)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, mask = self.pipe.encode_prompt(list(prompts), device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:  # stock drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - embeds.shape[1]
        return {"encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
                "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad))}

    def call_network(self, net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        mask = cond["encoder_hidden_states_mask"]
        keep = int(mask.bool().any(0).nonzero().max()) + 1     # drop the tail no prompt of the batch uses
        embeds, mask = cond["encoder_hidden_states"][:, :keep], mask[:, :keep]
        s = self.schedule
        # the scheduler's timestep is T * sigma (sigma: the shifted level); the pipeline passes timestep / 1000
        t_net = s.num_train_timesteps * flow_sigma(t.float(), s.num_train_timesteps, s.shift)
        _, h, w = x.shape[1:]
        dtype = net.dtype
        guidance = None
        if self.embeds_guidance:  # cfg mode (no "guidance" in cond): the scale 1, as a student's stock call passes
            guidance = cond.get("guidance", torch.ones(x.shape[0], device=x.device)).float()
        out = net(hidden_states=patch_pack(x).to(dtype), timestep=t_net.to(dtype) / 1000, guidance=guidance,
                  encoder_hidden_states=embeds.to(dtype),
                  encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as stock passes it
                  img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0], return_dict=False)[0]
        return patch_unpack(out, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        c = vae.config
        z = latents.to(vae.dtype)[:, :, None]                  # (B, C, 1, H, W): one frame
        mean = torch.tensor(c.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        image = vae.decode(z / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]   # stock's arithmetic
        return (image.float() * 0.5 + 0.5).clamp(0, 1)
