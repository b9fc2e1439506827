"""Z-Image (Z-Image-Turbo, the base of the TDM authors' TDM-R1): a single-stream DiT on 2x2 latent patches,
Qwen3 text features through a chat template, rectified flow.

What sets it apart from SD3 (tdm.backbones.stock.SD3Backbone):
- ZImageTransformer2DModel takes LISTS of per-sample tensors: latents (C, 1, H, W) and caption features
  (L_i, D) of each prompt's own length. tdm's Cond is batch-first, so `encode_prompts` pads the features to
  `max_sequence_length` (a fixed length, so that any two conditions concatenate, `cond_cat`) and keeps each
  prompt's length in `cap_lens`; `call_network` un-pads them into the list again.
- The network reads the reversed level 1 - sigma (ZImagePipeline: (1000 - t) / 1000) and returns minus the
  velocity: tdm's flow output is v = eps - x0 (x_t = (1 - sigma) x0 + sigma eps), so `call_network` negates.
- Guidance: ZImagePipeline's `guidance_scale` g computes pos + g (pos - neg) and turns guidance off at
  g = 0 (Z-Image-Turbo's usage); tdm's scale w is diffusers' uncond + w (cond - uncond), off at w = 1. They
  are the same guidance for w = 1 + g: a Z-Image recipe's g is tdm's `loss.guidance_scale` 1 + g. The
  pipeline's `cfg_normalization` (off by default) and `cfg_truncation` (1.0 by default: never truncates) have
  no tdm counterpart; their defaults are plain CFG, which is what tdm computes.
- The network has no sample size: the resolution is what the directory records (an export's tdm_model.json,
  a test pipeline's `tdm_image_size`), else the release size 1024x1024.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..schedules import flow_sigma
from .base import Cond, Model
from .stock import PatchedImageBackbone


class ZImageBackbone(PatchedImageBackbone):
    """Z-Image through a stock ZImagePipeline object."""

    family = "zimage"
    #: TimestepEmbedder: (B,) levels -> (B, min(dim, 256)), the adaLN input of every modulated block
    time_embedding_name = "t_embedder"
    # attention (all blocks, refiners included) and the SwiGLU feed-forward
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    #: Qwen3 tokens per prompt, chat template included: ZImagePipeline's default
    max_sequence_length = 512

    def __init__(self, pipe, image_size: tuple[int, int] | None = None):
        # ZImagePipeline passes mu for its image token count; it shifts only where the scheduler config has
        # use_dynamic_shifting (Z-Image-Turbo's has not: a constant shift), which the schedule follows
        super().__init__(pipe, image_size)
        self.time_embed_dim = self.network.t_embedder.mlp[-1].out_features

    @property
    def stock_call_kwargs(self) -> dict:
        # guidance_scale 0 is ZImagePipeline's "no guidance" (its 1.0 would be tdm's 2.0): a student samples
        # with one pass
        return {**super().stock_call_kwargs, "guidance_scale": 0.0}

    def prompt_tokenizer(self):
        """Qwen3 reads max_sequence_length tokens, of which the chat template around the prompt takes some."""
        tok = self.pipe.tokenizer
        template = tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True)
        return tok, self.max_sequence_length - len(tok(template, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        # a fresh list: ZImagePipeline._encode_prompt rewrites its argument's items in place
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length)
        feats = embeds[0].new_zeros(len(embeds), self.max_sequence_length, embeds[0].shape[-1])
        for i, e in enumerate(embeds):  # each prompt's unmasked tokens, zero-padded to the fixed length
            feats[i, :len(e)] = e
        lens = torch.tensor([len(e) for e in embeds], device=feats.device)
        return {"cap_feats": feats, "cap_lens": lens}

    def call_network(self, net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # tdm's flow t is the unshifted level in [0, T]; ZImagePipeline feeds 1 - sigma, sigma the shifted level
        s = self.schedule
        sigma = flow_sigma(t.float(), s.num_train_timesteps, s.shift)
        dtype = net.dtype
        caps = [f[:n].to(dtype) for f, n in zip(cond["cap_feats"], cond["cap_lens"].tolist())]
        out = net(list(x.to(dtype).unsqueeze(2).unbind(0)), 1.0 - sigma, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the network predicts x0 - eps
