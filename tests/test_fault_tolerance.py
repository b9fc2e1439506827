"""Fault tolerance on a local Ray cluster with 2 CPU workers: a SIGKILLed worker, a stopped driver,
S3 checkpoints on a real S3-compatible server, and fast failures for storage and placement problems."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_config
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
NO_EVAL = {"enabled": False}
FT_TRAIN = {"max_steps": 24, "checkpoint_every": 4, "sample_every": 100, "log_every": 1}


def ft_config(name, **train):
    return tiny_config(name=name, train=FT_TRAIN | train, eval=NO_EVAL)


def loss_curve(run_id, key="train/loss_student"):
    """step -> last logged value (a resumed run logs the steps after its last checkpoint again)."""
    history = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def wait_for(predicate, timeout, interval=0.5):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


def committed_steps(storage: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has committed to its run snapshot (what a resume sees)."""
    try:
        snap = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [int(c["checkpoint_dir_name"][-7:]) for c in snap["checkpoint_results"]]


def train_worker_pids():
    """PIDs of the live Ray Train workers of the session's cluster, from Ray's state API: a process
    listing would also find the workers of any other Ray cluster on this machine, and kill them."""
    import ray
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def kill_a_worker_once(killed: dict, run_name: str, after_step: int) -> threading.Thread:
    """A started thread that SIGKILLs one Ray Train worker once run `run_name` has a checkpoint at or past
    `after_step`; it records the worker's pid and that step in `killed`."""
    from tdm.tracking import find_run, get_or_create_experiment

    def killer():
        exp = get_or_create_experiment("tdm")

        def progressed():
            run = find_run(exp, run_name)
            return run is not None and run.data.metrics.get("checkpoint/step", 0) >= after_step
        if wait_for(progressed, 300):
            killed["pid"] = max(train_worker_pids())
            killed["at"] = find_run(exp, run_name).data.metrics["checkpoint/step"]
            os.kill(killed["pid"], signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def reference(ray_cluster):
    """The uninterrupted run every interrupted one is compared with."""
    from tdm.job import distill

    return distill(ft_config("ft-reference"))


def test_sigkilled_worker_resumes_from_last_checkpoint(ray_cluster, reference, tdm_home):
    from tdm.job import distill

    killed: dict = {}
    thread = kill_a_worker_once(killed, "ft-killed", 8)
    out = distill(ft_config("ft-killed"))
    thread.join(timeout=5)
    assert "pid" in killed, "the worker was never killed"
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tdm").experiment_id],
                              filter_string="tags.`tdm.run_name` = 'ft-killed'")
    assert len(runs) == 1                                                     # one MLflow run
    resumed = client.get_metric_history(out["run_id"], "train/resumed_from")
    assert resumed and 4 <= resumed[-1].value <= killed["at"] + 4             # from a checkpoint, not step 0
    assert out["step"] == 24                                                  # exactly the requested step
    curve, ref = loss_curve(out["run_id"]), loss_curve(reference["run_id"])
    assert sorted(curve) == list(range(1, 25))
    # deterministic mode: counter-based RNG + full state -> the resumed curve is bit-identical
    assert max(abs(curve[s] - ref[s]) for s in ref) == 0.0


def test_driver_stopped_and_rerun_continues(ray_cluster, reference, tmp_path):
    import ray

    address = ray.get_runtime_context().gcs_address
    cfg = ft_config("ft-driver").model_dump(mode="json")
    cfg["train"]["ray_address"] = address
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(ROOT / "pipelines" / "distill.py"), "--config", str(cfg_file)]
    storage = Path(os.environ["TDM_HOME"]) / "runs" / "ft-driver"
    first = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:  # stop the driver once Ray Train has committed a checkpoint at step >= 8
        assert wait_for(lambda: max(committed_steps(storage), default=0) >= 8, 300)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    stopped_at = max(committed_steps(storage))
    assert stopped_at < 24
    second = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tdm").experiment_id],
                              filter_string="tags.`tdm.run_name` = 'ft-driver'")
    assert len(runs) == 1
    resumed = client.get_metric_history(runs[0].info.run_id, "train/resumed_from")
    assert resumed and resumed[-1].value >= stopped_at    # never from step 0
    curve = loss_curve(runs[0].info.run_id)
    assert max(curve) == 24
    ref = loss_curve(reference["run_id"])
    assert max(abs(curve[s] - ref[s]) for s in ref) == 0.0


#: long enough that training goes on after a 20-second outage that starts at step 10 (2 CPU workers); a
#: multiple of the checkpoint (10) and sample (20) intervals, so the last step adds no extra record
OUTAGE_STEPS = 160
OUTAGE_S = 20


