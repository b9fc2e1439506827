"""The workflow driver (pipelines/workflow.py, tdm.workflow) without a real cluster: the dry run (a RayJob
that validates against the KubeRay CRD and whose entrypoint parses back to the same config), and the full
submit -> follow -> promote -> patch run against an in-test Kubernetes API server (the ray.io/v1 REST
endpoints the official client calls, reached through a kubeconfig file) and a real MLflow sqlite store."""
import json
import shlex
import socket
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from k8s_helpers import assert_valid

from tdm.cli import build_arg_parser, config_from_args
from tdm.config import TDMConfig, load_config
from tdm.errors import ConfigError
from tdm.workflow import distill_entrypoint, rayjob_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
import workflow as cli  # noqa: E402  (pipelines/workflow.py, the entry point under test)

NAMESPACE, SERVICE, TOKEN = "tdm", "tdm-serve", "test-token"
RUN_YAML = "student:\n  num_steps: 2\ntrain:\n  num_workers: 2\n  max_steps: 50\n"
RUNNING = [{"jobDeploymentStatus": "Initializing"}, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}]
SUCCEEDS = RUNNING + [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
FAILS = RUNNING + [{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                    "message": "Job entrypoint command failed with exit code 1"}]


# ------------------------------------------------------------------------------- the chart's objects

@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, dict]:
    """(`helm template`-like output of the chart with default values, as one file; its RayService)."""
    chart = helm.Chart.load(ROOT / "charts" / "tdm")
    try:
        files = chart.render({}, name="tdm", namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    text = "\n---\n".join(t for path, t in sorted(files.items()) if not path.endswith("NOTES.txt"))
    path = tmp_path_factory.mktemp("chart") / "all.yaml"
    path.write_text(text)
    (service,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "RayService"]
    return path, service


def tdm_cli_config(entrypoint: str) -> TDMConfig:
    """What pipelines/distill.py would run with: tdm's own parser on the shell words of the entrypoint."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "pipelines/distill.py"], entrypoint
    return config_from_args(build_arg_parser("test").parse_args(argv[2:]))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------- a tiny Kubernetes API server

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeKube(ThreadingHTTPServer):
    """ray.io/v1 rayjobs and rayservices of any namespace: POST creates, GET reads one (a RayJob advances
    one step of `job_script` per read; the first `unavailable_job_reads` answer 503) or lists, PATCH
    applies a merge patch with the resourceVersion precondition."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), KubeHandler)
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.job_script: list[dict] = []
        self.unavailable_job_reads = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.version = 100

    def put(self, plural: str, obj: dict) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[plural, obj["metadata"]["namespace"], obj["metadata"]["name"]] = obj


class KubeHandler(BaseHTTPRequestHandler):
    server: FakeKube

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, message: str) -> None:
        self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                           "code": code})

    def _route(self):
        """(plural, namespace, name or None, body) of an authorised ray.io/v1 request, else None (replied)."""
        self.server.requests.append((self.command, self.path, self.headers.get("Content-Type")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(401, "Unauthorized")
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:4] != ["apis", "ray.io", "v1", "namespaces"] or len(parts) not in (6, 7) \
                or parts[5] not in ("rayjobs", "rayservices"):
            return self._status(404, f"the server could not find the requested resource {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        return parts[5], parts[4], parts[6] if len(parts) == 7 else None, body

    def do_POST(self):
        if (route := self._route()) is None:
            return
        plural, ns, _, obj = route
        key = (plural, ns, obj["metadata"]["name"])
        if key in self.server.objects:
            return self._status(409, f'{plural}.ray.io "{key[2]}" already exists')
        obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()))
        self.server.put(plural, obj)
        self._reply(201, obj)

    def do_GET(self):
        if (route := self._route()) is None:
            return
        plural, ns, name, _ = route
        if name is None:
            items = [o for (p, n, _), o in self.server.objects.items() if (p, n) == (plural, ns)]
            return self._reply(200, {"apiVersion": "ray.io/v1", "kind": "List", "items": items})
        obj = self.server.objects.get((plural, ns, name))
        if obj is None:
            return self._status(404, f'{plural}.ray.io "{name}" not found')
        if plural == "rayjobs" and self.server.unavailable_job_reads:
            self.server.unavailable_job_reads -= 1
            return self._status(503, "etcdserver: leader changed")
        if plural == "rayjobs" and self.server.job_script:
            obj["status"] = self.server.job_script.pop(0)
        self._reply(200, obj)

    def do_PATCH(self):
        if (route := self._route()) is None:
            return
        plural, ns, name, patch = route
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            return self._status(415, f"unsupported media type {self.headers.get('Content-Type')}")
        obj = self.server.objects.get((plural, ns, name))
        if obj is None:
            return self._status(404, f'{plural}.ray.io "{name}" not found')
        wanted = patch.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != obj["metadata"]["resourceVersion"]:
            return self._status(409, "the object has been modified; please apply your changes to the latest version")
        self.server.put(plural, merge_patch(obj, patch))
        self._reply(200, self.server.objects[plural, ns, name])


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}]}))
    return path


