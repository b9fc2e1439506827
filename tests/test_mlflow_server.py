"""The chart's MLflow server, for real: the command line, arguments and environment of the MLflow
Deployment rendered by Helm's engine, with $(VAR) references and secretKeyRefs resolved as the kubelet
resolves them, run as a process against a real PostgreSQL (pgserver) and an S3-compatible server (moto);
then a tiny distillation through Ray Train logs to it, and the student comes back out of the registry."""
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import helm_python as helm
import pytest
import yaml

from conftest import tiny_config
from test_chart import CHART, NAMESPACE, RELEASE, env_of, one

BUCKET, PREFIX = "tdm-test", "mlflow-store"
MODEL = "tdm-student-pg"
PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]
START_TIMEOUT_S = 180      # migrations on an empty database plus two workers importing mlflow, on 2 busy cores

pytestmark = [pytest.mark.slow,
              # pgserver asks platformdirs for a runtime dir on import; no XDG_RUNTIME_DIR here is fine
              pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set")]


class Server(NamedTuple):
    uri: str                 # http://127.0.0.1:<port>
    argv: list[str]          # the command line it runs, references expanded
    env: dict[str, str]      # the container environment the chart gives it
    log: Path                # its stdout and stderr


# ------------------------------------------------------------------------------- kubelet emulation

_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion (third_party/forked/golang/expansion): $$ escapes a $, a reference
    to a defined variable is replaced, an undefined one is left as written."""
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: in order, each value expanded against the
    variables before it, secretKeyRefs read from `secrets` ({name: {key: value}})."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]], \
                f"env {var['name']} needs Secret {ref['name']} key {ref['key']}, which the test does not provide"
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = expand(var.get("value", ""), env)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


# ------------------------------------------------------------------------------------------ servers

@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A real PostgreSQL with an empty `mlflow` database; yields its SQLAlchemy URI (unix socket). As root
    (CI), pgserver runs it as a system user `pgserver` that it adds."""
    import pgserver
    import psycopg2

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    try:
        conn = psycopg2.connect(server.get_uri())
        conn.autocommit = True           # CREATE DATABASE refuses to run in a transaction
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield server.get_uri("mlflow").replace("postgresql://", "postgresql+psycopg2://", 1)
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """`mlflow server` exactly as the chart's Deployment runs it."""
    port = free_port()
    values = {"mlflow": {"port": port, "artifactsPrefix": PREFIX},
              "s3": {"bucket": BUCKET, "endpointUrl": s3_server["AWS_ENDPOINT_URL"],
                     "region": s3_server["AWS_DEFAULT_REGION"]}}
    chart = helm.Chart.load(CHART)
    try:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    objs = [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    names = env_of(container)
    db_ref = names["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    key_ref = names["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    secret_ref = names["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    # The Secrets an operator creates beside the release (values.yaml names them), with local contents.
    secrets = {db_ref["name"]: {db_ref["key"]: postgres},
               key_ref["name"]: {key_ref["key"]: s3_server["AWS_ACCESS_KEY_ID"],
                                 secret_ref["key"]: s3_server["AWS_SECRET_ACCESS_KEY"]}}
    env = container_env(container, secrets)
    argv = [expand(word, env) for word in container["command"] + container["args"]]

    # The pod's /tmp (HOME) is a private emptyDir; a fresh directory plays it. The image's PATH is this
    # venv's. Nothing else of the test process leaks in: the AWS settings must come from the chart.
    home = tmp_path_factory.mktemp("mlflow_tmp")
    proc_env = {**env, "HOME": str(home) if env.get("HOME") == "/tmp" else env["HOME"], "TMPDIR": str(home),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = home / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=proc_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)       # its own process group: the workers die with it
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {argv}\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in {START_TIMEOUT_S}s\n{tail(log)}")
            time.sleep(0.5)
        yield Server(uri, argv, env, log)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def run(mlflow_server, ray_cluster, tdm_home, tiny_toy_dir):
    """A tiny distillation whose driver, Ray Train workers and Ray tasks all log to the chart's server. The
    teacher is a local directory and evaluation is off: training the toy teacher and evaluating cost
    minutes on CI's cores and add nothing to what this file checks (test_distill_e2e covers them), so
    the gate does not pass and the student is registered without an alias."""
    import mlflow

    from tdm.run import distill

    uri = mlflow_server.uri
    before = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri           # what the chart gives the RayJob's pods
    try:
        cfg = tiny_config(name="pg-s3", teacher={"uri": str(tiny_toy_dir)}, data={"prompts": PROMPTS},
                          eval={"enabled": False}, registry={"model_name": MODEL},
                          train={"max_steps": 2, "checkpoint_every": 2, "sample_every": 2, "log_every": 1})
        try:
            result = distill(cfg)
        except Exception as e:
            raise AssertionError(f"the distillation failed; the MLflow server's log ends:\n"
                                 f"{tail(mlflow_server.log)}") from e
        yield result
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)    # the session's other tests use the local store
        mlflow.set_tracking_uri(before)


# -------------------------------------------------------------------------------------------- tests

def test_server_runs_the_rendered_command_line(mlflow_server, postgres, s3_server):
    uri, argv, env, _ = mlflow_server
    port = uri.rsplit(":", 1)[1]
    assert argv[:6] == ["mlflow", "server", "--host", "0.0.0.0", "--port", port]
    flags = dict(zip(argv, argv[1:]))
    assert flags["--backend-store-uri"] == postgres                      # $(MLFLOW_BACKEND_STORE_URI) expanded
    assert flags["--artifacts-destination"] == f"s3://{BUCKET}/{PREFIX}" and "--serve-artifacts" in argv
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == s3_server["AWS_ENDPOINT_URL"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    with urllib.request.urlopen(f"{uri}/health", timeout=10) as r:
        assert r.status == 200 and r.read().strip() == b"OK"


def _status(url: str, host: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_allowed_hosts_rejects_a_foreign_host(mlflow_server):
    """--allowed-hosts is in force: the Service's names and localhost pass, any other Host header is refused
    (MLflow's DNS-rebinding guard answers 403)."""
    uri = mlflow_server.uri
    port = uri.rsplit(":", 1)[1]
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    hosts = {"localhost:" + port: 200, "127.0.0.1:" + port: 200, f"{RELEASE}-mlflow:{port}": 200,
             f"{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:{port}": 200, "evil.example.com": 403,
             f"{RELEASE}-mlflow.{NAMESPACE}.svc:1": 403}
    assert {host: _status(api, host) for host in hosts} == hosts


def test_distillation_logs_to_postgres_and_s3(run, mlflow_server, postgres, s3_server):
    import boto3
    import psycopg2
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    assert run["passed"] is False and run["step"] == 2      # evaluation off: registered, no alias
    r = client.get_run(run["run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["tdm.run_name"] == "pg-s3"
    assert sorted(m.step for m in client.get_metric_history(run["run_id"], "train/loss_student")) == [1, 2]
    assert r.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must go through the server's proxy"
    version = client.get_model_version(MODEL, run["model_version"])
    assert version.run_id == run["run_id"]

    # The backend store is the Postgres database, not a file the server made up.
    conn = psycopg2.connect(postgres.replace("postgresql+psycopg2://", "postgresql://", 1))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run["run_id"],))
            assert cur.fetchall() == [("FINISHED",)]
            cur.execute("SELECT version, run_id FROM model_versions WHERE name = %s", (MODEL,))
            assert [(str(v), r) for v, r in cur.fetchall()] == [(run["model_version"], run["run_id"])]
    finally:
        conn.close()

    # The artifacts are objects in the bucket, under the chart's prefix.
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
            for o in page.get("Contents", [])]
    run_keys = {k.split("/artifacts/", 1)[1] for k in keys if f"/{run['run_id']}/artifacts/" in k}
    assert {"checkpoints/step_0000002.json", "config.json"} <= run_keys, sorted(run_keys)
    assert any(k.startswith("images/samples_K4") for k in run_keys), "no sample grid from the Ray Train workers"
    # The exported student: the run's one logged model (the registry's REST answer carries no model_id).
    (model,) = client.search_logged_models([r.info.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
    assert model.artifact_location.startswith("mlflow-artifacts:")
    model_keys = {k.split("/artifacts/", 1)[1] for k in keys if f"/models/{model.model_id}/artifacts/" in k}
    assert {"MLmodel", "python_env.yaml"} <= model_keys, sorted(model_keys)
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") for k in model_keys), sorted(model_keys)
    assert "Traceback" not in mlflow_server.log.read_text(errors="replace"), tail(mlflow_server.log)


def test_registered_student_loads_through_the_server(run, mlflow_server):
    import mlflow
    import pandas as pd
    from PIL import Image

    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{run['model_version']}")
    prompts = pd.DataFrame({"prompt": PROMPTS})
    out = model.predict(prompts, params={"seed": 5})
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(b, bytes) for b in out)
    img = Image.open(io.BytesIO(out[0]))
    assert img.format == "PNG"
    assert model.predict(prompts, params={"seed": 5}) == out                       # same seed, same images
    assert model.predict(prompts, params={"seed": 6}) != out
