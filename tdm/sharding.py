"""The FSDP2 strategy (`train.strategy fsdp`): PyTorch's own `fully_shard` per network block for every
role, and sharded checkpoints that reshard on resume without pickle (docs/scaling.md).

Sharding is a property of the roles, applied once between building them and building their optimizers
(tdm.train.build_roles); the distiller and the losses see ordinary modules. What changes underneath:

- each block of a network (`shard_units`) and then the role itself is a `fully_shard` unit, so a worker
  holds 1/world of every parameter, gradient and optimizer state and all-gathers one block at a time;
- a LoRA run shards its one frozen base once: the teacher, the student and the fake score are views
  of it with different adapters, and each role then only wraps its own step embedding;
- gradients are reduce-scattered in float32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`
  under `train.mixed_precision bf16`); `clip_grad_norm_` returns the global norm over all shards, and
  EMA shadows are DTensors sharded like their parameters.

Checkpoints: `torch.distributed.checkpoint` with its safetensors storage (`HuggingFaceStorageWriter`,
one file per rank under `SHARD_DIR/`, sharding recorded in each file's JSON header), and everything
that is not a tensor in the `state.json` tree of tdm.statefile. DCP's default reader unpickles its
`.metadata` file; this one never writes or reads a pickle. Loading onto another worker count reshards.

Core: torch only (no Ray, MLflow or FastAPI).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

#: the parts of a training state (tdm.train.TrainState.state_dict) whose tensors are sharded
SHARDED_SECTIONS = ("student", "fake", "opt_student", "opt_fake", "ema")
#: the checkpoint's subdirectory of DCP safetensors shards (their reader takes every .safetensors file it lists)
SHARD_DIR = "shards"
#: tensors of the training state live in the shards; the JSON tree says so with this format tag
SHARDED_FORMAT = "dcp-safetensors"
#: network attributes that are blocks even though they are not in a ModuleList (a UNet's middle block)
SINGLE_BLOCKS = ("mid_block",)


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The blocks of a diffusers network that become their own FSDP units: every child of each top-level
    nn.ModuleList (down_blocks/up_blocks of a UNet, transformer_blocks and single_transformer_blocks of
    DiT/MMDiT/FLUX, blocks of Wan, layers/refiners of Z-Image) plus SINGLE_BLOCKS; the rest (embeddings,
    norms, projections) stays with the root unit."""
    units: list[nn.Module] = []
    for name, child in net.named_children():
        if isinstance(child, nn.ModuleList):
            units.extend(child)
        elif name in SINGLE_BLOCKS and child is not None:
            units.append(child)
    return units


def checkpoint_every(units: list[nn.Module], every: int) -> int:
    """Selective activation checkpointing: recompute every `every`-th unit's activations in the backward
    pass (every=1: all of them). Wraps the unit's forward, inside any FSDP hooks added later, so FSDP
    all-gathers the block before the recompute. Returns how many units were wrapped."""
    chosen = units[every - 1::every]
    for unit in chosen:
        inner = unit.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():     # the teacher's and the rollout's no-grad calls
                return _inner(*args, **kwargs)
            from torch.utils.checkpoint import checkpoint
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        unit.forward = forward
    return len(chosen)


def fsdp_kwargs(device_type: str, mixed_precision: str, cpu_offload: bool) -> dict:
    """Keyword arguments of every `fully_shard` call: a 1-D mesh over all workers, bf16 parameters with
    fp32 gradient reduction under mixed_precision bf16, optional CPU offload of parameters, gradients and
    optimizer states."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    kw: dict[str, Any] = {"mesh": init_device_mesh(device_type, (dist.get_world_size(),))}
    if mixed_precision == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw["offload_policy"] = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    return kw


def _shard_network(net: nn.Module, kw: dict) -> None:
    """Each block of `net`, then `net` itself (the root unit: the parameters outside the blocks)."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(net):
        fully_shard(unit, **kw)
    fully_shard(net, **kw)