def test_an_mlflow_outage_mid_run_loses_no_metric_and_restarts_no_worker(ray_cluster, tiny_toy_dir, tmp_path):
    """The tracking server is killed for OUTAGE_S seconds in the middle of a real Ray Train run, then started again on
    the same store: training goes on meanwhile, every write arrives, and no worker is restarted."""
    import mlflow
    from conftest import MlflowServer

    from tdm.job import distill
    from tdm.tracking import find_run

    server = MlflowServer(tmp_path / "mlflow").start()
    os.environ["MLFLOW_TRACKING_URI"] = server.uri      # restored after the test (conftest)
    mlflow.set_tracking_uri(server.uri)
    cfg = tiny_config(name="ft-outage", teacher={"uri": str(tiny_toy_dir)}, eval=NO_EVAL,
                      data={"prompts": [f"a handwritten digit {d}" for d in range(10)]},
                      train=FT_TRAIN | {"max_steps": OUTAGE_STEPS, "checkpoint_every": 10, "sample_every": 20})
    outage: dict = {}

    def stop_for_a_while():
        client = MlflowClient(server.uri)

        def at_step_10():
            exp = client.get_experiment_by_name("tdm")
            run = find_run(exp.experiment_id, "ft-outage") if exp else None
            return run is not None and run.data.metrics.get("checkpoint/step", 0) >= 10
        if wait_for(at_step_10, 300):
            server.stop()
            outage["down"] = time.time()
            time.sleep(OUTAGE_S)
            outage["up"] = time.time()
            server.start()

    thread = threading.Thread(target=stop_for_a_while, daemon=True)
    thread.start()
    try:
        out = distill(cfg)
        thread.join(timeout=300)
        assert "up" in outage, "the server was never stopped"
        client = MlflowClient(server.uri)
        run = client.get_run(out["run_id"])
        assert run.info.status == "FINISHED" and "tdm.failure" not in run.data.tags
        # every metric of every step, once: a restarted worker group would log steps again (and resumed_from)
        keys = [k for k in run.data.metrics if k.startswith("train/")]
        assert "train/loss_student" in keys and "train/resumed_from" not in keys
        for key in keys:
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == \
                list(range(1, OUTAGE_STEPS + 1)), key
        stamps = [m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "train/loss_student")]
        assert any(outage["down"] < t < outage["up"] for t in stamps)   # trained while the server was down
        # the checkpoint records and sample grids of the outage arrived too
        records = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
        assert records == [f"checkpoints/step_{s:07d}.json" for s in range(10, OUTAGE_STEPS + 1, 10)]
        assert run.data.tags["tdm.last_checkpoint"].endswith(f"checkpoint_{OUTAGE_STEPS:07d}")
        # one grid per sample step and step count (by name: images/<key>+step+<n>+timestamp+...png)
        grids = {tuple(a.path.removeprefix("images/").split("+")[:3:2]) for a in
                 client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")}
        assert grids == {(f"samples_K{k}", str(s)) for k in cfg.student.steps
                         for s in range(20, OUTAGE_STEPS + 1, 20)}
        assert client.get_model_version(cfg.registry.model_name, out["model_version"]).run_id == run.info.run_id
        assert not (Path(os.environ["TDM_HOME"]) / "runs" / "ft-outage" / "tracking-backlog").exists()
    finally:
        server.stop()


def test_s3_checkpoints_on_a_real_s3_server(ray_cluster, s3_server):
    import boto3

    from tdm.job import distill, register_checkpoint

    out = distill(ft_config("ft-s3", max_steps=8, storage_path="s3://tdm-test/runs"))
    assert out["step"] == 8
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="tdm-test", Prefix="runs/ft-s3/")["Contents"]]
    assert {"state.json", "state.safetensors"} <= {k.rsplit("/", 1)[1] for k in keys if "checkpoint_0000008/" in k}
    # resume from S3: a longer run with the same name continues from step 8
    out = distill(ft_config("ft-s3", max_steps=12, storage_path="s3://tdm-test/runs"))
    assert out["step"] == 12
    resumed = MlflowClient().get_metric_history(out["run_id"], "train/resumed_from")
    assert [m.value for m in resumed] == [8.0]
    # and any checkpoint can be registered from its URI
    reg = register_checkpoint("s3://tdm-test/runs/ft-s3/checkpoint_0000008")
    assert reg["step"] == 8


def test_unreachable_s3_endpoint_fails_fast(tmp_path):
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9", TDM_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "distill.py"),
                           "--train.storage_path", "s3://tdm-test/runs"], env=env, capture_output=True, text=True,
                          timeout=120)
    # fast: refused by the preflight, before Ray or the toy teacher (whose first lines the job would print)
    assert proc.returncode == 2 and "[tdm] run " not in proc.stdout and "teacher" not in proc.stdout
    assert "train.storage_path: cannot write to s3://tdm-test/runs" in proc.stderr


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write to: chmod 555, or for root (which ignores modes) the
    immutable attribute."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    else:
        os.chmod(locked, 0o555)
    yield locked
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    else:
        os.chmod(locked, 0o755)


def test_storage_without_write_permission_fails_fast(tmp_path, read_only_dir):
    env = dict(os.environ, TDM_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "distill.py"), "--train.storage_path",
                           str(read_only_dir / "runs")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "[tdm] run " not in proc.stdout and "teacher" not in proc.stdout, proc.stderr
    assert f"train.storage_path: cannot write to {read_only_dir / 'runs'}" in proc.stderr


def test_unplaceable_worker_group_fails_fast(ray_cluster):
    from tdm.errors import ConfigError
    from tdm.job import distill
    from tdm.tracking import find_run, get_or_create_experiment

    with pytest.raises(ConfigError, match="train.num_workers=16 needs 16 CPUs"):
        distill(tiny_config(name="ft-too-big", train={"num_workers": 16, "batch_size": 16, "cpus_per_worker": 1}))
    # fast: refused before the MLflow run (and any training) exists
    assert find_run(get_or_create_experiment("tdm"), "ft-too-big") is None
