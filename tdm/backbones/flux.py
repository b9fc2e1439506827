"""FLUX.1 (dev and schnell): an MMDiT on 2x2-packed latents, CLIP (pooled) + T5 conditioning, rectified flow
with a resolution-dependent shift.

What sets it apart from SD3 (tdm.backbones.stock.SD3Backbone):
- FLUX.1-dev is guidance-distilled: its network embeds the guidance scale (`guidance_embeds`) and has no
  unconditional branch worth calling. `loss.teacher_guidance embedded` feeds the scale to the network in one
  pass; `cfg` keeps two batched passes with the embedded scale at 1 (docs/method.md §9).
- The network reads tokens of 2x2 latent patches; tdm keeps samples unpacked (C, H, W), as the VAE reads
  them, and packs around each call (`patch_pack`), as FluxPipeline does.
- The shift follows the image token count ("dynamic shifting", docs/method.md eq. 1.3b), so the schedule is
  resolved once for the run's resolution.
- The network has no sample size: the resolution is what the directory records (an export's tdm_model.json,
  a test pipeline's `tdm_image_size`), else the release size 1024x1024.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..schedules import flow_sigma
from .base import Cond, Model
from .stock import PatchedImageBackbone, patch_pack, patch_unpack


class FluxBackbone(PatchedImageBackbone):
    """FLUX.1-dev / schnell through a stock FluxPipeline object."""

    family = "flux"
    time_embedding_name = "time_text_embed"
    # the double-stream blocks' attention and both feed-forwards, and the single-stream blocks' MLP
    # projection (diffusers' FLUX LoRA trainers target the same linears)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
    #: T5 tokens per prompt: FluxPipeline's default (schnell's model card uses 256)
    max_sequence_length = 512

    #: the pipeline packs 2x2 latent patches into the network's input channels
    packed_channels = 4

    def __init__(self, pipe, image_size: tuple[int, int] | None = None):
        # embeds_guidance: FLUX.1-dev yes; schnell (timestep-distilled) takes no scale
        super().__init__(pipe, image_size)
        t5 = getattr(pipe, "tokenizer_2", None)
        if t5 is not None:
            self.max_sequence_length = min(self.max_sequence_length, int(t5.model_max_length))

    def prompt_tokenizer(self):
        """T5 reads max_sequence_length tokens (CLIP only its 77, for the pooled embedding)."""
        t5 = getattr(self.pipe, "tokenizer_2", None)
        return (t5, self.max_sequence_length) if t5 is not None else super().prompt_tokenizer()

    def stock_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return patch_pack(noise)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def call_network(self, net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        from diffusers import FluxPipeline

        # tdm's flow t is the unshifted level in [0, T]; FluxPipeline feeds the shifted sigma in [0, 1]
        s = self.schedule
        sigma = flow_sigma(t.float(), s.num_train_timesteps, s.shift)
        h, w = x.shape[-2:]
        dtype = net.dtype
        text = cond["encoder_hidden_states"]
        guidance = None
        if net.config.guidance_embeds:  # cfg mode (no "guidance" in cond): the scale 1, as the stock call's
            guidance = cond.get("guidance", torch.ones(x.shape[0], device=x.device)).float()
        out = net(hidden_states=patch_pack(x).to(dtype), timestep=sigma.to(dtype), guidance=guidance,
                  pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=text.to(dtype),
                  txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
                  img_ids=FluxPipeline._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, x.device, dtype)).sample
        return patch_unpack(out, h, w)