def shard_role(role: nn.Module, kw: dict) -> None:
    """A full-copy role (student or fake score): its network's blocks, then the role itself (its step
    embedding and the network's remaining parameters). Called right after the role is copied from the
    teacher, so a worker holds at most one unsharded copy besides the teacher at any time."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(role.net):
        fully_shard(unit, **kw)
    fully_shard(role, **kw)


def shard_base(net: nn.Module, roles: list[nn.Module], kw: dict) -> None:
    """The frozen teacher network (blocks, then root), after the roles exist.

    For LoRA the roles are views of this one base, and FSDP allows a unit under one root only, so the base is
    the single root of all three: each role's step embedding is registered on it first (its parameters keep
    their role-relative names, tdm.backbones.base.Denoiser.named_trainable_parameters). The frozen weights
    never get gradients; FSDP only all-gathers them."""
    for role in roles:
        if getattr(role, "net", None) is net and role.step_embedding is not None:
            net.add_module(f"tdm_step_embedding_{role.adapter}", role.step_embedding)
    _shard_network(net, kw)


# ---------------------------------------------------------------- sharded checkpoints

def flatten(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict/list state, keyed by its path ("student/net.conv.weight",
    "opt_student/state/3/exp_avg", "ema/shadow/0"); the keys tdm.statefile uses in its JSON tree."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}/{i}" if prefix else str(i)))
    return out


def save_sharded(directory: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Collective: every rank writes its shards of `tensors` (DTensors, or plain tensors that are equal on
    all ranks and written once) as safetensors under directory/SHARD_DIR. Each rank may pass its own
    local directory: the file names carry the rank, so Ray Train merges them into one checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = Path(directory) / SHARD_DIR
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))


def load_sharded(directory: str | Path, into: dict[str, torch.Tensor]) -> None:
    """Fill `into` (key -> tensor or DTensor, allocated with the checkpoint's global shapes) in place from
    the shards under directory/SHARD_DIR, whatever the worker count that wrote them: each rank reads the
    slices its own shards cover. Without a process group (the driver, export) it reads full tensors."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    missing = sorted(set(into) - set(sharded_keys(directory)))
    if missing:
        from .statefile import CheckpointFormatError
        raise CheckpointFormatError(f"{directory}: the sharded checkpoint lacks {len(missing)} tensors "
                                    f"(e.g. {missing[:3]}): was it written by another student.finetune or model?")
    dcp.load(into, storage_reader=HuggingFaceStorageReader(str(Path(directory) / SHARD_DIR)),
             no_dist=not (dist.is_available() and dist.is_initialized()))


def sharded_keys(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """key -> global shape of every tensor in a sharded checkpoint, from the safetensors headers alone."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    meta = HuggingFaceStorageReader(str(Path(directory) / SHARD_DIR)).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}


def map_tensors(tree: Any, fn: Callable[[str, torch.Tensor], Any], prefix: str = "") -> Any:
    """`tree` with each tensor t at path p replaced by fn(p, t) (the paths of `flatten`)."""
    if isinstance(tree, torch.Tensor):
        return fn(prefix, tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(v, fn, f"{prefix}/{i}" if prefix else str(i)) for i, v in enumerate(tree))
    return tree


def split_state(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A training state as (the part rank 0 writes with tdm.statefile, the tensors every rank writes with
    save_sharded): the first keeps SHARDED_SECTIONS' structure and non-tensor values (param groups, EMA
    decay) under "sharded", each tensor replaced by {"$shard": key}, and is tagged with SHARDED_FORMAT."""
    sections = {k: state[k] for k in SHARDED_SECTIONS if k in state}
    rest = {k: v for k, v in state.items() if k not in sections}
    rest["format"] = SHARDED_FORMAT
    rest["sharded"] = map_tensors(sections, lambda key, _t: {"$shard": key})
    return rest, flatten(sections)


def join_state(rest: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The inverse of split_state: `rest` with each {"$shard": key} replaced by tensors[key]."""
    def resolve(tree: Any) -> Any:
        if isinstance(tree, dict):
            if set(tree) == {"$shard"}:
                return tensors[tree["$shard"]]
            return {k: resolve(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(resolve(v) for v in tree)
        return tree

    state = {k: v for k, v in rest.items() if k not in ("format", "sharded")}
    state.update(resolve(rest["sharded"]))
    return state


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Allocate an optimizer's lazily created state (one step with zero gradients at learning rate 0, which
    moves no weight: AdamW's decoupled decay is lr x weight_decay) so a checkpoint can be loaded into it in
    place, each rank receiving its own shards."""
    if opt.state:
        return
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
