"""Shared fixtures: tiny models built from configs (no downloads), an isolated TDM_HOME/MLflow store,
and one Ray cluster per test session."""
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")       # Ray 2.60 enables token auth by default; be explicit
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")             # nothing may download
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tdm_home(tmp_path_factory):
    """A private $TDM_HOME (MLflow store, checkpoints, caches) for the whole session."""
    home = tmp_path_factory.mktemp("tdm_home")
    os.environ["TDM_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home


def _restore_mlflow_uri():
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)     # None unsets both


# mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which tdm.run and the Ray tasks it starts read: a test
# (or a module fixture) that points mlflow at its own server must not leave the rest of the session there.
@pytest.fixture(scope="module", autouse=True)
def _keep_mlflow_uri_per_module():
    yield from _restore_mlflow_uri()


@pytest.fixture(autouse=True)
def _keep_mlflow_uri_per_test():
    yield from _restore_mlflow_uri()


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory):
    """The toy pipeline architecture at minimum width, random weights, saved in diffusers layout."""
    from tdm.testing import build_tiny_toy

    return build_tiny_toy(tmp_path_factory.mktemp("tiny_toy"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random-weight Stable Diffusion 1.5-shaped pipeline (UNet + VAE + CLIP), saved with save_pretrained."""
    from tdm.testing import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on localhost, with bucket 'tdm-test'."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="tdm-test")
    yield env
    server.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RAY: dict = {}


@pytest.fixture(scope="session")
def ray_cluster(tdm_home, s3_server, tmp_path_factory):
    """One local Ray cluster for every test that needs one (4 logical CPUs on a 2-core machine), started
    as a KubeRay head is, with `ray start --head`: it runs the dashboard and its agent, where the
    job-submission and Serve REST APIs that KubeRay drives live (fixture `ray_dashboard`). Every port is
    a free one, so a cluster already running on this machine is left alone (and `ray stop`, which would
    stop it too, is never called). Workers see the session's TDM_HOME and the S3 endpoint."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    import ray

    gcs, dashboard = free_port(), free_port()
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    # Its own temp dir (short: Ray's Unix socket paths live there), so the head does not become "the most
    # recent local cluster" in /tmp/ray/ray_current_cluster, where a later plain ray.init() on this
    # machine (python pipelines/distill.py, a benchmark) would look for it after the session killed it.
    temp_dir = tempfile.mkdtemp(prefix="tdm-ray-")
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "4",
            "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"]
    # As in the image, `python` (job entrypoints run through a shell) is this environment's interpreter.
    head_env = {**os.environ, "TDM_HOME": str(tdm_home),
                "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "wb") as out:   # its own process group: the head and every process it starts go with it
        head = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=head_env)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/gcs_healthz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"ray start --head did not come up:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    env = {"TDM_HOME": str(tdm_home), "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "HF_HUB_OFFLINE": "1",
           **s3_server}
    ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False, runtime_env={"env_vars": env})
    _RAY["dashboard"] = url
    yield ray
    ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)      # ray start --block stops the node's processes on SIGTERM
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything left in the group
    except ProcessLookupError:
        pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_dashboard(ray_cluster):
    """http://127.0.0.1:<port> of the session cluster's dashboard (`ray job submit --address`, Serve REST)."""
    return _RAY["dashboard"]


#: A distillation small enough for CI: tiny toy teacher, 2 CPU workers, a handful of steps.
TINY_RUN = {
    "toy": {"train_steps": 40, "channels": [8, 16], "batch_size": 32},
    "train": {"max_steps": 6, "batch_size": 8, "num_workers": 2, "cpus_per_worker": 1, "checkpoint_every": 3,
              "sample_every": 3, "log_every": 2, "system_metrics_interval_s": 1},
    "eval": {"num_samples": 60, "teacher_steps": 5, "batch_size": 60},
}


def tiny_config(**sections):
    """TINY_RUN with sections merged in (one level deep)."""
    from tdm.config import load_config

    data = {k: dict(v) for k, v in TINY_RUN.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return load_config(data)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1:<port> (SQLite store, artifacts proxied by the server) that a test
    can stop and start again on the same port and store: a tracking-server outage."""

    def __init__(self, root, port: int | None = None):
        from pathlib import Path

        self.root, self.port = Path(root), port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "mlflow-server.log"
        self.proc = None

    def start(self, timeout_s: float = 180) -> "MlflowServer":
        import subprocess
        import sys

        from k8s_helpers import wait_for_health

        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination", str(self.root / "artifacts")]
        with open(self.log, "ab") as out:   # its own process group: its workers stop with it
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.root)
        wait_for_health(self.uri, self.proc, self.log, timeout_s)
        return self

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)   # an outage, not a shutdown: nothing is drained
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
