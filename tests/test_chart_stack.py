"""The chart's workloads, run for real on local stand-ins for the cluster.

One `helm template` rendering (Helm's own engine, helm-python-sdk) of a release with S3 storage, then:
- the MLflow Deployment's command line, arguments and environment, with $(VAR) references and
  secretKeyRefs resolved as the kubelet resolves them, run as a process against a real PostgreSQL
  (pgserver) and an S3-compatible server (moto);
- the RayJob's entrypoint and runtimeEnvYAML submitted with `ray job submit` to a local Ray head, as
  KubeRay's submitter does, logging to that server (a tiny distillation through Ray Train);
- the workflow driver's promotion of the registered version;
- the RayService's serveConfigV2 deployed with the REST call KubeRay makes (PUT /api/serve/applications/
  on the head's dashboard), reaching RUNNING and answering an image request.
The one substitution is DNS: the in-cluster MLflow Service name (tdm-mlflow.tdm.svc) becomes the local
server's address, since nothing resolves cluster names here."""
import base64
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import helm_python as helm
import pytest
import requests
import yaml
from conftest import free_port
from k8s_helpers import tail, wait_for_health
from test_chart import CHART, NAMESPACE, RELEASE, env_of, one

ROOT = Path(__file__).resolve().parents[1]
BUCKET, PREFIX = "tdm-test", "mlflow-store"
MODEL = "tdm-student-pg"
RUN_NAME = "pg-s3"
PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]
START_TIMEOUT_S = 180      # migrations on an empty database plus two workers importing mlflow, on 2 busy cores
JOB_TIMEOUT_S = 600
SERVE_TIMEOUT_S = 240

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
def release(s3_server, tiny_toy_dir, tmp_path_factory) -> dict:
    """The chart rendered once: MLflow on a free port with artifacts in the moto bucket, a distillation of
    the tiny toy teacher (a local directory) with checkpoints in S3 and evaluation off (training the
    toy teacher and evaluating cost minutes on CI's cores; test_distill_e2e covers them, so here the
    gate does not pass and the student is registered without an alias), one serving replica."""
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    port = free_port()
    # MLflow's basic-auth (on by default) is tested end to end in test_chart.py; here the stack runs without
    # it, so the job needs no credential Secrets
    values = {"mlflow": {"port": port, "artifactsPrefix": PREFIX, "auth": {"enabled": False}},
              "s3": {"bucket": BUCKET, "endpointUrl": s3_server["AWS_ENDPOINT_URL"],
                     "region": s3_server["AWS_DEFAULT_REGION"]},
              "image": {"appDir": str(ROOT)},     # the job's working_dir: this checkout plays the image's /app
              "distill": {"runName": RUN_NAME, "teacher": {"uri": str(tiny_toy_dir)},
                          "prompts": {"source": str(prompts)}, "storage": {"type": "s3"},
                          "eval": {"enabled": False},
                          "train": {"maxSteps": 2, "batchSize": 8, "numWorkers": 2, "cpusPerWorker": 1,
                                    "checkpointEvery": 2},
                          "registry": {"modelName": MODEL},
                          "extraArgs": {"train.sample_every": 2, "train.log_every": 1,
                                        "train.system_metrics_interval_s": 1}},
              "serve": {"modelName": MODEL, "cpusPerReplica": 1, "numReplicas": 1, "pollIntervalS": 1}}
    chart = helm.Chart.load(CHART)
    try:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    objs = [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]
    return {"port": port, "objects": objs, "scratch": tmp_path_factory.mktemp("pod-scratch"),
            "in_cluster_uri": f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:{port}"}


def local_uri(uri: str, release: dict, server: "Server") -> str:
    """The DNS stand-in: the chart's in-cluster MLflow URI -> the local server's."""
    assert uri == release["in_cluster_uri"], uri
    return server.uri


@pytest.fixture(scope="module")
def mlflow_server(release, postgres, s3_server, tmp_path_factory):
    """`mlflow server` exactly as the chart's Deployment runs it."""
    port, objs = release["port"], release["objects"]
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
        wait_for_health(uri, proc, log, START_TIMEOUT_S)
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


def _pod_env(container: dict, s3_server: dict, release: dict, server: Server) -> dict[str, str]:
    """A Ray container's environment as the kubelet gives it, with the S3 Secret's local contents and the
    DNS stand-in applied."""
    names = env_of(container)
    key_ref = names["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    secret_ref = names["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    secrets = {key_ref["name"]: {key_ref["key"]: s3_server["AWS_ACCESS_KEY_ID"],
                                 secret_ref["key"]: s3_server["AWS_SECRET_ACCESS_KEY"]}}
    env = container_env(container, secrets)
    env["MLFLOW_TRACKING_URI"] = local_uri(env["MLFLOW_TRACKING_URI"], release, server)
    # the pod's writable places (emptyDirs at /tmp and /var/lib/tdm under a read-only root) become a
    # private directory here
    scratch = release["scratch"]
    for key, value in env.items():
        for mount in ("/var/lib/tdm", "/tmp"):
            if value == mount or value.startswith(mount + "/"):
                env[key] = str(scratch / mount.strip("/").replace("/", "_")) + value[len(mount):]
    return env


@pytest.fixture(scope="module")
def job(release, mlflow_server, ray_dashboard, s3_server, tdm_home):
    """The RayJob run as KubeRay's submitter runs it: `ray job submit --address <head dashboard>
    --runtime-env-json <runtimeEnvYAML> --submission-id <id> -- <entrypoint>`. On a cluster the pod
    environment (MLflow URI, S3 endpoint and credentials) is in every Ray process; the local head was
    started before this module, so the job's runtime env carries it (env_vars) instead."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    rayjob = one(release["objects"], "RayJob")
    spec = rayjob["spec"]
    (head,) = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    runtime_env["env_vars"] = {**_pod_env(head, s3_server, release, mlflow_server), "TDM_HOME": str(tdm_home)}
    submission_id = f"{rayjob['metadata']['name']}-{int(time.time())}"
    argv = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_dashboard,
            "--runtime-env-json", json.dumps(runtime_env), "--submission-id", submission_id, "--no-wait", "--",
            *shlex.split(spec["entrypoint"])]
    # The head's dashboard agent, which launches jobs, comes up after the head answers; until then the
    # API says "No available agent ... try again later". KubeRay's submitter retries the same way.
    deadline = time.monotonic() + 180
    while True:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    client = JobSubmissionClient(ray_dashboard)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                     JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"the RayJob's entrypoint did not finish in {JOB_TIMEOUT_S}s:\n"
                        f"{client.get_job_logs(submission_id)[-4000:]}")
        time.sleep(2)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-4000:]}\nMLflow server:\n{tail(mlflow_server.log)}"
    return {"entrypoint": spec["entrypoint"], "submission_id": submission_id, "logs": logs,
            "info": client.get_job_info(submission_id)}


@pytest.fixture(scope="module")
def run(job, mlflow_server):
    """What the job registered, found the way the workflow driver finds it (by the entrypoint's run name)."""
    from tdm.workflow import parse_entrypoint, registered_version

    cfg = parse_entrypoint(job["entrypoint"], "the rendered RayJob")
    mv = registered_version(cfg, mlflow_server.uri)
    return {"cfg": cfg, "run_id": mv.run_id, "model_version": mv.version, "tags": mv.tags}


# -------------------------------------------------------------------------------------------- tests

def test_server_runs_the_rendered_command_line(mlflow_server, postgres, s3_server):
    uri, argv, env, _ = mlflow_server
    port = uri.rsplit(":", 1)[1]
    assert argv[:6] == ["mlflow", "server", "--host", "0.0.0.0", "--port", port]
    flags = dict(zip(argv, argv[1:]))
    # the database URI (password included) is in the environment, from its Secret, never in the arguments
    assert env["MLFLOW_BACKEND_STORE_URI"] == postgres and "--backend-store-uri" not in argv
    assert not any(postgres in a for a in argv)
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
    assert run["tags"].get("gate.passed") != "True"          # evaluation off: registered, no alias
    r = client.get_run(run["run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["tdm.run_name"] == RUN_NAME
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


def test_rayjob_entrypoint_runs_through_ray_job_submit(job, run, s3_server):
    """The rendered entrypoint, unchanged, ran as a Ray job and trained through Ray Train with the
    chart's flags: 2 workers, checkpoints in the release's S3 storage."""
    import boto3

    assert job["info"].entrypoint == job["entrypoint"]
    assert shlex.split(job["entrypoint"])[:2] == ["python", "pipelines/distill.py"]
    cfg = run["cfg"]
    assert (cfg.name, cfg.train.num_workers, cfg.train.max_steps) == (RUN_NAME, 2, 2)
    assert cfg.train.storage_path.startswith(f"s3://{BUCKET}/")
    bucket_prefix = cfg.train.storage_path.split(f"s3://{BUCKET}/", 1)[1].rstrip("/")
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{bucket_prefix}/{RUN_NAME}/") for o in page.get("Contents", [])]
    assert keys, f"no checkpoint under s3://{BUCKET}/{bucket_prefix}/{RUN_NAME}/"


def _serve_status(dashboard: str) -> dict:
    r = requests.get(f"{dashboard}/api/serve/applications/", timeout=30)
    r.raise_for_status()
    return r.json()


def test_serve_config_deploys_through_the_rest_api(release, run, mlflow_server, ray_dashboard):
    """Promotion as the workflow driver does it (forced: evaluation was off), then the RayService's
    serveConfigV2 PUT to the head's Serve REST API as KubeRay does; the app reaches RUNNING and serves
    the promoted version over the OpenAI-style API."""
    from PIL import Image
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from tdm.workflow import promote

    promoted = promote(run["cfg"], mlflow_server.uri, force=True)
    assert promoted.version == run["model_version"]

    rayservice = one(release["objects"], "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["args"]["model_uri"] == f"models:/{MODEL}@champion"
    app["args"]["tracking_uri"] = local_uri(app["args"]["tracking_uri"], release, mlflow_server)
    ServeDeploySchema.model_validate(config)
    # Serve's HTTP proxy on a free local port (a RayService head uses its serve port, 8000); the PUT
    # below carries no http_options, as serveConfigV2 carries none, so the running proxy is kept.
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        r = requests.put(f"{ray_dashboard}/api/serve/applications/", json=config, timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while (status := _serve_status(ray_dashboard)["applications"].get(app["name"], {})).get("status") != "RUNNING":
            assert status.get("status") not in {"DEPLOY_FAILED", "UNHEALTHY"}, json.dumps(status, indent=1)[-4000:]
            assert time.monotonic() < deadline, f"not RUNNING in {SERVE_TIMEOUT_S}s: {json.dumps(status)[-3000:]}"
            time.sleep(2)
        url = f"http://127.0.0.1:{port}{app['route_prefix'].rstrip('/')}"
        models = requests.get(f"{url}/v1/models", timeout=30).json()
        assert any(m["id"].endswith(f"/{run['model_version']}") for m in models["data"]), models
        resp = requests.post(f"{url}/v1/images/generations", json={"prompt": PROMPTS[0], "n": 2, "seed": 1},
                             timeout=120)
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
        assert len(images) == 2 and all(im.format == "PNG" for im in images)
    finally:
        serve.shutdown()
