"""The Helm chart charts/tdm, offline: rendered by Helm's own template engine (helm-python-sdk binds
the Helm v4 Go SDK; no helm binary, no cluster), every object validated (kubernetes-validate, strict,
for built-in kinds; the KubeRay v1.7 CRD schemas, made strict, for ray.io kinds; KubeRay controller
rules the schemas do not carry), the values mapped onto `pipelines/distill.py` flags and onto the
Serve config that `tdm.serve.serve_config` builds, and bad values rejected with a clear message."""
import copy
import functools
import shlex
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from k8s_helpers import K8S_VERSION, RAY_NAME_MAX, assert_valid, crd_validator, credential_problems, ray_objects_last

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "tdm"
RELEASE, NAMESPACE = "tdm", "ml"
BUILD_APP_EXTRAS = {"num_replicas", "num_gpus", "num_cpus", "max_ongoing_requests", "max_queued_requests"}

GPU_IMAGE = {"repository": "registry.example.com/tdm-cuda", "tag": "0.1.0-cu128"}

#: Value sets rendered and checked by every test below.
SCENARIOS = {
    "default": {},
    "gpu": {
        "gpuImage": GPU_IMAGE,
        "distill": {
            "teacher": {"uri": "stabilityai/stable-diffusion-xl-base-1.0"},
            "student": {"finetune": "lora", "stepSet": [1, 2, 4]},
            "loss": {"guidanceScale": 8},
            "train": {"useGpu": True, "numWorkers": 4, "batchSize": 64, "mixedPrecision": "bf16",
                      "gradientCheckpointing": True, "maxSteps": 500},
            "eval": {"clipModel": "openai/clip-vit-large-patch14"},
            "registry": {"modelName": "sdxl-tdm"},
            "workers": {"gpuNodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}},
        },
        "serve": {"modelName": "sdxl-tdm", "gpusPerReplica": 1, "numReplicas": 2, "cpusPerReplica": 4,
                  "decoder": "madebyollin/taesd"},
    },
    "s3": {
        "s3": {"bucket": "tdm-data", "endpointUrl": "http://minio.minio.svc:9000",
               "credentialsSecret": {"name": "minio-creds", "accessKeyIdKey": "accesskey",
                                     "secretAccessKeyKey": "secretkey"}},
        "distill": {
            "runName": "sd15-tdm-v1",
            "teacher": {"uri": "s3://tdm-data/teachers/sd15/"},
            "prompts": {"source": "s3://tdm-data/prompts/coco.parquet", "column": "caption", "maxPrompts": 5000},
            "eval": {"enabled": False},
            "storage": {"type": "s3", "s3Prefix": "/tdm/checkpoints/"},
            "extraArgs": {"optim.lr_student": 2e-6, "data.embedding_cache": False},
        },
        "serve": {"decoder": "s3://tdm-data/decoders/taesd/"},
    },
    "external_mlflow": {
        "mlflow": {"enabled": False, "externalUri": "https://mlflow.example.com"},
        "distill": {"jobName": "distill-nightly", "train": {"numWorkers": 2}},
        "serve": {"name": "tdm-images", "modelAlias": "candidate", "pollIntervalS": 30},
    },
    "autoscaling": {
        "serve": {"autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 6,
                                  "targetOngoingRequests": 3},
                  "workingDir": "s3://tdm/code/tdm-0.1.0.zip", "maxBatchSize": 16, "maxQueuedRequests": -1,
                  "upscaleFactors": [1, 4], "upgradeStrategy": "None"},
    },
}
#: the example values files shipped beside the chart, checked like the scenarios above
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
SCENARIOS |= {f"example:{f.stem}": yaml.safe_load(f.read_text()) for f in EXAMPLES}


# ------------------------------------------------------------------------------------------ helpers

def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def chart():
    c = helm.Chart.load(CHART)
    yield c
    c.close()


