"""FSDP2 (train.strategy fsdp) below Ray: sharding units, the sharded checkpoint format, and gloo processes
training the tiny toy UNet from sharded checkpoints on 1 and 2 workers, checked against one unsharded process
(tests/test_fsdp_e2e.py compares FSDP with DDP through Ray Train). docs/scaling.md.

Every rank gets the same micro-batch, so the averaged gradient equals the single process's: the runs then
differ only by float32 summation order (the gradient norm is summed over shards). Losses are compared at a
relative 1e-4, weights by the relative gap of the whole update (_update_gap) at 1e-3; Adam's epsilon is 1e-3
here so that a gradient element near zero does not turn a rounding difference into a full step."""
import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tdm.sharding import SHARD_DIR, flatten, join_state, shard_units, split_state

STEPS = 3


def _config(finetune: str, strategy: str, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
            extra: dict | None = None, **train):
    from tdm.config import load_config

    student = {"num_steps": 2, "step_set": [1, 2], "finetune": finetune}
    if finetune == "lora":
        student.update(lora_rank=4, lora_targets=list(targets))
    return load_config({"train": {"ema_decay": 0.9, "strategy": strategy, **train}, "student": student,
                        "optim": {"grad_clip": 1.0, "eps": 1e-3}, **(extra or {})})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg, toy_dir, steps, start_dir=None, save_dir=None):
    """Build the roles, optionally resume from start_dir, run `steps` iterations with fixed inputs, optionally
    save; returns the per-step (loss_fake, loss_student, grad_norm_student) and the student's full weights."""
    import torch.distributed as dist

    from tdm.backbones import load_backbone
    from tdm.distiller import TDMDistiller
    from tdm.statefile import save_state
    from tdm.train import build_roles, guided_conditioning, load_state_file

    torch.manual_seed(0)
    b = load_backbone(toy_dir, video=cfg.video.overrides())
    teacher, st = build_roles(cfg, b)
    start = 0
    if start_dir is not None:
        saved = load_state_file(start_dir)
        start = st.load_sharded(start_dir, saved) if cfg.train.strategy == "fsdp" else st.load_state_dict(saved)
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, st.student, st.fake,
                     st.opt_student, st.opt_fake, st.sched_student, st.sched_fake, st.ema)
    cond, uncond = guided_conditioning(cfg, b, b.encode_prompts(["a handwritten digit 1", "a handwritten digit 7"]),
                                       b.encode_prompts([""] * 2))
    curve, emas, initial = [], [], _full_weights(st.student)
    micro = [(cond, uncond)] * cfg.train.grad_accum_steps
    for i in range(start, start + steps):
        m = d.step(micro, 2 if i % 2 else 1, torch.Generator().manual_seed(i))
        curve.append((m["loss_fake"], m["loss_student"], m["grad_norm_student"]))
        emas.append([s.full_tensor() if hasattr(s, "full_tensor") else s.clone() for s in st.ema.shadow])
    if save_dir is not None:
        full = st.state_dict(start + steps, cfg, {})
        if cfg.train.strategy == "fsdp":
            from tdm.sharding import save_sharded
            full, tensors = split_state(full)
            save_sharded(Path(save_dir) / f"rank{dist.get_rank()}", tensors)
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_state(Path(save_dir) / "rank0", full)
    return curve, _full_weights(st.student), emas, initial


