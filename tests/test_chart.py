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
BUILD_APP_EXTRAS = {"num_replicas", "num_gpus", "num_cpus"}
API_KEYS_DIR, API_KEYS_FILE = "/etc/tdm/api-keys", "/etc/tdm/api-keys/keys"

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
                  "decoder": "madebyollin/taesd", "dtype": "bfloat16", "batchInvariant": True,
                  "modelCacheVersions": 2, "loadRetry": {"initialS": 0.5, "maxS": 600}},
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
                  "workingDir": "s3://tdm/code/tdm-0.1.0.zip", "maxBatchSize": 16, "maxQueuedRequests": 1000,
                  "upscaleFactors": [1, 4], "upgradeStrategy": "None", "maxBodyBytes": 1 << 20,
                  "requestTimeoutS": 60.5, "enableDocs": True},
        "networkPolicy": {"serve": {"allowAll": True}},
    },
    # API keys from a Secret (mounted as a file), autoscaling so the head and the workers both carry it
    "auth": {
        "serve": {"auth": {"existingSecret": "tdm-api-keys", "secretKey": "keys.txt"},
                  "autoscaling": {"enabled": True, "maxReplicas": 2}},
        "networkPolicy": {"serve": {"sameNamespace": False,
                                    "ingressController": {"namespaceSelector": {"matchLabels": {
                                        "kubernetes.io/metadata.name": "traefik"}},
                                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}},
                                    "extraFrom": [{"ipBlock": {"cidr": "10.8.0.0/16"}}]}},
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
            "max_body_bytes": s["maxBodyBytes"], "request_timeout_s": s["requestTimeoutS"],
            "body_timeout_s": s["bodyTimeoutS"],
            "batch_invariant": s["batchInvariant"], "dtype": s["dtype"],
            "model_cache_versions": s["modelCacheVersions"], "enable_docs": s["enableDocs"],
            "load_retry_initial_s": s["loadRetry"]["initialS"], "load_retry_max_s": s["loadRetry"]["maxS"],
            "num_gpus": s["gpusPerReplica"], "num_cpus": s["cpusPerReplica"],
            "max_queued_requests": s["maxQueuedRequests"]}
    if s["auth"]["existingSecret"]:             # the Secret's keys as a file; no key configured = 401
        args |= {"api_keys_file": API_KEYS_FILE, "require_api_key": True}
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
    # every ServeConfig option the chart sets is valid there (unknown keys are errors) ...
    cfg = ServeConfig.model_validate({k: a for k, a in app["args"].items() if k not in BUILD_APP_EXTRAS})
    assert cfg.require_api_key == bool(v["serve"]["auth"]["existingSecret"])
    assert cfg.api_keys_file == (API_KEYS_FILE if v["serve"]["auth"]["existingSecret"] else None)
    # ... and the application builder accepts the args
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


def expected_serve_sources(values: dict) -> list[dict] | None:
    """The peers networkPolicy.serve admits to the serve port; None = anyone (allowAll)."""
    n = values["networkPolicy"]["serve"]
    if n["allowAll"]:
        return None
    peers = [{"podSelector": {}}] if n["sameNamespace"] else []
    ic = n["ingressController"]
    if ic["enabled"]:
        peers.append({"namespaceSelector": ic["namespaceSelector"] or {}, "podSelector": ic["podSelector"] or {}})
    return peers + n["extraFrom"]


def serve_port_rules(policy: dict, port: int = 8000) -> list[dict]:
    """The ingress rules of a policy that open the serve port."""
    return [r for r in policy["ingress"] if {"port": port, "protocol": "TCP"} in r.get("ports", [])]


