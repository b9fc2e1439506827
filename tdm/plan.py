"""Per-worker memory of a distillation plan, estimated before any work (`pipelines/distill.py --plan`,
docs/scaling.md "The planner"). Pure arithmetic on parameter counts: the network is built on the meta
device, so planning a 12B teacher allocates nothing.

Bytes per worker, N = train.num_workers under fsdp (1 under ddp), P = network parameters, L = one LoRA
adapter's parameters, p = bytes of a frozen weight (2 under bf16/fp16 on a GPU, else 4):

    teacher (frozen; a LoRA run's shared base)    P p / N
    student, fake score (each)                    full: 16 P / N (fp32 weight 4, gradient 4, Adam 8)
                                                  LoRA: 16 L / N
    EMA of the student                            full: 4 P / N, LoRA: 4 L / N
    FSDP working set                              2 u q + r q + 4 u (u: the largest block, r: the root unit,
                                                  q: the all-gather dtype's bytes; two blocks in flight
                                                  with prefetch, the root kept gathered, one block's
                                                  unsharded fp32 gradient)
    activations of one trained forward            blocks x s b h x 34 a/2 (Korthikanti et al. 2022, eq. 2,
                                                  without the attention-score term: memory-efficient
                                                  attention does not store it); with activation
                                                  checkpointing of every n-th block, those blocks keep only
                                                  their input (s b h a) and one is recomputed at a time

with s tokens, b the micro-batch, h the width and a the activation bytes. The activation term is the coarse
one (it ignores a UNet's varying widths); the bench (bench/bench_fsdp.py) compares the whole estimate with
the measured peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

GIB = 1024 ** 3


@dataclass(frozen=True)
class NetworkStats:
    """What the planner needs to know about a network: parameter counts (the largest FSDP unit and the root
    unit's), block count, and the token count and width of one sample's activations."""

    params: int
    largest_unit: int
    root: int
    blocks: int
    tokens: int
    width: int

    @classmethod
    def of(cls, net: nn.Module, latent_shape: tuple[int, ...]) -> "NetworkStats":
        """Stats of a diffusers network (works on the meta device) for samples of `latent_shape`."""
        from .sharding import shard_units

        units = shard_units(net)
        sizes = [sum(p.numel() for p in u.parameters()) for u in units]
        total = sum(p.numel() for p in net.parameters())
        return cls(params=total, largest_unit=max(sizes, default=total), root=total - sum(sizes),
                   blocks=max(1, len(units)), tokens=_tokens(net, latent_shape), width=_width(net))


def _tokens(net: nn.Module, latent_shape: tuple[int, ...]) -> int:
    """Tokens of one sample: the latent's positions over the network's patch (a UNet: its positions)."""
    patch = getattr(net.config, "patch_size", None) or 1
    patch_area = math.prod(patch) if isinstance(patch, (list, tuple)) else patch * patch
    positions = math.prod(latent_shape[1:]) if len(latent_shape) > 1 else 1
    return max(1, positions // patch_area)


def _width(net: nn.Module) -> int:
    c = net.config
    heads, head_dim = getattr(c, "num_attention_heads", None), getattr(c, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    channels = getattr(c, "block_out_channels", None)
    return int(max(channels)) if channels else int(getattr(c, "hidden_size", 0) or 0)


def lora_params(net: nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters of one LoRA adapter of `rank` on the modules of `net` whose name ends with a target (peft's
    rule): r (in + out) per linear layer, r (in k + out) per convolution."""
    total = 0
    for name, m in net.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        if isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            total += rank * (m.in_channels * math.prod(m.kernel_size) + m.out_channels)
    return total


@dataclass
class MemoryPlan:
    """Estimated bytes per worker, by component."""

    rows: list[tuple[str, float]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    def table(self) -> str:
        lines = [f"  {name:<34} {size(b):>12}" for name, b in self.rows]
        return "\n".join([*lines, f"  {'total per worker':<34} {size(self.total):>12}"])


def size(b: float) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB."""
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:.1f} MiB"


def plan_memory(stats: NetworkStats, *, finetune: str, lora: int, strategy: str, workers: int, frozen_bytes: int,
                compute_bytes: int, ema: bool, micro_batch: int, checkpointing: bool, checkpoint_every: int
                ) -> MemoryPlan:
    """Bytes per worker of a TDM run (module docstring for each term). `lora`: parameters of one adapter;
    `frozen_bytes`: bytes per frozen weight; `compute_bytes`: bytes per activation and all-gathered weight."""
    n = workers if strategy == "fsdp" else 1
    trained = stats.params if finetune == "full" else lora
    plan = MemoryPlan()
    plan.rows.append(("teacher" if finetune == "full" else "teacher (shared LoRA base)",
                      stats.params * frozen_bytes / n))
    plan.rows.append(("student (weights, grads, Adam)", 16 * trained / n))
    plan.rows.append(("fake score (weights, grads, Adam)", 16 * trained / n))
    if ema:
        plan.rows.append(("student EMA", 4 * trained / n))
    if strategy == "ddp" and workers > 1:   # DDP's gradient buckets: a second copy of each trained gradient
        plan.rows.append(("DDP gradient buckets", 2 * 4 * trained))
    if strategy == "fsdp":
        plan.rows.append(("FSDP all-gather working set",
                          2 * stats.largest_unit * compute_bytes + stats.root * compute_bytes
                          + 4 * stats.largest_unit))
    per_block = stats.tokens * micro_batch * stats.width * 34 * compute_bytes / 2
    if checkpointing:
        kept = stats.blocks - stats.blocks // checkpoint_every
        act = kept * per_block + (stats.blocks - kept) * stats.tokens * micro_batch * stats.width * compute_bytes \
            + per_block
    else:
        act = stats.blocks * per_block
    plan.rows.append(("activations (one trained pass)", act))
    return plan


def meta_network(location: str, model_index: dict) -> nn.Module:
    """The teacher's denoising network (its `transformer` or `unet` component) built from its config on the
    meta device: parameter shapes without memory or weights (a hub teacher's config file only)."""
    import diffusers
    import torch

    name = "transformer" if "transformer" in model_index else "unet"
    cls = getattr(diffusers, model_index[name][1])
    config = cls.load_config(location, subfolder=name)
    with torch.device("meta"):
        return cls.from_config(config)


def config_tokens(net: nn.Module, frames: int | None = None) -> tuple[int, ...]:
    """A latent shape for the activation term from the network's config: (C, H, W) of its `sample_size`, or
    (C, F, H, W) with `frames` latent frames (or the config's sample_frames) for a video network. A network
    with no sample size (FLUX.1, Qwen-Image, Z-Image) is planned at 64x64 tokens, its 1024x1024 release size:
    64 x patch latents per side, the tokens the network reads being patch x patch latents each."""
    c = net.config
    patch = c.get("patch_size")
    size = c.get("sample_size") or c.get("sample_height") or 64 * (patch if isinstance(patch, int) else 1)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if c.get("sample_width"):
        w = c["sample_width"]
    f = frames or c.get("sample_frames")
    channels = c.get("in_channels") or 4
    return (channels, f, h, w) if f else (channels, h, w)


def plan_config(cfg, net: nn.Module, latent_shape: tuple[int, ...]) -> MemoryPlan:
    """The MemoryPlan of a TDMConfig for `net` on samples of `latent_shape`."""
    t, st = cfg.train, cfg.student
    half = t.use_gpu and t.mixed_precision in ("bf16", "fp16")
    targets = list(st.lora_targets or ("to_q", "to_k", "to_v", "to_out.0"))
    return plan_memory(
        NetworkStats.of(net, latent_shape), finetune=st.finetune,
        lora=lora_params(net, st.lora_rank, targets) if st.finetune == "lora" else 0, strategy=t.strategy,
        workers=t.num_workers, frozen_bytes=2 if half else 4, compute_bytes=2 if half else 4,
        ema=t.ema_decay is not None, micro_batch=t.batch_size // (t.num_workers * t.grad_accum_steps),
        checkpointing=t.gradient_checkpointing, checkpoint_every=t.gradient_checkpointing_every)


def fitting_changes(cfg, net: nn.Module, latent_shape: tuple[int, ...], budget_bytes: float) -> list[str]:
    """Single changes to `cfg` whose plan fits `budget_bytes` per worker, as flags with their estimate."""
    tries = {
        "--train.strategy fsdp": {"train": {"strategy": "fsdp"}},
        "--student.finetune lora": {"student": {"finetune": "lora"}},
        "--train.gradient_checkpointing true": {"train": {"gradient_checkpointing": True,
                                                          "gradient_checkpointing_every": 1}},
        f"--train.grad_accum_steps {cfg.train.grad_accum_steps * 4}": {"train": {"grad_accum_steps":
                                                                                cfg.train.grad_accum_steps * 4}},
    }
    if cfg.train.strategy == "fsdp":
        more = cfg.train.num_workers * 2
        tries[f"--train.num_workers {more}"] = {"train": {"num_workers": more}}
    if cfg.train.use_gpu and cfg.train.mixed_precision == "no":
        tries["--train.mixed_precision bf16"] = {"train": {"mixed_precision": "bf16"}}
    found = []
    for flag, change in tries.items():
        data = cfg.model_dump(mode="json")
        for section, values in change.items():
            data[section].update(values)
        try:
            other = type(cfg).model_validate(data)
        except ValueError:
            continue
        total = plan_config(other, net, latent_shape).total
        if total <= budget_bytes:
            found.append(f"{flag} ({size(total)})")
    return found
