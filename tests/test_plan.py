"""The memory planner (tdm.plan, `pipelines/distill.py --plan`): its terms by hand, and the refusal of a plan
that does not fit train.gpu_memory_gb. bench/bench_fsdp.py compares it with measured peaks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tdm.config import load_config
from tdm.errors import ConfigError
from tdm.plan import NetworkStats, lora_params, plan_memory

ROOT = Path(__file__).resolve().parents[1]


class _Net(nn.Module):
    """Two blocks of Linear(4, 4) (20 parameters each) and a root Linear(4, 2) (10)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))])
        self.proj_out = nn.Linear(4, 2)
        self.config = {"num_attention_heads": 2, "attention_head_dim": 3, "patch_size": 2}


def test_network_stats_count_blocks_and_root_on_the_meta_device():
    with torch.device("meta"):
        net = _Net()
    net.config = type("C", (), net.config)
    s = NetworkStats.of(net, (4, 8, 8))
    assert (s.params, s.largest_unit, s.root, s.blocks) == (50, 20, 10, 2)
    assert (s.tokens, s.width) == (8 * 8 // 4, 6)


def test_families_without_a_sample_size_are_planned_at_their_release_tokens():
    """FLUX.1 (packed by its pipeline, patch 1), Qwen-Image (packed, patch 2 in its config) and Z-Image
    (patchified inside, no patch_size key) all read 4096 tokens at 1024x1024; a UNet keeps its sample size."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel

    from tdm.plan import config_tokens

    with torch.device("meta"):
        nets = [FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4)),
                QwenImageTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                            joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
                ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                         n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                         axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])]
    assert [NetworkStats.of(n, config_tokens(n)).tokens for n in nets] == [4096, 4096, 4096]


def test_lora_parameters_by_hand():
    net = nn.Module()
    net.attn = nn.Module()
    net.attn.to_q = nn.Linear(8, 16)
    net.attn.to_k = nn.Linear(8, 16)
    net.conv1 = nn.Conv2d(3, 5, 3)
    assert lora_params(net, 4, ["to_q"]) == 4 * (8 + 16)
    assert lora_params(net, 2, ["to_q", "to_k", "conv1"]) == 2 * 24 * 2 + 2 * (3 * 9 + 5)


def test_plan_terms_by_hand():
    stats = NetworkStats(params=1000, largest_unit=100, root=50, blocks=4, tokens=10, width=8)
    ddp = plan_memory(stats, finetune="full", lora=0, strategy="ddp", workers=1, frozen_bytes=4, compute_bytes=4,
                      ema=True, micro_batch=2, checkpointing=False, checkpoint_every=1)
    act = 4 * 10 * 2 * 8 * 34 * 4 / 2
    assert dict(ddp.rows) == {"teacher": 4000, "student (weights, grads, Adam)": 16000,
                              "fake score (weights, grads, Adam)": 16000, "student EMA": 4000,
                              "activations (one trained pass)": act}
    fsdp = plan_memory(stats, finetune="full", lora=0, strategy="fsdp", workers=2, frozen_bytes=4, compute_bytes=4,
                       ema=True, micro_batch=2, checkpointing=False, checkpoint_every=1)
    rows = dict(fsdp.rows)
    assert rows["student (weights, grads, Adam)"] == 8000 and rows["teacher"] == 2000
    assert rows["FSDP all-gather working set"] == 2 * 100 * 4 + 50 * 4 + 4 * 100
    two_ddp = dict(plan_memory(stats, finetune="full", lora=0, strategy="ddp", workers=2, frozen_bytes=4,
                               compute_bytes=4, ema=True, micro_batch=2, checkpointing=False,
                               checkpoint_every=1).rows)
    assert two_ddp["DDP gradient buckets"] == 8000 and two_ddp["student (weights, grads, Adam)"] == 16000
    lora = dict(plan_memory(stats, finetune="lora", lora=10, strategy="ddp", workers=1, frozen_bytes=2,
                            compute_bytes=2, ema=False, micro_batch=2, checkpointing=True, checkpoint_every=2).rows)
    assert lora["teacher (shared LoRA base)"] == 2000 and lora["student (weights, grads, Adam)"] == 160
    per_block = 10 * 2 * 8 * 34 * 2 / 2
    assert lora["activations (one trained pass)"] == 2 * per_block + 2 * 10 * 2 * 8 * 2 + per_block


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    from tdm.testing import build_tiny_pixart

    return build_tiny_pixart(tmp_path_factory.mktemp("plan"), layers=4, heads=4, head_dim=16)


def test_a_plan_that_does_not_fit_is_refused_naming_what_would(pixart_dir):
    from tdm.preflight import memory_plan
    from tdm.teacher import resolve_teacher

    data = {"teacher": {"uri": str(pixart_dir)}, "data": {"prompts": ["a"]}, "eval": {"enabled": False},
            "train": {"num_workers": 4, "batch_size": 4}}
    teacher = resolve_teacher(str(pixart_dir))
    ddp = memory_plan(load_config(data), teacher)
    fsdp = memory_plan(load_config({**data, "train": {**data["train"], "strategy": "fsdp"}}), teacher)
    assert fsdp.total < 0.5 * ddp.total
    budget = (fsdp.total + ddp.total) / 2 / 1024 ** 3
    with pytest.raises(ConfigError, match=r"^train.gpu_memory_gb: this plan needs .* per worker, .* given; fits with "
                                          r".*--train.strategy fsdp \("):
        memory_plan(load_config({**data, "train": {**data["train"], "gpu_memory_gb": budget}}), teacher)


def test_plan_flag_prints_the_table_and_fails_one_line_when_it_cannot_fit(pixart_dir, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TDM_HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "pipelines" / "distill.py"), "--plan", "--teacher.uri", str(pixart_dir),
            "--data.prompts", "a", "--eval.enabled", "false"]
    ok = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "estimated memory per worker (ddp, 1 worker(s), full" in ok.stdout and "total per worker" in ok.stdout
    bad = subprocess.run([*base, "--train.gpu_memory_gb", "0.0001"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "total per worker" in bad.stdout
    assert bad.stderr.strip().splitlines()[-1].startswith("distill.py: error: train.gpu_memory_gb: this plan needs")
    assert "Traceback" not in bad.stderr