@pytest.fixture
def kube(rendered, tmp_path):
    """The fake API server holding the chart's RayService, and a kubeconfig pointing at it."""
    server = FakeKube()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    service = json.loads(json.dumps(rendered[1]))
    service["metadata"]["namespace"] = NAMESPACE      # as `helm install -n tdm` creates it
    server.put("rayservices", service)
    server.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{server.server_port}")
    yield server
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------ a real MLflow store


@pytest.fixture(scope="module")
def _registry(tmp_path_factory):
    """A sqlite MLflow store with tdm-student versions registered as tdm.run does (run tagged
    tdm.run_name, version tags run_name / run_id / gate.passed): 1 old-run (the champion), 2 run-ok,
    3 run-gate (gate failed), 4 other-run (newer than run-ok, so 'latest' would be wrong)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("tdm", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model("tdm-student")
    versions = {}
    for run_name, passed in (("old-run", True), ("run-ok", True), ("run-gate", False), ("other-run", True)):
        run = client.create_run(exp, run_name=run_name, tags={"tdm.run_name": run_name})
        mv = client.create_model_version("tdm-student", f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                         tags={"run_name": run_name, "run_id": run.info.run_id,
                                               "gate.passed": str(passed)})
        versions[run_name] = mv.version
    return uri, client, versions


@pytest.fixture
def registry(_registry):
    """The store with @champion reset to old-run's version."""
    uri, client, versions = _registry
    client.set_registered_model_alias("tdm-student", "champion", versions["old-run"])
    return _registry


def champion(client) -> str:
    return str(client.get_model_version_by_alias("tdm-student", "champion").version)


def served_uri(kube) -> str:
    service = kube.objects["rayservices", NAMESPACE, SERVICE]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app["args"]["model_uri"]


