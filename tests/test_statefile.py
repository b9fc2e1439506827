"""Checkpoints without pickle (tdm.statefile): the full training state round-trips through safetensors
and JSON, and a planted pickle (a checkpoint, a state file posing as safetensors, a model's weights) is
refused by resume, by register.py and by model loading, with nothing in it run."""
import json
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import run_distill

from tdm.statefile import LEGACY_PICKLE_FILE, TENSORS_FILE, TREE_FILE, CheckpointFormatError, load_state, save_state

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """A pickle that runs code when loaded: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"step": 1, "student": Payload(marker)}))


def test_the_full_state_round_trips_exactly(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 0.5)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = {
        "step": 7, "lr": float("inf"), "none": None, "flag": True, "name": "run",
        "net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
        "mixed": {"bf16": torch.ones(2, dtype=torch.bfloat16), "bool": torch.tensor([True, False]),
                  "scalar": torch.tensor(3.5), "ints": {1: (2, 3), 4: [torch.arange(3)]}, "$odd": 1},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TENSORS_FILE, TREE_FILE])
    back = load_state(tmp_path)
    assert back["step"] == 7 and back["lr"] == float("inf") and back["none"] is None and back["flag"] is True
    assert back["mixed"]["bf16"].dtype == torch.bfloat16 and back["mixed"]["scalar"].ndim == 0
    assert back["mixed"]["ints"][1] == (2, 3) and torch.equal(back["mixed"]["ints"][4][0], torch.arange(3))
    assert back["mixed"]["$odd"] == 1
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert set(back["opt"]["state"]) == {0, 1}          # int keys stay ints
    saved = opt.state_dict()["state"][0]
    assert all(torch.equal(back["opt"]["state"][0][k], v) for k, v in saved.items())
    assert back["sched"] == sched.state_dict()
    # the RNG states restore the same streams
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.set_rng_state(back["rng"]["torch"])
    np.random.set_state(back["rng"]["numpy"])
    random.setstate(back["rng"]["python"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    # and an optimizer loads it
    opt2 = torch.optim.AdamW(net.parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.99)


def test_what_cannot_be_stored_without_pickle_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="opt/hook: a function cannot be stored without pickle"):
        save_state(tmp_path, {"opt": {"hook": lambda: None}})


def test_a_pickle_checkpoint_is_refused_and_nothing_in_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint_0000010"
    ckpt.mkdir()
    plant_pickle(ckpt / LEGACY_PICKLE_FILE, marker)
    with pytest.raises(CheckpointFormatError, match="state.pt is a pickle checkpoint"):
        load_state(ckpt)
    # a pickle posing as the safetensors file, beside a valid JSON tree
    (ckpt / TREE_FILE).write_text(json.dumps({"step": 1, "w": {"$tensor": "w"}}))
    plant_pickle(ckpt / TENSORS_FILE, marker)
    with pytest.raises(CheckpointFormatError, match="not a safetensors file"):
        load_state(ckpt)
    (ckpt / TREE_FILE).write_bytes(b"\x80\x04not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        load_state(ckpt)
    assert not marker.exists()


def _one_line_exit_2(proc, words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_register_refuses_a_pickle_checkpoint(tmp_path, tdm_home):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint_0000010"
    ckpt.mkdir()
    plant_pickle(ckpt / LEGACY_PICKLE_FILE, marker)
    (ckpt / "meta.json").write_text(json.dumps({"step": 10, "config": {}}))
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "register.py"), "--checkpoint", str(ckpt)],
                          capture_output=True, text=True, timeout=120)
    _one_line_exit_2(proc, "--checkpoint: ")
    assert "pickle checkpoint" in proc.stderr and not marker.exists()


def test_resume_refuses_a_pickle_checkpoint_before_any_work(tmp_path, tdm_home):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "runs" / "planted" / "checkpoint_0000010"
    ckpt.mkdir(parents=True)
    plant_pickle(ckpt / LEGACY_PICKLE_FILE, marker)
    proc = run_distill(tmp_path, "--name", "planted", "--train.storage_path", str(tmp_path / "runs"))
    _one_line_exit_2(proc, "train.storage_path: ")
    assert "pickle checkpoint" in proc.stderr and not marker.exists()


def test_a_model_whose_weights_are_a_pickle_is_refused(tmp_path, tiny_toy_dir):
    from tdm.backbones import load_backbone

    marker = tmp_path / "pwned"
    toy = tmp_path / "toy"
    shutil.copytree(tiny_toy_dir, toy)
    for f in (toy / "unet").glob("*.safetensors"):
        f.unlink()
    plant_pickle(toy / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(OSError, match="safetensors"):
        load_backbone(toy)
    assert not marker.exists()