def render_objects(chart, values: dict) -> list[dict]:
    return [doc for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True).items()
            if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def serve_policy(objs: list[dict]) -> dict:
    (policy,) = [o["spec"] for o in objs
                 if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == f"{RELEASE}-ray-serve"]
    return policy


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_network_policies(chart, scenario):
    v = values_of(scenario)
    objs = objects(chart, scenario)
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    serve = policies[f"{RELEASE}-ray-serve"]
    # the serve port admits exactly networkPolicy.serve's sources (a rule without `from` admits anyone)
    (rule,) = serve_port_rules(serve)
    sources = expected_serve_sources(v)
    assert rule == ({"ports": [{"port": 8000, "protocol": "TCP"}]} if sources is None else
                    {"ports": [{"port": 8000, "protocol": "TCP"}], "from": sources})
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


def test_serve_port_admits_the_namespace_and_the_ingress_controller_by_default(chart):
    (rule,) = serve_port_rules(serve_policy(objects(chart, "default")))
    assert rule["from"] == [
        {"podSelector": {}},                 # every pod of the release namespace (no namespaceSelector)
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}]
    # the other ingress rules are the cluster's own pods and the KubeRay operator, on their ports only
    others = [r for r in serve_policy(objects(chart, "default"))["ingress"] if r is not rule]
    assert all("from" in r and r["from"] for r in others)


@pytest.mark.parametrize("override, expected", [
    ({"allowAll": True}, None),
    ({"allowAll": True, "extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}, None),
    ({"sameNamespace": False}, [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}]),
    ({"ingressController": {"enabled": False}, "extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
     [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}]),
    ({"ingressController": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": None,
                                                                  "team": "edge"}},
                            "podSelector": None}},
     [{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"team": "edge"}}, "podSelector": {}}]),
    ({"sameNamespace": False, "ingressController": {"enabled": False}}, []),
])
def test_serve_port_sources_follow_the_values(chart, override, expected):
    objs = render_objects(chart, {"networkPolicy": {"serve": override}})
    rules = serve_port_rules(serve_policy(objs))
    if expected is None:                      # allowAll: one rule on the port, from anywhere
        assert rules == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    elif expected == []:                      # no source: no rule at all (an empty `from` would admit anyone)
        assert rules == []
    else:
        assert rules == [{"ports": [{"port": 8000, "protocol": "TCP"}], "from": expected}]
    for obj in ray_objects_last(objs):
        assert_valid(obj)


def _ray_containers(rayservice: dict):
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["containers"]:
            yield pod, c


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_api_keys_come_from_the_named_secret(chart, scenario):
    from tdm.serve import ServeConfig

    auth = values_of(scenario)["serve"]["auth"]
    rs = one(objects(chart, scenario), "RayService")
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    args = app["args"]
    containers = list(_ray_containers(rs))
    assert len(containers) == 2                                       # head and workers: replicas run on both
    for pod, c in containers:
        volumes = {vol["name"]: vol for vol in pod["volumes"]}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert "TDM_API_KEYS" not in env_of(c)                         # the file, not an env var (rotates live)
        if auth["existingSecret"]:
            assert volumes["api-keys"]["secret"] == {"secretName": auth["existingSecret"],
                                                     "items": [{"key": auth["secretKey"], "path": "keys"}],
                                                     "defaultMode": 0o440}
            assert "optional" not in volumes["api-keys"]["secret"]   # a missing Secret keeps the pod pending
            assert mounts["api-keys"] == {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}
            assert "subPath" not in mounts["api-keys"]               # a subPath mount never sees updates
        else:
            assert "api-keys" not in volumes and "api-keys" not in mounts
    if auth["existingSecret"]:
        assert (args["api_keys_file"], args["require_api_key"]) == (API_KEYS_FILE, True)
        cfg = ServeConfig.model_validate({k: a for k, a in args.items() if k not in BUILD_APP_EXTRAS})
        assert cfg.api_keys_file == API_KEYS_FILE and cfg.require_api_key is True
    else:
        assert "api_keys_file" not in args and "require_api_key" not in args


def test_api_keys_secret_is_only_in_the_serve_cluster(chart):
    objs = objects(chart, "auth")
    for o in objs:
        if o["kind"] != "RayService":
            assert "tdm-api-keys" not in yaml.safe_dump(o), f"{o['kind']}/{o['metadata']['name']}"