def run_config(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    return path


def workflow_args(rendered, kube, registry, tmp_path, *extra):
    return ["--config", run_config(tmp_path), "--rayjob", rendered[0], "--rayservice", SERVICE,
            "--namespace", NAMESPACE, "--kubeconfig", kube.kubeconfig, "--tracking-uri", registry[0],
            "--poll-interval", "0.01", "--timeout", "20", *extra]


# ----------------------------------------------------------------------------------------- the tests

def test_dry_run_prints_a_valid_rayjob_whose_entrypoint_round_trips(rendered, tmp_path, capsys):
    argv = ["--config", run_config(tmp_path), "--rayjob", rendered[0], "--rayservice", SERVICE,
            "--namespace", NAMESPACE, "--dry-run", "--kubeconfig", tmp_path / "no-such-kubeconfig",
            "--tracking-uri", "http://user:pw@mlflow:5000", "--train.max_steps", "70",
            "--name", "Nightly_Run.SD1.5_" + "x" * 60]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    rayjob, plan = yaml.safe_load_all(out)
    cfg = tdm_cli_config(rayjob["spec"]["entrypoint"])
    # layering: the template's deployment settings, then the file, then flags; the run name is ours
    assert cfg.train.storage_path == "/mnt/tdm/runs"
    assert (cfg.student.num_steps, cfg.train.num_workers, cfg.train.max_steps) == (2, 2, 70)
    assert cfg.name.startswith("Nightly_Run.SD1.5_")
    assert rayjob["metadata"]["name"].startswith("nightly-run-sd1-5-x") and rayjob["metadata"]["namespace"] == NAMESPACE
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    # the entrypoint is exactly the non-default fields, and parses back to the config the driver resolved
    rc, printed, _ = run_cli(capsys, *argv, "--print-config")
    assert rc == 0 and TDMConfig.model_validate_json(printed) == cfg
    flags = shlex.split(rayjob["spec"]["entrypoint"])[2:]
    assert len(flags) == len([k for k, v in cfg.to_flat_dict().items() if v != TDMConfig().to_flat_dict()[k]])
    steps = plan["workflow"]
    assert steps["dryRun"] is True and steps["create"]["name"] == rayjob["metadata"]["name"]
    assert steps["promote"]["trackingUri"] == "http://***@mlflow:5000" and steps["promote"]["alias"] == "champion"
    assert steps["patch"]["name"] == SERVICE and steps["patch"]["contentType"] == "application/merge-patch+json"
    # every submission gets a new RayJob name; the run name stays, so a retry resumes
    rc, again, _ = run_cli(capsys, *argv)
    rayjob2 = next(yaml.safe_load_all(again))
    assert rayjob2["metadata"]["name"] != rayjob["metadata"]["name"]
    assert tdm_cli_config(rayjob2["spec"]["entrypoint"]).name == cfg.name
    # a run name that cannot be a directory or a registry key is one line naming the field, before any submission
    rc, _, err = run_cli(capsys, *argv[:-1], "Nightly Run: SD1.5")
    assert rc == 2 and err.strip().count("\n") == 0 and "name:" in err and "use letters, digits" in err
    assert_valid(rayjob)   # last: the KubeRay CRD schemas may be absent (the test then skips, its other checks done)


@pytest.mark.parametrize("data", [
    {"name": "r", "data": {"prompts": ["a, b", "it's \"quoted\"", "ünïcode $HOME `x`", "-starts with dash"]}},
    {"name": "r", "teacher": {"negative_prompt": "-blurry, low quality"}, "loss": {"snr_gamma": None,
     "guidance_scale": 4.5, "randmid": True}, "optim": {"betas": [0.0, 0.95], "lr_student": 2e-6}},
    {"name": "r", "student": {"step_set": [1, 2, 4]}, "train": {"ema_decay": None, "storage_path": "s3://b/p q"},
     "eval": {"student_steps": [1, 4]}, "toy": {"channels": [16, 32]}},
])
def test_entrypoint_round_trips_through_the_tdm_parser(data):
    cfg = load_config(data)
    assert tdm_cli_config(distill_entrypoint(cfg)) == cfg


def test_a_value_the_command_line_cannot_carry_is_refused():
    with pytest.raises(ConfigError, match="train.storage_path"):
        distill_entrypoint(load_config({"name": "r", "train": {"storage_path": "none"}}))


def test_rayjob_names_are_dns_labels_within_the_kuberay_limit():
    for run in ("x" * 200, "9 lives", "UPPER_case.run", "---"):
        name = rayjob_name(run)
        assert len(name) <= 47 and name[0].isalpha() and name[-1].isalnum()
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-"), name


def test_submit_follow_promote_patch(rendered, kube, registry, tmp_path, capsys):
    uri, client, versions = registry
    kube.job_script, kube.unavailable_job_reads = list(SUCCEEDS), 1
    rc, out, err = run_cli(capsys, *workflow_args(rendered, kube, registry, tmp_path, "--name", "run-ok"))
    assert rc == 0, err
    assert "status unavailable, polling again" in out and "503" in out      # a blip is not a failure
    # the created RayJob: valid, this run's entrypoint
    ((_, ns, job_name), job), = [(k, o) for k, o in kube.objects.items() if k[0] == "rayjobs"]
    assert ns == NAMESPACE
    assert tdm_cli_config(job["spec"]["entrypoint"]).name == "run-ok"
    # followed through every transition, in order
    seen = [line for line in out.splitlines() if f"RayJob {job_name}:" in line and "unavailable" not in line]
    assert [line.split(": ", 1)[1].split(" (")[0] for line in seen] == \
        ["Initializing / -", "Running / RUNNING", "Complete / SUCCEEDED"]
    # promoted the version of this run (not the newest version of the model)
    assert champion(client) == str(versions["run-ok"]) != str(versions["other-run"])
    # serving points at that explicit version; nothing else in the RayService changed
    assert served_uri(kube) == f"models:/tdm-student/{versions['run-ok']}"
    before_cfg = yaml.safe_load(rendered[1]["spec"]["serveConfigV2"])
    after = kube.objects["rayservices", NAMESPACE, SERVICE]
    after_cfg = yaml.safe_load(after["spec"]["serveConfigV2"])
    before_cfg["applications"][0]["args"].pop("model_uri")
    after_cfg["applications"][0]["args"].pop("model_uri")
    assert after_cfg == before_cfg
    assert after["spec"]["rayClusterConfig"] == rendered[1]["spec"]["rayClusterConfig"]
    patches = [r for r in kube.requests if r[0] == "PATCH"]
    assert patches == [("PATCH", f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/{SERVICE}",
                        "application/merge-patch+json")]
    assert_valid(job)   # last: the KubeRay CRD schemas may be absent (the test then skips, its other checks done)


def test_a_failed_job_is_a_clear_error_and_changes_nothing(rendered, kube, registry, tmp_path, capsys):
    _, client, versions = registry
    kube.job_script = list(FAILS)
    rc, _, err = run_cli(capsys, *workflow_args(rendered, kube, registry, tmp_path, "--name", "run-ok"))
    assert rc == 1
    assert "failed" in err and "AppFailed" in err and "exit code 1" in err and "kubectl -n tdm logs job/run-ok-" in err
    assert champion(client) == str(versions["old-run"])
    assert served_uri(kube) == "models:/tdm-student@champion"
    assert not [r for r in kube.requests if r[0] == "PATCH"]


def test_a_job_that_does_not_finish_times_out_naming_the_flag(rendered, kube, registry, tmp_path, capsys):
    kube.job_script = list(RUNNING)
    args = workflow_args(rendered, kube, registry, tmp_path, "--name", "run-ok", "--timeout", "0.2")  # last wins
    rc, _, err = run_cli(capsys, *args)
    assert rc == 1 and "--timeout" in err and "keeps running" in err


def test_gate_failed_refuses_unless_forced(rendered, kube, registry, tmp_path, capsys):
    _, client, versions = registry
    kube.job_script = list(SUCCEEDS)
    rc, _, err = run_cli(capsys, *workflow_args(rendered, kube, registry, tmp_path, "--name", "run-gate"))
    assert rc == 1 and "did not pass the quality gate" in err and "--force" in err
    assert champion(client) == str(versions["old-run"]) and served_uri(kube) == "models:/tdm-student@champion"
    kube.job_script = list(SUCCEEDS)
    rc, out, err = run_cli(capsys, *workflow_args(rendered, kube, registry, tmp_path, "--name", "run-gate", "--force"))
    assert rc == 0, err
    assert champion(client) == str(versions["run-gate"]) and "--force" in out
    assert served_uri(kube) == f"models:/tdm-student/{versions['run-gate']}"
    tags = client.get_model_version("tdm-student", versions["run-gate"]).tags   # the version says it was forced
    assert tags["promotion.forced"] == "true" and tags["promotion.forced_at"].endswith("Z")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edit_service(kube, **args):
    service = kube.objects["rayservices", NAMESPACE, SERVICE]
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    for key, value in args.items():
        serve_cfg["applications"][0][key] = value
    service["spec"]["serveConfigV2"] = yaml.safe_dump(serve_cfg)


@pytest.mark.parametrize("case,rc,expected", [
    ("missing config", 2, "--config: file not found"),
    ("missing template", 2, "--rayjob: file not found"),
    ("template not a RayJob", 2, "--rayjob"),
    ("template runs something else", 2, "--rayjob: entrypoint must start with 'python pipelines/distill.py'"),
    ("missing kubeconfig", 2, "--kubeconfig: file not found"),
    ("gpu on a cpu template", 2, "train.use_gpu"),
    ("rayservice without a tdm app", 2, "--rayservice: RayService tdm-serve must have exactly one application "
                                        "with import_path tdm.serve:build_app"),
    ("rayservice serving another model", 2, "--rayservice: tdm-serve serves models:/sdxl-tdm@champion"),
    ("rayservice not found", 1, '--rayservice: reading RayService tdm/nope: HTTP 404'),
    ("unreachable api server", 1, "cannot reach the Kubernetes API server at http://127.0.0.1:"),
    ("run already has a running job", 2, "--name: run 'run-ok' already has an unfinished RayJob run-ok-earlier"),
])
def test_bad_input_names_the_flag(rendered, kube, registry, tmp_path, capsys, case, rc, expected):
    args = workflow_args(rendered, kube, registry, tmp_path, "--name", "run-ok")
    flag = {a: i for i, a in enumerate(args) if isinstance(a, str) and a.startswith("--")}
    if case == "missing config":
        args[flag["--config"] + 1] = tmp_path / "nope.yaml"
    elif case == "missing template":
        args[flag["--rayjob"] + 1] = tmp_path / "nope.yaml"
    elif case == "template not a RayJob":
        (tmp_path / "svc.yaml").write_text(yaml.safe_dump(rendered[1]))
        args[flag["--rayjob"] + 1] = tmp_path / "svc.yaml"
    elif case == "template runs something else":
        text = rendered[0].read_text().replace("python pipelines/distill.py", "python train.py")
        (tmp_path / "other.yaml").write_text(text)
        args[flag["--rayjob"] + 1] = tmp_path / "other.yaml"
    elif case == "missing kubeconfig":
        args[flag["--kubeconfig"] + 1] = tmp_path / "nope"
    elif case == "gpu on a cpu template":
        args += ["--train.use_gpu", "true"]
    elif case == "rayservice without a tdm app":
        _edit_service(kube, import_path="other.app:build")
    elif case == "rayservice serving another model":
        _edit_service(kube, args={"model_uri": "models:/sdxl-tdm@champion"})
    elif case == "rayservice not found":
        args[flag["--rayservice"] + 1] = "nope"
    elif case == "run already has a running job":
        kube.put("rayjobs", {"apiVersion": "ray.io/v1", "kind": "RayJob", "status": {"jobDeploymentStatus": "Running"},
                             "metadata": {"name": "run-ok-earlier", "namespace": NAMESPACE,
                                          "annotations": {"tdm/run-name": "run-ok"}}})
    elif case == "unreachable api server":
        args[flag["--kubeconfig"] + 1] = write_kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{_closed_port()}")
    jobs_before = sorted(k for k in kube.objects if k[0] == "rayjobs")
    code, _, err = run_cli(capsys, *args)
    assert code == rc, err
    (line,) = [e for e in err.splitlines() if "error:" in e]
    assert line.startswith("workflow.py: error: ") and expected in line
    # pre-flight: nothing was created or promoted
    assert sorted(k for k in kube.objects if k[0] == "rayjobs") == jobs_before
    assert champion(registry[1]) == str(registry[2]["old-run"])
