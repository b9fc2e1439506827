"""The embedded toy video teacher: a tiny `WanTransformer3DModel` in pixel space on moving digits
(tdm.toy.motion), with a tiny UMT5 text encoder and a word-level tokenizer, trained from scratch by
rectified flow with CFG dropout. It is saved in diffusers layout as `TDMToyVideoPipeline` and loads
through the Wan adapter (tdm.backbones.wan), the code path of a real Wan teacher.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import WanBackbone
from ..backbones.video import VideoShape
from ..schedules import flow_sigma
from .data import load_digits_tensors, split_indices
from .motion import CANVAS, DIRECTIONS, FPS, FRAMES, VIDEO_CAPTIONS, MovingDigits, caption_index
from .teacher import build_tokenizer, fit

MAX_TOKENS = 10          # <bos> a handwritten digit 3 moving left <eos>, padded
#: rectified flow with Wan 2.1's 480p shift (its hub configs: flow_shift 3)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
SHAPE = VideoShape(frames=FRAMES, height=CANVAS, width=CANVAS, fps=FPS)


def build_toy_video_backbone(seed: int = 0, heads: int = 1, layers: int = 2, patch: int = 2,
                             head_dim: int = 64, patch_frames: int = 1) -> WanBackbone:
    """A randomly initialised toy video pipeline: Wan transformer (patch `patch_frames` x `patch` x `patch`,
    `heads` x `head_dim` wide, `layers` blocks) on 1-channel pixels, UMT5 text encoder (width 32). The
    default teacher (tdm.config.ToyVideoConfig) patches all 5 frames into each token (README, "the toy
    video teacher")."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from ..backbones import TOY_VIDEO_PIPELINE_CLASS

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(VIDEO_CAPTIONS, MAX_TOKENS)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))
    transformer = WanTransformer3DModel(
        patch_size=(patch_frames, patch, patch), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=1,
        out_channels=1, text_dim=32, freq_dim=64, ffn_dim=4 * heads * head_dim, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
    return WanBackbone(pipe, SHAPE, pipeline_class=TOY_VIDEO_PIPELINE_CLASS)


def train_toy_video_teacher(out_dir: str | Path, *, train_steps: int, batch_size: int, lr: float,
                            cfg_dropout: float, ema_decay: float, holdout_fraction: float, seed: int,
                            heads: int = 1, layers: int = 2, patch: int = 2, head_dim: int = 64,
                            patch_frames: int = 1, show_progress: bool = True) -> dict:
    """Train the toy video teacher on the non-held-out digits (all four directions) and save it (EMA
    weights) in diffusers layout.

    Rectified-flow loss (docs/method.md eq. 1.3): x_t = (1 - sigma) x0 + sigma eps with sigma the shifted
    level of u ~ U(0, 1), velocity target eps - x0, network timestep 1000 sigma. Each caption is replaced
    by the empty prompt with probability cfg_dropout. Returns training metrics."""
    backbone = build_toy_video_backbone(seed, heads, layers, patch, head_dim, patch_frames)
    net, text_encoder = backbone.network, backbone.pipe.text_encoder
    _, labels = load_digits_tensors()
    train_idx, _ = split_indices(labels, holdout_fraction, seed)
    data = MovingDigits(train_idx)
    captions = caption_index(data.digits, data.directions)
    tok = backbone.pipe.tokenizer(VIDEO_CAPTIONS + [""], padding="max_length", max_length=MAX_TOKENS,
                                  return_tensors="pt", return_attention_mask=True)
    empty = len(VIDEO_CAPTIONS)
    T, shift = SCHEDULER_CONFIG["num_train_timesteps"], SCHEDULER_CONFIG["shift"]

    def text(rows: torch.Tensor) -> torch.Tensor:
        # what WanPipeline.encode_prompt computes: UMT5 states, zeroed past each prompt's length
        mask = tok.attention_mask[rows]
        states = text_encoder(tok.input_ids[rows], mask).last_hidden_state
        return states * mask[..., None]

    def loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        x0, rows = data.videos(idx), captions[idx].clone()
        rows[torch.rand(batch_size, generator=g) < cfg_dropout] = empty
        sigma = flow_sigma(torch.rand(batch_size, generator=g) * T, T, shift)
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = net(hidden_states=(1 - s) * x0 + s * eps, timestep=T * sigma, encoder_hidden_states=text(rows)).sample
        return F.mse_loss(pred, eps - x0)

    final = fit([net, text_encoder], loss, train_steps=train_steps, lr=lr, ema_decay=ema_decay, seed=seed,
                desc="toy video teacher", show_progress=show_progress)
    backbone.save_pretrained(out_dir)
    return {"train_loss_final": final, "train_examples": len(data), "directions": len(DIRECTIONS)}