def _full_weights(role) -> dict[str, torch.Tensor]:
    """name -> full value of each trained parameter (collective for a sharded role)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in role.named_trainable_parameters()}


def _update_gap(w, ref, initial) -> float:
    """|w - ref| / |ref - initial| over all trained parameters: how far two runs' updates differ, relative to
    the update itself. Adam divides by the root of the second moment, so a gradient element near zero turns a
    float32 summation-order difference into up to one full step of that element: an element-wise bound on the
    weights would be meaningless, the relative gap of the whole update is not."""
    num = sum((w[n] - ref[n]).square().sum() for n in ref)
    den = sum((ref[n] - initial[n]).square().sum() for n in ref)
    return float((num / den).sqrt())


def _worker(rank, world, port, cfg_json, toy_dir, steps, start_dir, save_dir, out):
    import torch.distributed as dist

    from tdm.config import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _run(load_config(json.loads(cfg_json)), toy_dir, steps, start_dir, save_dir)
        if rank == 0:
            torch.save(result, out)   # test-harness result of a trusted child process, not a checkpoint
    finally:
        dist.destroy_process_group()


def _spawn(world, cfg, toy_dir, steps, tmp_path, start_dir=None, save_dir=None):
    out = tmp_path / f"result-{world}-{steps}-{os.urandom(4).hex()}.pt"
    mp.start_processes(_worker, args=(world, _free_port(), cfg.model_dump_json(), str(toy_dir), steps,
                                      start_dir and str(start_dir), save_dir and str(save_dir), str(out)),
                       nprocs=world, join=True, start_method="spawn")
    return torch.load(out, weights_only=False)


def _merge_rank_dirs(save_dir: Path, into: Path) -> Path:
    """What Ray Train does with the ranks' checkpoint directories: merge them into one."""
    import shutil

    into.mkdir()
    for rank_dir in sorted(save_dir.iterdir()):
        shutil.copytree(rank_dir, into, dirs_exist_ok=True)
    return into


def _close(a, b, tol=1e-4):
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_shard_units_are_the_blocks_of_each_family(tiny_toy_dir, tmp_path):
    from tdm.backbones import load_backbone
    from tdm.testing import build_tiny_pixart, build_tiny_wan

    unet = load_backbone(tiny_toy_dir).network
    units = shard_units(unet)
    assert {id(u) for u in units} == {id(u) for u in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]}
    assert len(units) == len(unet.down_blocks) + len(unet.up_blocks) + 1
    dit = load_backbone(build_tiny_pixart(tmp_path / "pixart")).network
    assert shard_units(dit) == list(dit.transformer_blocks)
    wan = load_backbone(build_tiny_wan(tmp_path / "wan")).network
    assert shard_units(wan) == list(wan.blocks)


def test_split_and_join_a_state_round_trip():
    state = {"step": 3, "student": {"w": torch.ones(2)}, "fake": {"w": torch.zeros(2)},
             "opt_student": {"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}},
                             "param_groups": [{"lr": 0.1, "params": [0]}]},
             "opt_fake": {"state": {}, "param_groups": []}, "ema": {"decay": 0.9, "shadow": [torch.ones(2)]},
             "rng": {"torch": torch.arange(3)}}
    rest, tensors = split_state(state)
    assert set(tensors) == {"student/w", "fake/w", "opt_student/state/0/exp_avg", "opt_student/state/0/step",
                            "ema/shadow/0"}
    assert rest["sharded"]["ema"] == {"decay": 0.9, "shadow": [{"$shard": "ema/shadow/0"}]}
    assert torch.equal(rest["rng"]["torch"], torch.arange(3))                  # not sharded: stays with rank 0
    back = join_state(rest, tensors)
    assert back.keys() == state.keys() and back["opt_student"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert flatten(back) == flatten(state)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_sharded_checkpoint_resumes_on_one_and_on_two_workers(finetune, tiny_toy_dir, tmp_path, monkeypatch):
    cfg = _config(finetune, "fsdp")
    straight = _run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"strategy": "ddp"})}),
                    tiny_toy_dir, 2 * STEPS)   # one unsharded process: the same maths (module docstring)
    _spawn(2, cfg, tiny_toy_dir, STEPS, tmp_path, save_dir=tmp_path / "save2")
    ckpt = _merge_rank_dirs(tmp_path / "save2", tmp_path / "ckpt")
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    # one safetensors shard per rank, the JSON tree and rank 0's small tensors: no pickle, no DCP .metadata
    assert [f for f in files if f.startswith(SHARD_DIR)] == [f"{SHARD_DIR}/shard-00001-model-00001-of-00001."
                                                             "safetensors", f"{SHARD_DIR}/shard-00002-model-"
                                                             "00001-of-00001.safetensors"]
    assert set(files) - {f for f in files if f.startswith(SHARD_DIR)} == {"state.json", "state.safetensors"}
    resumed2 = _spawn(2, cfg, tiny_toy_dir, STEPS, tmp_path, start_dir=ckpt)            # 2 -> 2
    resumed1 = _spawn(1, cfg, tiny_toy_dir, STEPS, tmp_path, start_dir=ckpt)            # 2 -> 1: reshards
    for curve, w, _, _ in (resumed2, resumed1):
        assert _close(curve, straight[0][STEPS:]), (curve, straight[0][STEPS:])
        assert _update_gap(w, straight[1], straight[3]) < 1e-3
    # 1 -> 2: a checkpoint written by one worker resumes on two
    _spawn(1, cfg, tiny_toy_dir, STEPS, tmp_path, save_dir=tmp_path / "save1")
    ckpt1 = _merge_rank_dirs(tmp_path / "save1", tmp_path / "ckpt1")
    curve, _, _, _ = _spawn(2, cfg, tiny_toy_dir, STEPS, tmp_path, start_dir=ckpt1)
    assert _close(curve, straight[0][STEPS:])

    # the driver's export reads the EMA student out of the shards without a process group and without pickle
    from tdm.backbones import load_backbone
    from tdm.train import load_state_file, student_from_state

    mid = straight[2][STEPS - 1]   # the uninterrupted run's EMA at step STEPS

    def no_pickle(*_a, **_k):
        raise AssertionError("a sharded checkpoint was unpickled")
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    saved = load_state_file(ckpt)
    student = student_from_state(cfg, load_backbone(tiny_toy_dir), saved, ckpt)
    # the trained parameters, in the EMA's order (a full student is frozen for sampling: all of its parameters)
    got = [p.detach() for p in (student.parameters() if finetune == "full" else student.trainable_parameters())]
    assert saved["step"] == STEPS and len(got) == len(mid)
    assert max((a - b).abs().max().item() for a, b in zip(got, mid)) < 1e-5


