"""FSDP2 through Ray Train on the session's local Ray cluster, 2 CPU workers over gloo: the loss curve of
DDP, a sharded checkpoint resumed on another worker count, a SIGKILLed worker, and the export of a sharded
student (docs/scaling.md).

Tolerance of the FSDP-vs-DDP comparison: relative 1e-3 on every logged loss. The two strategies compute the
same maths on the same data (each rank's draws depend only on seed, step and rank); they differ in float32
summation order (FSDP reduce-scatters each block and sums the gradient norm over shards, DDP all-reduces
buckets), and Adam's division by the root of the second moment lets such differences grow over a few steps
(tests/test_sharding.py measures the same gap below Ray)."""
from pathlib import Path

import pytest
from conftest import tiny_config
from mlflow import MlflowClient
from test_fault_tolerance import committed_steps, kill_a_worker_once, loss_curve

NO_EVAL = {"enabled": False}
LORA = {"finetune": "lora", "lora_rank": 4, "lora_targets": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}


def _config(name, strategy, student=None, **train):
    base = {"max_steps": 6, "checkpoint_every": 3, "sample_every": 6, "log_every": 1, "strategy": strategy}
    return tiny_config(name=name, train=base | train, eval=NO_EVAL, student={"num_steps": 2, "step_set": [1, 2]}
                       | (student or {}), optim={"grad_clip": 1.0, "eps": 1e-3})


def _close_curves(a: dict, b: dict, rtol=1e-3) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[s] - b[s]) <= rtol * max(1.0, abs(b[s])) for s in b)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fsdp_matches_ddp_and_exports_from_its_shards(ray_cluster, tdm_home, finetune):
    from tdm.job import distill

    student = LORA if finetune == "lora" else None
    ddp = distill(_config(f"fsdp-parity-ddp-{finetune}", "ddp", student))
    fsdp = distill(_config(f"fsdp-parity-fsdp-{finetune}", "fsdp", student))
    assert fsdp["step"] == ddp["step"] == 6
    for key in ("train/loss_student", "train/loss_fake", "train/grad_norm_student"):
        a, b = loss_curve(fsdp["run_id"], key), loss_curve(ddp["run_id"], key)
        assert _close_curves(a, b), (key, a, b)
    # the checkpoint: one safetensors shard per worker next to rank 0's JSON state
    storage = Path(tdm_home) / "runs" / f"fsdp-parity-fsdp-{finetune}"
    last = sorted(storage.glob("checkpoint_0*"))[-1]
    assert sorted(p.name for p in (last / "shards").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not list(last.rglob("*.metadata")) and not list(last.rglob("*.pt"))
    # the registered student, read from those shards by the export task, loads and samples like DDP's
    client = MlflowClient()
    run = client.get_run(fsdp["run_id"])
    assert run.info.status == "FINISHED" and "tdm.failure" not in run.data.tags
    import io

    import mlflow
    import numpy as np
    from PIL import Image

    def sample(result):
        model = mlflow.pyfunc.load_model(f"models:/tdm-student/{result['model_version']}")
        png = model.predict({"prompt": ["a handwritten digit 3"]}, params={"seed": 1})[0]
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64)

    # 8-bit images of weights that differ by float32 summation order: equal up to rounding at the last level
    assert np.abs(sample(fsdp) - sample(ddp)).max() <= 2


def test_fsdp_resumes_a_two_worker_checkpoint_on_one_worker(ray_cluster, tdm_home):
    from tdm.job import distill

    first = distill(_config("fsdp-reshard", "fsdp"))
    assert first["step"] == 6
    resumed = distill(_config("fsdp-reshard", "fsdp", max_steps=9, num_workers=1, batch_size=8))
    client = MlflowClient()
    assert resumed["run_id"] == first["run_id"] and resumed["step"] == 9
    assert client.get_metric_history(resumed["run_id"], "train/resumed_from")[-1].value == 6
    assert sorted(loss_curve(resumed["run_id"])) == list(range(1, 10))
    last = sorted((Path(tdm_home) / "runs" / "fsdp-reshard").glob("checkpoint_0*"))[-1]
    assert [p.name for p in (last / "shards").iterdir()] == ["shard-00001-model-00001-of-00001.safetensors"]


def test_fsdp_sigkilled_worker_resumes_to_the_exact_final_step(ray_cluster, tdm_home):
    from tdm.job import distill

    long = {"max_steps": 18, "checkpoint_every": 3, "sample_every": 100}
    reference = distill(_config("fsdp-ft-reference", "fsdp", **long))
    killed: dict = {}
    thread = kill_a_worker_once(killed, "fsdp-ft-killed", 6)
    out = distill(_config("fsdp-ft-killed", "fsdp", **long))
    thread.join(timeout=5)
    assert "pid" in killed, "the worker was never killed"
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tdm").experiment_id],
                              filter_string="tags.`tdm.run_name` = 'fsdp-ft-killed'")
    assert len(runs) == 1 and out["step"] == 18
    resumed = client.get_metric_history(out["run_id"], "train/resumed_from")
    assert resumed and 3 <= resumed[-1].value <= killed["at"] + 3
    assert committed_steps(Path(tdm_home) / "runs" / "fsdp-ft-killed")[-1] == 18
    curve, ref = loss_curve(out["run_id"]), loss_curve(reference["run_id"])
    assert sorted(curve) == list(range(1, 19))
    # the full state, shards included, is restored: the resumed curve is the uninterrupted one, bit for bit
    assert max(abs(curve[s] - ref[s]) for s in ref) == 0.0