@functools.lru_cache(maxsize=None)
def _defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def values_of(scenario: str) -> dict:
    """The values a scenario renders with (chart defaults + the scenario's overrides)."""
    return deep_merge(_defaults(), SCENARIOS[scenario])


_rendered: dict = {}


def render(chart, scenario: str) -> dict[str, str]:
    if scenario not in _rendered:
        _rendered[scenario] = chart.render(SCENARIOS[scenario], name=RELEASE, namespace=NAMESPACE, is_install=True)
    return _rendered[scenario]


def objects(chart, scenario: str) -> list[dict]:
    out = []
    for path, text in sorted(render(chart, scenario).items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def pod_specs(objs: list[dict]):
    """(where, pod spec) for every pod the release creates, directly or through KubeRay."""
    for o in objs:
        spec = o.get("spec", {})
        if o["kind"] == "Deployment":
            yield f"Deployment/{o['metadata']['name']}", spec["template"]["spec"]
        elif o["kind"] in ("RayJob", "RayService"):
            cluster = spec["rayClusterSpec"] if o["kind"] == "RayJob" else spec["rayClusterConfig"]
            yield f"{o['kind']} head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{o['kind']} worker group {group['groupName']}", group["template"]["spec"]
            if "submitterPodTemplate" in spec:
                yield f"{o['kind']} submitter", spec["submitterPodTemplate"]["spec"]


def distill_argv(rayjob: dict) -> list[str]:
    entry = rayjob["spec"]["entrypoint"]
    assert entry.startswith("python pipelines/distill.py"), entry
    argv = shlex.split(entry)
    assert argv[:2] == ["python", "pipelines/distill.py"]
    return argv[2:]


# ---------------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_helm_lint_is_clean(scenario):
    report = helm.lint(CHART, SCENARIOS[scenario] if scenario else None, strict=True, namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # severity 1 = INFO ("icon is recommended" is the only one we accept)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_validates(chart, scenario):
    objs = objects(chart, scenario)
    kinds = sorted(o["kind"] for o in objs)
    assert {"RayJob", "RayService", "ServiceAccount", "NetworkPolicy"} <= set(kinds)
    assert ("Deployment" in kinds) == values_of(scenario)["mlflow"]["enabled"]
    for obj in ray_objects_last(objs):
        assert_valid(obj)


def test_strict_crd_schema_catches_typos(chart):
    """The strict CRD validator is not vacuous: a misspelled field and a wrong type are caught."""
    rayjob = one(objects(chart, "default"), "RayJob")
    bad = copy.deepcopy(rayjob)
    bad["spec"]["shutdownAfterJobFinishez"] = bad["spec"].pop("shutdownAfterJobFinishes")
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "1"
    messages = " ".join(e.message for e in crd_validator("RayJob").iter_errors(bad))
    assert "shutdownAfterJobFinishez" in messages and "'1' is not of type 'integer'" in messages
    with pytest.raises(kubernetes_validate.ValidationError):
        sa = one(objects(chart, "default"), "ServiceAccount")
        kubernetes_validate.validate({**sa, "bogus": 1}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_is_locked_down_and_sized(chart, scenario):
    pods = list(pod_specs(objects(chart, scenario)))
    assert len(pods) >= 5          # mlflow?, distill head/workers/submitter, serve head/workers
    for where, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] in (True, False), where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert c["resources"]["requests"] and c["resources"]["limits"], where


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_distill_entrypoint_maps_the_values(chart, scenario):
    from tdm.cli import build_arg_parser, config_from_args

    v = values_of(scenario)
    d = v["distill"]
    rayjob = one(objects(chart, scenario), "RayJob")
    argv = distill_argv(rayjob)
    # the entrypoint is a valid tdm config: the same parser and validation as pipelines/distill.py
    cfg = config_from_args(build_arg_parser("test").parse_args(argv))
    job_name = d["jobName"] or f"{RELEASE}-distill"
    assert rayjob["metadata"]["name"] == job_name
    assert cfg.name == (d["runName"] or job_name)
    assert cfg.teacher.uri == d["teacher"]["uri"]
    assert cfg.data.prompt_source == (d["prompts"]["source"] or None)
    if d["prompts"]["source"]:
        assert cfg.data.prompt_column == d["prompts"]["column"]
    assert cfg.data.max_prompts == d["prompts"]["maxPrompts"]
    assert cfg.student.finetune == d["student"]["finetune"]
    assert cfg.student.num_steps == d["student"]["numSteps"]
    assert cfg.student.step_set == (d["student"]["stepSet"] or None)
    if d["loss"]["guidanceScale"] is not None:
        assert cfg.loss.guidance_scale == d["loss"]["guidanceScale"]
    t = d["train"]
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.num_workers, cfg.train.use_gpu,
            cfg.train.mixed_precision, cfg.train.gradient_checkpointing, cfg.train.max_failures) == \
        (t["maxSteps"], t["batchSize"], t["numWorkers"], t["useGpu"], t["mixedPrecision"],
         t["gradientCheckpointing"], t["maxFailures"])
    if d["storage"]["type"] == "s3":
        assert cfg.train.storage_path == f"s3://{v['s3']['bucket']}/{d['storage']['s3Prefix'].strip('/')}"
    else:
        assert cfg.train.storage_path == d["storage"]["pvc"]["mountPath"] + "/runs"
    assert cfg.eval.enabled == d["eval"]["enabled"]
    assert cfg.eval.clip_model == (d["eval"]["clipModel"] or None)
    assert (cfg.registry.experiment, cfg.registry.model_name, cfg.registry.alias) == \
        (d["registry"]["experiment"], d["registry"]["modelName"], d["registry"]["alias"])
    for key, value in d["extraArgs"].items():
        assert cfg.to_flat_dict()[key] == value
    for key, value in d["video"].items():
        assert getattr(cfg.video, key) == value
    assert ("--preset" in argv) == bool(d["preset"])
    # the repository is the job's working directory, so `pipelines/distill.py` resolves
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]) == {"working_dir": d["workingDir"] or v["image"]["appDir"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_distill_job_lifecycle_and_cluster(chart, scenario):
    v = values_of(scenario)
    d = v["distill"]
    spec = one(objects(chart, scenario), "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600
    assert spec["activeDeadlineSeconds"] == 172800 and spec["backoffLimit"] == 2
    assert spec["submissionMode"] == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"   # train workers go to worker pods
    (group,) = cluster["workerGroupSpecs"]
    workers = d["train"]["numWorkers"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
    worker = group["template"]["spec"]
    (container,) = worker["containers"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    if d["train"]["useGpu"]:
        image = f"{GPU_IMAGE['repository']}:{GPU_IMAGE['tag']}"
        assert container["image"] == head["image"] == image
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
        assert worker.get("nodeSelector", {}) == d["workers"]["gpuNodeSelector"]
    else:
        assert container["image"] == "tdm:0.1.0"
        assert not any("gpu" in k for k in container["resources"]["limits"])
        assert "tolerations" not in worker
    for c in (head, container):
        env = env_of(c)
        expected_uri = (f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:5000" if v["mlflow"]["enabled"]
                        else v["mlflow"]["externalUri"])
        assert env["MLFLOW_TRACKING_URI"]["value"] == expected_uri
        uses_s3 = d["storage"]["type"] == "s3" or d["teacher"]["uri"].startswith("s3://")
        assert ("AWS_ACCESS_KEY_ID" in env) == uses_s3
        if uses_s3:
            secret = v["s3"]["credentialsSecret"]
            assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == \
                {"name": secret["name"], "key": secret["accessKeyIdKey"]}
            assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == \
                {"name": secret["name"], "key": secret["secretAccessKeyKey"]}
            if v["s3"]["endpointUrl"]:
                assert env["AWS_ENDPOINT_URL"]["value"] == v["s3"]["endpointUrl"]
            else:                           # AWS S3 itself
                assert "AWS_ENDPOINT_URL" not in env
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm"
        assert ("runs" in mounts) == (d["storage"]["type"] == "pvc")


def _expected_serve_config(v: dict) -> dict:
    from tdm.serve import serve_config

    s = v["serve"]
    tracking = (f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:5000" if v["mlflow"]["enabled"]
                else v["mlflow"]["externalUri"])
    args = {"model_uri": f"models:/{s['modelName']}@{s['modelAlias']}", "tracking_uri": tracking,
            "poll_interval_s": s["pollIntervalS"], "max_batch_size": s["maxBatchSize"],
            "batch_wait_timeout_s": s["batchWaitTimeoutS"], "max_images_per_request": s["maxImagesPerRequest"],
            "max_prompt_chars": s["maxPromptChars"], "upscale_factors": s["upscaleFactors"],
            "num_gpus": s["gpusPerReplica"], "num_cpus": s["cpusPerReplica"],
            "max_ongoing_requests": s["maxOngoingRequests"], "max_queued_requests": s["maxQueuedRequests"]}
    if not s["autoscaling"]["enabled"]:
        args["num_replicas"] = s["numReplicas"]
    if s["decoder"]:
        args["decoder"] = s["decoder"]
    vs = s["videoStore"]
    if vs["uri"]:
        args["video_store"] = vs["uri"]
    args |= {"video_store_max_jobs": vs["maxJobs"], "video_store_ttl_s": vs["ttlS"],
             "video_job_timeout_s": vs["jobTimeoutS"]}
    expected = serve_config(args, name=s["appName"], route_prefix=s["routePrefix"], working_dir=s["workingDir"] or None)
    if s["autoscaling"]["enabled"]:
        a = s["autoscaling"]
        expected["applications"][0]["deployments"] = [{"name": "TDMGenerator", "autoscaling_config": {
            "min_replicas": a["minReplicas"], "max_replicas": a["maxReplicas"],
            "target_ongoing_requests": a["targetOngoingRequests"]}}]
    return expected


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_is_what_tdm_builds(chart, scenario):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from tdm.serve import ServeConfig, build_app

    v = values_of(scenario)
    rs = one(objects(chart, scenario), "RayService")
    assert rs["metadata"]["name"] == (v["serve"]["name"] or f"{RELEASE}-serve")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert config == _expected_serve_config(v)
    # Ray's own schema (it accepts unknown keys, so the allow-lists below check the names)
    ServeDeploySchema.model_validate(config)
    assert set(config) == {"applications"}
    (app,) = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "tdm.serve:build_app"
    assert set(app["args"]) <= set(ServeConfig.model_fields) | BUILD_APP_EXTRAS
    for dep in app.get("deployments", []):
        assert dep["name"] in ("TDMGenerator", "TDMIngress")
        assert set(dep) <= set(DeploymentSchema.model_fields)
        assert set(dep.get("autoscaling_config", {})) <= set(AutoscalingConfig.model_fields)
        assert "num_replicas" not in dep
    assert ("num_replicas" in app["args"]) != bool(app.get("deployments"))
    # the application builder accepts the args (ServeConfig forbids unknown keys)
    build_app(app["args"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_cluster_matches_the_deployment(chart, scenario):
    s = values_of(scenario)["serve"]
    spec = one(objects(chart, scenario), "RayService")["spec"]
    assert spec["upgradeStrategy"] == {"type": s["upgradeStrategy"]}
    cluster = spec["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    a = s["autoscaling"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    if a["enabled"]:
        assert cluster["enableInTreeAutoscaling"] is True
        assert (group["minReplicas"], group["maxReplicas"]) == (a["minReplicas"], a["maxReplicas"])
        assert head["automountServiceAccountToken"] is True           # the autoscaler sidecar talks to the API
        assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    else:
        assert cluster["enableInTreeAutoscaling"] is False
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == s["numReplicas"]
        assert head["automountServiceAccountToken"] is False
    (worker,) = group["template"]["spec"]["containers"]
    assert {"containerPort": s["port"], "name": "serve"} in worker["ports"]
    gpus = worker["resources"]["limits"].get("nvidia.com/gpu", 0)
    assert gpus == (1 if s["gpusPerReplica"] else 0)
    env = env_of(worker)
    assert ("PYTHONPATH" in env) == (not s["workingDir"])
    # an S3 decoder is downloaded by the replicas: they need the credentials, and only then
    assert ("AWS_SECRET_ACCESS_KEY" in env) == s["decoder"].startswith("s3://")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_mlflow_server(chart, scenario):
    v = values_of(scenario)
    objs = objects(chart, scenario)
    if not v["mlflow"]["enabled"]:
        assert not [o for o in objs if o["kind"] in ("Deployment", "Service")]
        return
    dep, svc = one(objs, "Deployment"), one(objs, "Service")
    name = f"{RELEASE}-mlflow"
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == name
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    cmd = c["command"] + c["args"]
    assert cmd[:6] == ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
    flags = dict(zip(cmd[2::1], cmd[3::1]))
    assert flags["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert flags["--artifacts-destination"] == f"s3://{v['s3']['bucket']}/mlflow"
    assert "--serve-artifacts" in cmd
    hosts = flags["--allowed-hosts"].split(",")
    assert {name, f"{name}:5000", f"{name}.{NAMESPACE}.svc:5000", "localhost:*"} <= set(hosts)
    env = env_of(c)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "tdm-mlflow-db", "key": "uri"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == v["s3"]["credentialsSecret"]["name"]
    assert ("MLFLOW_S3_ENDPOINT_URL" in env) == bool(v["s3"]["endpointUrl"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert svc["spec"]["ports"][0]["port"] == 5000 and svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_network_policies(chart, scenario):
    v = values_of(scenario)
    objs = objects(chart, scenario)
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    serve = policies[f"{RELEASE}-ray-serve"]
    assert any(r.get("ports") == [{"port": 8000, "protocol": "TCP"}] and "from" not in r for r in serve["ingress"])
    for name in (f"{RELEASE}-ray-distill", f"{RELEASE}-ray-serve"):
        egress_ports = {p["port"] for r in policies[name]["egress"] for p in r.get("ports", [])}
        assert 53 in egress_ports and 443 in egress_ports
        assert (5000 in egress_ports) or not v["mlflow"]["enabled"]
        if v["s3"]["endpointUrl"]:
            assert 9000 in egress_ports
        # the autoscaler sidecar reaches the API server
        assert (6443 in egress_ports) == (name.endswith("serve") and v["serve"]["autoscaling"]["enabled"])
    submitter = policies[f"{RELEASE}-distill-submitter"]
    assert "ingress" not in submitter and submitter["policyTypes"] == ["Ingress", "Egress"]
    if v["mlflow"]["enabled"]:
        (rule,) = policies[f"{RELEASE}-mlflow"]["ingress"]
        assert rule["ports"] == [{"port": 5000, "protocol": "TCP"}]
    # every Ray pod is selected by a policy of its own cluster
    for o in objs:
        if o["kind"] in ("RayJob", "RayService"):
            cluster = o["spec"].get("rayClusterSpec") or o["spec"]["rayClusterConfig"]
            labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
            assert any(p["podSelector"]["matchLabels"].items() <= labels.items()
                       for p in policies.values() if "matchLabels" in p["podSelector"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_literal_credentials(chart, scenario):
    assert credential_problems(render(chart, scenario), objects(chart, scenario)) == []


BAD_VALUES = {
    "negative workers": ({"distill": {"train": {"numWorkers": -1}}},
                         "'/distill/train/numWorkers': minimum: got -1, want 1"),
    "zero workers": ({"distill": {"train": {"numWorkers": 0}}}, "'/distill/train/numWorkers': minimum"),
    "negative serve replicas": ({"serve": {"numReplicas": -2}}, "'/serve/numReplicas': minimum: got -2"),
    "negative autoscaling replicas": ({"serve": {"autoscaling": {"minReplicas": -1}}},
                                      "'/serve/autoscaling/minReplicas': minimum"),
    "negative mlflow replicas": ({"mlflow": {"replicas": -1}}, "'/mlflow/replicas': minimum"),
    "negative backoffLimit": ({"distill": {"job": {"backoffLimit": -1}}}, "'/distill/job/backoffLimit': minimum"),
    "unknown key": ({"distill": {"train": {"numWorker": 2}}}, "additional properties 'numWorker' not allowed"),
    "bad enum": ({"distill": {"train": {"mixedPrecision": "fp8"}}}, "'/distill/train/mixedPrecision'"),
    "interactive mode": ({"distill": {"job": {"submissionMode": "InteractiveMode"}}},
                         "'/distill/job/submissionMode'"),
    "GPU training without a GPU image": ({"distill": {"train": {"useGpu": True}}},
                                         "distill.train.useGpu is true but gpuImage.repository is empty"),
    "GPU serving without a GPU image": ({"serve": {"gpusPerReplica": 1}},
                                        "serve.gpusPerReplica is 1 but gpuImage.repository is empty"),
    "S3 storage without a Secret": (
        {"distill": {"storage": {"type": "s3"}}, "s3": {"credentialsSecret": {"name": ""}},
         "mlflow": {"enabled": False, "externalUri": "https://mlflow.example.com"}},
        "'/s3/credentialsSecret/name': minLength: got 0, want 1"),
    "S3 storage without a bucket": (
        {"distill": {"storage": {"type": "s3"}}, "s3": {"bucket": ""},
         "mlflow": {"enabled": False, "externalUri": "https://mlflow.example.com"}},
        "'/s3/bucket': minLength: got 0, want 1"),
    "MLflow server without a database Secret": ({"mlflow": {"backendStore": {"secretName": ""}}},
                                                "'/mlflow/backendStore/secretName': minLength: got 0, want 1"),
    "MLflow server without an S3 Secret": ({"s3": {"credentialsSecret": {"name": ""}}},
                                           "'/s3/credentialsSecret/name': minLength: got 0, want 1"),
    "external MLflow without a URI": ({"mlflow": {"enabled": False}}, "'/mlflow/externalUri': minLength"),
    "S3 prompts without a Secret": (
        {"distill": {"prompts": {"source": "s3://b/prompts.txt"}}, "s3": {"credentialsSecret": {"name": ""}},
         "mlflow": {"enabled": False, "externalUri": "https://mlflow.example.com"}},
        "s3://b/prompts.txt is on S3 but s3.credentialsSecret.name is empty"),
    "RayJob name too long": ({"fullnameOverride": "a" * 40},
                             f'RayJob name "{"a" * 40}-distill" is 48 characters; KubeRay allows at most 47'),
    "explicit RayJob name too long": ({"distill": {"jobName": "j" * 48}}, "KubeRay allows at most 47"),
    "RayService name too long": ({"distill": {"enabled": False}, "serve": {"name": "s" * 50}},
                                 f'RayService name "{"s" * 50}" is 50 characters; KubeRay allows at most 47'),
    "mixed precision on CPU": ({"distill": {"train": {"mixedPrecision": "bf16"}}},
                               "distill.train.mixedPrecision=bf16 needs distill.train.useGpu=true"),
    "batch not divisible": ({"distill": {"train": {"numWorkers": 3}}},
                            "distill.train.batchSize (64) must be divisible by"),
    "real teacher without CLIP": ({"distill": {"teacher": {"uri": "stable-diffusion-v1-5/stable-diffusion-v1-5"}}},
                                  "distill.eval.clipModel is required"),
    "autoscaling min > max": ({"serve": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
                              "serve.autoscaling.minReplicas (5) must not exceed serve.autoscaling.maxReplicas (2)"),
    "local serve working_dir": ({"serve": {"workingDir": "/app"}}, "'/serve/workingDir'"),
    "registered model as decoder": ({"serve": {"decoder": "models:/taesd@champion"}},
                                    "serve.decoder models:/taesd@champion is a registered model"),
    "S3 decoder without a Secret": (
        {"distill": {"enabled": False}, "serve": {"decoder": "s3://b/taesd/"},
         "s3": {"credentialsSecret": {"name": ""}},
         "mlflow": {"enabled": False, "externalUri": "https://mlflow.example.com"}},
        "serve.decoder s3://b/taesd/ is on S3 but s3.credentialsSecret.name is empty"),
    "decoder with spaces": ({"serve": {"decoder": "madebyollin/ taesd"}}, "'/serve/decoder'"),
    "extraArgs overriding a chart-set flag": ({"distill": {"extraArgs": {"train.storage_path": "/tmp"}}},
                                          "distill.extraArgs.train.storage_path is set by the chart"),
    "non-root user 0": ({"securityContext": {"runAsUser": 0}}, "'/securityContext/runAsUser': minimum"),
    # the serve options' bounds are ServeConfig's (tdm/serve/config.py)
    "upscale factor 0": ({"serve": {"upscaleFactors": [1, 0]}}, "'/serve/upscaleFactors/1': minimum"),
    "upscale factor twice": ({"serve": {"upscaleFactors": [2, 2]}}, "'/serve/upscaleFactors'"),
    "poll interval beyond a day": ({"serve": {"pollIntervalS": 1e9}}, "'/serve/pollIntervalS': maximum"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_fail_with_a_clear_message(chart, case):
    values, message = BAD_VALUES[case]
    with pytest.raises(helm.HelmError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert message in str(info.value)


def test_name_limit_boundary(chart):
    ok = chart.render({"distill": {"jobName": "j" * RAY_NAME_MAX}}, name=RELEASE, namespace=NAMESPACE)
    assert f"name: {'j' * RAY_NAME_MAX}\n" in ok["tdm/templates/rayjob-distill.yaml"]
    with pytest.raises(helm.HelmError, match="at most 47"):
        chart.render({"distill": {"jobName": "j" * (RAY_NAME_MAX + 1)}}, name=RELEASE, namespace=NAMESPACE)


def test_entrypoint_quotes_shell_metacharacters(chart):
    """Values reach the job's shell safely: a prompt column with spaces and quotes stays one word."""
    column = "it's a \"caption\"; rm -rf /"
    out = chart.render({"distill": {"prompts": {"source": "/data/prompts.jsonl", "column": column}}},
                       name=RELEASE, namespace=NAMESPACE)
    rayjob = yaml.safe_load(out["tdm/templates/rayjob-distill.yaml"])
    argv = distill_argv(rayjob)
    assert argv[argv.index("--data.prompt_column") + 1] == column


def test_s3_endpoint_can_come_from_the_secret(chart):
    values = {"s3": {"endpointUrl": "http://ignored:9000",
                     "credentialsSecret": {"name": "minio-creds", "endpointUrlKey": "endpoint"}},
              "distill": {"storage": {"type": "s3"}}}
    objs = [doc for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE).items()
            if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]
    ref = {"secretKeyRef": {"name": "minio-creds", "key": "endpoint"}}
    head = one(objs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert env_of(head)["AWS_ENDPOINT_URL"]["valueFrom"] == ref
    (mlflow,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert env_of(mlflow)["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"] == ref
    assert env_of(mlflow)["AWS_ENDPOINT_URL"]["valueFrom"] == ref
    assert "ignored" not in "".join(chart.render(values, name=RELEASE, namespace=NAMESPACE).values())


def test_the_example_values_files_are_checked():
    assert {f.stem for f in EXAMPLES} >= {"video-wan", "video-toy"}
    wan = values_of("example:video-wan")
    assert wan["distill"]["preset"] == "wan2.1-t2v-1.3b-tdm" and wan["serve"]["videoStore"]["uri"].startswith("s3://")