def test_fsdp_with_selective_checkpointing_and_accumulation(tiny_toy_dir, tmp_path):
    """Options that change memory and schedule, not the maths: activation checkpointing of every second block
    (recomputed inside the block's all-gather) and 2 accumulated micro-batches (FSDP reduce-scatters only on
    the last) give the unsharded run's losses and update. (CPU offload needs a GPU: the config refuses it on
    CPU, tests/test_config.py.)"""
    options = {"gradient_checkpointing": True, "gradient_checkpointing_every": 2, "grad_accum_steps": 2}
    ref_curve, ref_w, _, initial = _run(_config("full", "ddp", **options), tiny_toy_dir, STEPS)
    curve, w, _, _ = _spawn(2, _config("full", "fsdp", **options), tiny_toy_dir, STEPS, tmp_path)
    assert _close(curve, ref_curve), (curve, ref_curve)
    assert _update_gap(w, ref_w, initial) < 1e-3


@pytest.mark.parametrize("family,finetune", [("wan", "lora"), ("wan", "full"), ("flux", "lora")])
def test_the_flow_families_train_sharded_as_one_process(family, finetune, tmp_path):
    """Wan (the 14B preset's adapter, on a tiny video geometry) and FLUX.1-dev with its guidance embedded train
    under FSDP on 2 gloo workers as one unsharded process does: same losses, same update (module docstring)."""
    from tdm.testing import build_tiny_flux, build_tiny_wan

    if family == "wan":
        path = build_tiny_wan(tmp_path / "wan")
        extra = {"video": {"frames": 5, "height": 32, "width": 32, "fps": 8.0}}
    else:
        path = build_tiny_flux(tmp_path / "flux")
        extra = {"loss": {"teacher_guidance": "embedded", "guidance_scale": 3.5}}
    extra.update(teacher={"uri": str(path)}, eval={"enabled": False})
    cfg = _config(finetune, "fsdp", targets=("to_q", "to_k", "to_v", "to_out.0"), extra=extra)
    ref_curve, ref_w, _, initial = _run(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"strategy": "ddp"})}), path, STEPS)
    curve, w, _, _ = _spawn(2, cfg, path, STEPS, tmp_path)
    assert _close(curve, ref_curve), (curve, ref_curve)
    assert _update_gap(w, ref_w, initial) < 1e-3
