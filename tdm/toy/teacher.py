"""The embedded toy teacher: a text-conditioned `UNet2DConditionModel` on 8x8 digits with a tiny
CLIP text encoder and a word-level tokenizer, trained from scratch with CFG dropout and saved in
diffusers layout, so it loads through the same adapter as a real SD pipeline.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import UNetBackbone
from ..console import progress
from .data import CAPTIONS, load_digits_tensors, split_indices

PIPELINE_CLASS = "TDMToyDigitsPipeline"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
MAX_TOKENS = 8
#: Stable Diffusion 1.5's schedule (scaled-linear betas 0.00085..0.012, epsilon prediction), so the toy
#: exercises the same noise levels as the main real teacher family.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                        beta_end=0.012, prediction_type="epsilon", clip_sample=False)


def build_tokenizer(captions=CAPTIONS, max_tokens: int = MAX_TOKENS):
    """Word-level tokenizer over the captions' vocabulary; prompts become <bos> words <eos> <pad>..."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in captions for w in c.split()})
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_tokens)


def build_toy_backbone(seed: int = 0, channels: tuple[int, int] = (24, 48)) -> UNetBackbone:
    """A randomly initialised toy pipeline (UNet with two levels of `channels`, cross-attention at 4x4)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    return UNetBackbone(unet, text_encoder, tokenizer, dict(scheduler.config), None, PIPELINE_CLASS)


def train_toy_teacher(out_dir: str | Path, *, train_steps: int, batch_size: int, lr: float, cfg_dropout: float,
                      ema_decay: float, holdout_fraction: float, seed: int, channels: tuple[int, int] = (24, 48),
                      show_progress: bool = True) -> dict:
    """Train the toy teacher on the non-held-out digits and save it (EMA weights) in diffusers layout.

    Epsilon-prediction DDPM loss on UNet and text encoder jointly; each caption is replaced by the
    empty prompt with probability cfg_dropout. Returns training metrics.
    """
    backbone = build_toy_backbone(seed, channels)
    unet = backbone.network.train().requires_grad_(True)
    text_encoder = backbone.text_encoder.train().requires_grad_(True)
    x_all, y_all = load_digits_tensors()
    train_idx, _ = split_indices(y_all, holdout_fraction, seed)
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    ids = backbone.tokenizer(CAPTIONS + [""], padding="max_length", max_length=MAX_TOKENS,
                             return_tensors="pt").input_ids  # row 10 is the empty prompt
    abar = backbone.schedule.alphas_cumprod

    def loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(batch_size, generator=g) < cfg_dropout] = 10
        t = torch.randint(0, len(abar), (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * x0 + s * eps, t, encoder_hidden_states=text_encoder(ids[y])[0]).sample
        return F.mse_loss(pred, eps)

    final = fit([unet, text_encoder], loss, train_steps=train_steps, lr=lr, ema_decay=ema_decay, seed=seed,
                desc="toy teacher", show_progress=show_progress)
    backbone.save_pretrained(out_dir)
    return {"train_loss_final": final, "train_examples": len(x_train)}


def fit(modules: list[torch.nn.Module], loss, *, train_steps: int, lr: float, ema_decay: float, seed: int,
        desc: str, show_progress: bool = True) -> float:
    """Train `modules` on `loss(generator) -> scalar` with AdamW (warm-up, cosine decay, grad clip 1) and
    leave them frozen at their EMA weights; returns the mean loss of the last 200 steps."""
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(100, train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, train_steps) / train_steps)))
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in progress(range(train_steps), desc=desc, disable=not show_progress):
        value = loss(g)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up: forget the random init quickly
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        losses.append(value.item())
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    for m in modules:
        m.eval().requires_grad_(False)
    tail = losses[-200:]
    return sum(tail) / len(tail)