def notes(chart, scenario: str) -> str:
    (text,) = [t for path, t in render(chart, scenario).items() if path.endswith("NOTES.txt")]
    return text


def test_notes_explain_auth(chart):
    open_ = notes(chart, "default")
    assert "WARNING: no API keys (serve.auth.existingSecret is empty)" in open_
    assert "whoever networkPolicy.serve admits" in open_ and f"every pod in namespace {NAMESPACE}" in open_
    assert "ingress-nginx" in open_
    create = "create secret generic tdm-api-keys --from-literal=api-keys=$(openssl rand -hex 32)"
    assert f"kubectl -n {NAMESPACE} {create}" in open_
    assert "--set serve.auth.existingSecret=tdm-api-keys" in open_
    assert "Authorization" not in open_
    assert "anyone who can reach the pods (networkPolicy.serve.allowAll is true)" in notes(chart, "autoscaling")
    keyed = notes(chart, "auth")
    assert "WARNING" not in keyed
    assert '"Authorization: Bearer <key>"' in keyed and '-H "Authorization: Bearer $KEY"' in keyed
    assert "Secret\ntdm-api-keys, key keys.txt" in keyed and "commas or newlines" in keyed
    assert "jsonpath='{.data.keys\\.txt}'" in keyed                  # a dot in the key is escaped
    assert f"mounted at {API_KEYS_FILE}" in keyed and "no restart needed" in keyed
    assert "add the new key, move the clients to it, then remove the old one" in keyed
    assert 'create secret generic tdm-api-keys --from-literal=keys.txt="$OLD_KEY,$NEW_KEY"' in keyed


def test_serve_value_bounds_are_serveconfigs():
    """Every numeric or enumerated serve value the chart maps onto a ServeConfig field has that field's
    bounds in values.schema.json, so `helm install` refuses what the application would refuse."""
    import json

    from tdm.serve import ServeConfig

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["serve"]["properties"]
    fields = ServeConfig.model_json_schema()["properties"]
    mapping = {"pollIntervalS": "poll_interval_s", "maxBatchSize": "max_batch_size",
               "batchInvariant": "batch_invariant", "batchWaitTimeoutS": "batch_wait_timeout_s",
               "maxImagesPerRequest": "max_images_per_request", "maxPromptChars": "max_prompt_chars",
               "maxBodyBytes": "max_body_bytes", "requestTimeoutS": "request_timeout_s",
               "bodyTimeoutS": "body_timeout_s",
               "maxQueuedRequests": "max_queued_requests", "enableDocs": "enable_docs",
               "modelCacheVersions": "model_cache_versions", "dtype": "dtype",
               "loadRetry.initialS": "load_retry_initial_s", "loadRetry.maxS": "load_retry_max_s",
               "upscaleFactors": "upscale_factors", "videoStore.maxJobs": "video_store_max_jobs",
               "videoStore.ttlS": "video_store_ttl_s", "videoStore.jobTimeoutS": "video_job_timeout_s"}
    bound_keys = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "minItems")

    def bounds(node: dict) -> dict:
        out = {k: node[k] for k in bound_keys if k in node}
        if out.get("type") == "integer" or "enum" in out:
            out.pop("type", None)            # pydantic: "integer"; the enum says it all
        if "items" in node:
            out["items"] = bounds(node["items"])
        return out

    for value, field in mapping.items():
        node = schema
        *parents, leaf = value.split(".")
        for part in parents:
            node = node[part]["properties"]
        chart_bounds, app_bounds = bounds(node[leaf]), bounds(fields[field])
        if chart_bounds.get("type") == "number":
            chart_bounds.pop("type")
            assert app_bounds.pop("type") == "number", value
        assert chart_bounds == app_bounds, f"serve.{value} vs ServeConfig.{field}"
    # every ServeConfig field the chart sets from a value is in the mapping (the rest are set otherwise)
    args = set(yaml.safe_load(chart_default_serve_config())["applications"][0]["args"]) - BUILD_APP_EXTRAS
    assert args - set(mapping.values()) == {"model_uri", "tracking_uri"}


def chart_default_serve_config() -> str:
    c = helm.Chart.load(CHART)
    try:
        rs = c.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)["tdm/templates/rayservice.yaml"]
    finally:
        c.close()
    return yaml.safe_load(rs)["spec"]["serveConfigV2"]


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
    "prompt limit beyond ServeConfig's": ({"serve": {"maxPromptChars": 100_001}}, "'/serve/maxPromptChars': maximum"),
    "body limit below 1 KiB": ({"serve": {"maxBodyBytes": 1023}}, "'/serve/maxBodyBytes': minimum"),
    "body limit beyond 64 MiB": ({"serve": {"maxBodyBytes": 64 * 2**20 + 1}}, "'/serve/maxBodyBytes': maximum"),
    "request timeout 0": ({"serve": {"requestTimeoutS": 0}}, "'/serve/requestTimeoutS': exclusiveMinimum"),
    "body timeout 0": ({"serve": {"bodyTimeoutS": 0}}, "'/serve/bodyTimeoutS': exclusiveMinimum"),
    "request timeout beyond an hour": ({"serve": {"requestTimeoutS": 3601}}, "'/serve/requestTimeoutS': maximum"),
    "unbounded queue": ({"serve": {"maxQueuedRequests": -1}}, "'/serve/maxQueuedRequests': minimum"),
    "queue beyond 100000": ({"serve": {"maxQueuedRequests": 100_001}}, "'/serve/maxQueuedRequests': maximum"),
    "model cache of 0 versions": ({"serve": {"modelCacheVersions": 0}}, "'/serve/modelCacheVersions': minimum"),
    "model cache of 101 versions": ({"serve": {"modelCacheVersions": 101}}, "'/serve/modelCacheVersions': maximum"),
    "bad dtype": ({"serve": {"dtype": "fp8"}}, "'/serve/dtype'"),
    "batchInvariant not a boolean": ({"serve": {"batchInvariant": "yes"}}, "'/serve/batchInvariant'"),
    "load retry 0": ({"serve": {"loadRetry": {"initialS": 0}}}, "'/serve/loadRetry/initialS': exclusiveMinimum"),
    "load retry beyond an hour": ({"serve": {"loadRetry": {"initialS": 3601}}}, "'/serve/loadRetry/initialS': maximum"),
    "load retry max beyond a day": ({"serve": {"loadRetry": {"maxS": 86401}}}, "'/serve/loadRetry/maxS': maximum"),
    "maxOngoingRequests is gone": ({"serve": {"maxOngoingRequests": 64}},
                                   "additional properties 'maxOngoingRequests' not allowed"),
    "auth Secret not a DNS subdomain": ({"serve": {"auth": {"existingSecret": "Tdm_Keys"}}},
                                        "'/serve/auth/existingSecret'"),
    "auth Secret key with a slash": ({"serve": {"auth": {"existingSecret": "k", "secretKey": "a/b"}}},
                                     "'/serve/auth/secretKey'"),
    "auth Secret key empty": ({"serve": {"auth": {"existingSecret": "k", "secretKey": ""}}}, "'/serve/auth/secretKey'"),
    "unknown auth key": ({"serve": {"auth": {"insecureNoAuth": True}}}, "additional properties 'insecureNoAuth'"),
    # networkPolicy.serveFrom became networkPolicy.serve.{allowAll,sameNamespace,ingressController,extraFrom}
    "old serveFrom key": ({"networkPolicy": {"serveFrom": []}}, "additional properties 'serveFrom' not allowed"),
    "unknown networkPolicy.serve key": ({"networkPolicy": {"serve": {"from": []}}}, "additional properties 'from'"),
    "extraFrom not a list": ({"networkPolicy": {"serve": {"extraFrom": {"podSelector": {}}}}},
                             "'/networkPolicy/serve/extraFrom'"),
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
