"""The Helm chart charts/tdm, offline: rendered by Helm's own template engine (helm-python-sdk binds
the Helm v4 Go SDK; no helm binary, no cluster), every object validated (kubernetes-validate, strict,
for built-in kinds; the KubeRay v1.7 CRD schemas, made strict, for ray.io kinds; KubeRay controller
rules the schemas do not carry), the values mapped onto `pipelines/distill.py` flags and onto the
Serve config that `tdm.serve.serve_config` builds, the hardening (read-only root filesystems with sized
emptyDirs, ServiceAccounts, ephemeral storage, probes, egress, MLflow authentication) asserted on the
rendered objects, and bad values rejected with a clear message."""
import copy
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from k8s_helpers import (
    K8S_VERSION,
    RAY_NAME_MAX,
    assert_valid,
    crd_validator,
    credential_problems,
    ray_objects_last,
    wait_for_health,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "tdm"
RELEASE, NAMESPACE = "tdm", "ml"
BUILD_APP_EXTRAS = {"num_replicas", "num_gpus", "num_cpus"}
API_KEYS_DIR, API_KEYS_FILE = "/etc/tdm/api-keys", "/etc/tdm/api-keys/keys"

GPU_IMAGE = {"repository": "registry.example.com/tdm-cuda", "tag": "0.1.0-cu128"}
#: the API server's addresses, which serve.autoscaling needs in the egress policy
KUBE_API = {"kubernetesApi": {"cidrs": ["172.20.0.10/32"]}}
TMP, TDM_HOME = "/tmp", "/var/lib/tdm"

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
        "networkPolicy": {"serve": {"allowAll": True}, "egress": KUBE_API},
    },
    # API keys from a Secret (mounted as a file), autoscaling so the head and the workers both carry it
    "auth": {
        "serve": {"auth": {"existingSecret": "tdm-api-keys", "secretKey": "keys.txt"},
                  "autoscaling": {"enabled": True, "maxReplicas": 2}},
        "networkPolicy": {"serve": {"sameNamespace": False,
                                    "ingressController": {"namespaceSelector": {"matchLabels": {
                                        "kubernetes.io/metadata.name": "traefik"}},
                                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}},
                                    "extraFrom": [{"ipBlock": {"cidr": "10.8.0.0/16"}}]},
                          "egress": KUBE_API},
    },
    # every egress target opened, by CIDR and by peer; a serve route prefix (the readiness path follows)
    "egress": {
        "s3": {"endpointUrl": "http://minio.minio.svc:9000"},
        "distill": {"storage": {"type": "s3"}},
        "serve": {"routePrefix": "/tdm/"},
        "networkPolicy": {"egress": {
            "objectStore": {"cidrs": ["10.0.0.0/8"], "extraTo": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}]},
            "modelHub": {"cidrs": ["0.0.0.0/0"]},
            "database": {"extraTo": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}},
                                      "podSelector": {"matchLabels": {"app": "postgres"}}}]}}},
    },
    # MLflow without authentication: the plain `mlflow server` command, no credentials anywhere
    "no_mlflow_auth": {"mlflow": {"auth": {"enabled": False}}},
    # the distill pods on S3 with credentials of their own; MLflow keeps s3.credentialsSecret
    "checkpoint_credentials": {
        "s3": {"checkpointsCredentialsSecret": {"name": "tdm-checkpoints", "accessKeyIdKey": "id",
                                                "secretAccessKeyKey": "key"}},
        "distill": {"storage": {"type": "s3"}, "teacher": {"uri": "s3://tdm/teachers/sd15/"},
                    "eval": {"enabled": False}},
        "serve": {"decoder": "s3://tdm/decoders/taesd/"},
        "serviceAccount": {"annotations": {"team": "ml"},
                           "distill": {"name": "ckpt-writer",
                                       "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/ckpt"}}},
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
        if o["kind"] in ("Deployment", "Job"):
            yield f"{o['kind']}/{o['metadata']['name']}", spec["template"]["spec"]
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
    m = values_of(scenario)["mlflow"]
    assert ("Deployment" in kinds) == m["enabled"]
    assert ("Job" in kinds) == ("ConfigMap" in kinds) == (m["enabled"] and m["auth"]["enabled"])
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
        sa = next(o for o in objects(chart, "default") if o["kind"] == "ServiceAccount")
        kubernetes_validate.validate({**sa, "bogus": 1}, K8S_VERSION, strict=True)


def containers_of(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def autoscaler_of(objs: list[dict]) -> dict | None:
    """The autoscalerOptions of the RayService: KubeRay builds the head's autoscaler sidecar from them."""
    return one(objs, "RayService")["spec"]["rayClusterConfig"].get("autoscalerOptions")


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity(q) -> float:
    """A Kubernetes byte quantity (10Gi, 512Mi, 1G) in bytes."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and m.group(2) in _UNITS, q
    return float(m.group(1)) * _UNITS[m.group(2)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_is_locked_down_and_sized(chart, scenario):
    """Every container the chart renders (Ray heads and workers of both clusters, the submitter, MLflow, the
    bootstrap Job, and the autoscaler sidecar's options): non-root, no privilege escalation, ALL
    capabilities dropped, seccomp RuntimeDefault, a read-only root filesystem, and ephemeral-storage
    requested and limited like cpu and memory."""
    objs = objects(chart, scenario)
    pods = list(pod_specs(objs))
    assert len(pods) >= 5          # mlflow?, distill head/workers/submitter, serve head/workers
    m = values_of(scenario)["mlflow"]
    assert any(w.startswith("Job/") for w, _ in pods) == (m["enabled"] and m["auth"]["enabled"])
    containers = [(where, c) for where, pod in pods for c in containers_of(pod)]
    if autoscaler := autoscaler_of(objs):
        containers.append(("autoscalerOptions", autoscaler))
    for where, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] in (True, False), where
    for where, c in containers:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for kind in ("requests", "limits"):
            res = c["resources"][kind]
            assert {"cpu", "memory", "ephemeral-storage"} <= set(res), (where, kind)
            assert quantity(res["ephemeral-storage"]) > 0, (where, kind)
        assert quantity(c["resources"]["requests"]["ephemeral-storage"]) <= \
            quantity(c["resources"]["limits"]["ephemeral-storage"]), where


def _scratch(v: dict, where: str) -> dict[str, str]:
    """{mount path: sizeLimit} of the emptyDirs the values give a pod."""
    if where.startswith("Deployment/"):
        return {TMP: v["mlflow"]["scratch"]["tmp"]}
    if where.startswith("Job/"):
        return {TMP: v["mlflow"]["auth"]["bootstrap"]["scratch"]["tmp"]}
    if where == "RayJob submitter":
        return {TMP: v["distill"]["submitter"]["scratch"]["tmp"]}
    s = v["distill" if where.startswith("RayJob") else "serve"]["scratch"]
    return {TMP: s["tmp"], TDM_HOME: s["tdmHome"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_writable_space_is_sized_emptydirs(chart, scenario):
    """With the root filesystem read-only, each container writes only to emptyDirs of the configured sizes:
    /tmp everywhere (HOME, TMPDIR, the XDG and matplotlib caches and Ray's temp dir /tmp/ray point into it)
    and TDM_HOME (HF_HOME under it) in the Ray pods. No emptyDir without a sizeLimit, and a pod's disk
    emptyDirs fit in its containers' ephemeral-storage limits (the kubelet evicts on their sum)."""
    v = values_of(scenario)
    objs = objects(chart, scenario)
    for where, pod in pod_specs(objs):
        volumes = {vol["name"]: vol for vol in pod["volumes"]}
        empty = {n: vol["emptyDir"] for n, vol in volumes.items() if "emptyDir" in vol}
        assert all("sizeLimit" in e for e in empty.values()), where
        scratch = _scratch(v, where)
        ray = where.startswith(("RayJob", "RayService")) and "submitter" not in where
        for c in containers_of(pod):
            mounts = {mt["mountPath"]: mt for mt in c.get("volumeMounts", [])}
            for path, size in scratch.items():
                assert path in mounts and "subPath" not in mounts[path], (where, path)
                assert empty[mounts[path]["name"]] == {"sizeLimit": size}, (where, path)
            env = {k: e["value"] for k, e in env_of(c).items() if "value" in e}
            assert env["HOME"] == env["TMPDIR"] == TMP, where
            assert env["XDG_CACHE_HOME"].startswith(TMP + "/") and env["MPLCONFIGDIR"].startswith(TMP + "/"), where
            assert "RAY_TMPDIR" not in env, where          # Ray's temp dir: $TMPDIR/ray, in the /tmp emptyDir
            if ray:
                assert env["TDM_HOME"] == TDM_HOME and env["HF_HOME"].startswith(TDM_HOME + "/"), where
            else:
                assert "TDM_HOME" not in env, where
            # every writable mount is one of the pod's emptyDirs (/dev/shm in memory), the checkpoint
            # claim, or read-only
            for path, mt in mounts.items():
                vol = volumes[mt["name"]]
                assert "emptyDir" in vol or "persistentVolumeClaim" in vol or mt.get("readOnly"), (where, path)
        disk = sum(quantity(e["sizeLimit"]) for e in empty.values() if e.get("medium") != "Memory")
        limits = sum(quantity(c["resources"]["limits"]["ephemeral-storage"]) for c in pod["containers"])
        assert disk <= limits, f"{where}: emptyDirs {disk / 2**30:.1f}Gi > ephemeral-storage {limits / 2**30:.1f}Gi"


@pytest.mark.parametrize("scenario", ["autoscaling", "auth"])
def test_the_autoscaler_shares_one_sized_ray_log_dir(chart, scenario):
    """With the autoscaler KubeRay shares /tmp/ray between the head and its sidecar, adding an emptyDir of no
    size limit unless the head container mounts that path: the chart mounts the /tmp emptyDir's ray/
    directory there in both, so Ray's logs stay in the one sized volume."""
    objs = objects(chart, scenario)
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    ray_logs = {"name": "tmp", "mountPath": f"{TMP}/ray", "subPath": "ray"}
    assert ray_logs in container["volumeMounts"]
    options = cluster["autoscalerOptions"]
    assert options["volumeMounts"] == [{"name": "tmp", "mountPath": TMP}, ray_logs]
    assert env_of(options)["HOME"]["value"] == TMP
    assert options["resources"] == values_of(scenario)["serve"]["autoscaling"]["resources"]
    assert "ray-logs" not in {vol["name"] for vol in head["volumes"]}
    # without the autoscaler no such mount (KubeRay adds no log volume then)
    head = one(objects(chart, "default"), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert all(mt["mountPath"] != f"{TMP}/ray" for mt in head["template"]["spec"]["containers"][0]["volumeMounts"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_accounts_per_component_and_no_api_tokens(chart, scenario):
    """One ServiceAccount per component (distill, serve, mlflow, jobs = submitter + bootstrap), none with a
    token mounted; a pod mounts one only where it talks to the API: the serve head with the autoscaler
    (KubeRay binds its own autoscaler Role to that ServiceAccount). The chart renders no RBAC at all."""
    v = values_of(scenario)
    objs = objects(chart, scenario)
    sas = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
    assert all(sa["automountServiceAccountToken"] is False for sa in sas.values())
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    sa_values = v["serviceAccount"]
    expected = {c: sa_values[c]["name"] or f"{RELEASE}-{c}" for c in ("distill", "serve", "mlflow", "jobs")}
    if not v["mlflow"]["enabled"]:
        expected.pop("mlflow")
    if v["distill"]["job"]["submissionMode"] != "K8sJobMode" and not (v["mlflow"]["enabled"]
                                                                     and v["mlflow"]["auth"]["enabled"]):
        expected.pop("jobs")
    assert set(sas) == set(expected.values())
    for component, name in expected.items():
        annotations = {**sa_values["annotations"], **sa_values[component]["annotations"]}
        assert sas[name]["metadata"].get("annotations", {}) == annotations, name
    autoscaling = v["serve"]["autoscaling"]["enabled"]
    for where, pod in pod_specs(objs):
        component = ("mlflow" if where.startswith("Deployment/") else "jobs" if where.startswith("Job/")
                     or where.endswith("submitter") else "distill" if where.startswith("RayJob") else "serve")
        assert pod["serviceAccountName"] == expected[component], where
        assert pod["automountServiceAccountToken"] is (where == "RayService head" and autoscaling), where


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes(chart, scenario):
    """MLflow: startup, readiness and liveness on /health (open on the basic-auth app too). Serve workers:
    readiness on tdm's <routePrefix>/healthz through the Serve proxy on the serve port (200 only while a
    model is served), replacing KubeRay's injected one. Heads and the distill pods keep KubeRay's probes:
    the operator sends the Serve config only once the head is ready, so that must not wait for a model."""
    v = values_of(scenario)
    objs = objects(chart, scenario)
    if v["mlflow"]["enabled"]:
        (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    prefix = v["serve"]["routePrefix"].rstrip("/")
    for where, pod in pod_specs(objs):
        for c in pod["containers"]:
            if where.startswith("RayService worker"):
                assert c["readinessProbe"]["httpGet"] == {"path": f"{prefix}/healthz", "port": "serve"}, where
                assert {"containerPort": v["serve"]["port"], "name": "serve"} in c["ports"]
                assert "livenessProbe" not in c, where          # KubeRay injects the raylet check
            elif where.startswith("Ray"):
                assert "readinessProbe" not in c and "livenessProbe" not in c, where


def secret_env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_reaches_a_command_line(chart, scenario):
    """No container passes a Secret's value on its command line: no `$(VAR)` reference (expanded by the
    kubelet into the pod's args, shown by `kubectl describe pod` and `ps`) to an env var from a Secret,
    and MLflow's database URI only in the environment (MLFLOW_BACKEND_STORE_URI, which MLflow reads)."""
    objs = objects(chart, scenario)
    containers = [c for _, pod in pod_specs(objs) for c in containers_of(pod)]
    for c in containers:
        words = c.get("command", []) + c.get("args", [])
        for name in secret_env_names(c):
            assert not any(f"$({name})" in w for w in words), (c["name"], name)
        assert "--backend-store-uri" not in words, c["name"]
    if values_of(scenario)["mlflow"]["enabled"]:
        (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
        assert env_of(c)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "tdm-mlflow-db",
                                                                                    "key": "uri"}
        # the start script reads it from its own environment at run time ("$VAR"), never the kubelet's $(VAR)
        refs = {m for w in c["command"] + c["args"] for m in re.findall(r"\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)", w)}
        assert not refs & set(env_of(c)), refs


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
    assert (cfg.train.strategy, cfg.train.placement_strategy, cfg.train.fsdp_cpu_offload, cfg.train.gpu_memory_gb,
            cfg.train.gradient_checkpointing_every) == \
        (t["strategy"], t["placementStrategy"], t["fsdpCpuOffload"], t["gpuMemoryGb"], t["gradientCheckpointingEvery"])
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
def test_nccl_settings_reach_every_ray_pod_of_the_job(chart, scenario):
    nccl = values_of(scenario)["distill"]["nccl"]
    spec = one(objects(chart, scenario), "RayJob")["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        env = {k: e.get("value") for k, e in env_of(pod["containers"][0]).items() if k.startswith("NCCL_")}
        assert env == {k: str(v) for k, v in nccl.items()}


def test_fsdp_multinode_example_renders_one_gpu_worker_pod_per_worker(chart):
    rayjob = one(objects(chart, "example:fsdp-multinode"), "RayJob")
    argv = distill_argv(rayjob)
    flags = dict(zip(argv[::2], argv[1::2]))
    assert (flags["--train.strategy"], flags["--train.placement_strategy"], flags["--train.num_workers"]) == \
        ("fsdp", "STRICT_SPREAD", "4")
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "1"


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
            # every S3 access of these pods (checkpoints, s3:// teacher) with s3.checkpointsCredentialsSecret
            # when it is set; MLflow's artifacts never need S3 keys here (the server proxies them)
            secret = (v["s3"]["checkpointsCredentialsSecret"] if v["s3"]["checkpointsCredentialsSecret"]["name"]
                      else v["s3"]["credentialsSecret"])
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
        assert not [o for o in objs if o["kind"] in ("Deployment", "Service", "Job", "ConfigMap")]
        return
    dep, svc = one(objs, "Deployment"), one(objs, "Service")
    name = f"{RELEASE}-mlflow"
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == name
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    auth = v["mlflow"]["auth"]
    args = c["args"]
    if auth["enabled"]:               # a shell writes the auth config, then execs the server with the args
        assert c["command"][:2] == ["/bin/sh", "-ec"] and c["command"][3:] == ["mlflow-server"]
        assert 'exec mlflow server --app-name basic-auth "$@"' in c["command"][2]
    else:
        assert c["command"] == ["mlflow", "server"]
    assert args[:4] == ["--host", "0.0.0.0", "--port", "5000"]
    flags = dict(zip(args, args[1:]))
    assert "--backend-store-uri" not in args          # MLflow reads MLFLOW_BACKEND_STORE_URI from the env
    assert flags["--artifacts-destination"] == f"s3://{v['s3']['bucket']}/mlflow"
    assert "--serve-artifacts" in args
    hosts = flags["--allowed-hosts"].split(",")
    assert {name, f"{name}:5000", f"{name}.{NAMESPACE}.svc:5000", "localhost:*"} <= set(hosts)
    env = env_of(c)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "tdm-mlflow-db", "key": "uri"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == v["s3"]["credentialsSecret"]["name"]
    assert ("MLFLOW_S3_ENDPOINT_URL" in env) == bool(v["s3"]["endpointUrl"])
    assert svc["spec"]["ports"][0]["port"] == 5000 and svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    admin = auth["adminSecret"]
    if auth["enabled"]:
        assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(f"{TMP}/")      # the emptyDir, mode 600
        assert "default_permission = READ" in c["command"][2]
        for var, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "usernameKey"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "passwordKey"),
                         ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flaskSecretKeyKey")):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": admin["name"], "key": admin[key]}, var
    else:
        assert not {k for k in env if k.startswith("MLFLOW_AUTH")} and "MLFLOW_FLASK_SERVER_SECRET_KEY" not in env
    # no object but the server and its bootstrap Job reads the admin Secret; no ConfigMap holds a credential
    for o in objs:
        if o["kind"] not in ("Deployment", "Job"):
            assert admin["name"] not in yaml.safe_dump(o), f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "ConfigMap":
            assert not re.search(r"(?i)(password|postgresql\S*://)\s*=", yaml.safe_dump(o))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_mlflow_credentials_by_role(chart, scenario):
    """mlflow.auth: the distill pods (they log, register and move the alias) carry the training user's
    credentials, the serve pods (they only read the model) the serving user's, both only from their Secrets
    (MLFLOW_TRACKING_USERNAME / _PASSWORD, which MLflow's client reads); the submitter needs none."""
    v = values_of(scenario)
    auth = v["mlflow"]["auth"]
    objs = objects(chart, scenario)
    for where, pod in pod_specs(objs):
        for c in pod["containers"]:
            env = env_of(c)
            role = ("trainingSecret" if where.startswith("RayJob") and "submitter" not in where
                    else "servingSecret" if where.startswith("RayService") else None)
            if role is None or not auth["enabled"]:
                if not where.startswith("Job/"):
                    assert "MLFLOW_TRACKING_PASSWORD" not in env, where
                continue
            secret = auth[role]
            assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == \
                {"name": secret["name"], "key": secret["usernameKey"]}, where
            assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
                {"name": secret["name"], "key": secret["passwordKey"]}, where
    other = {"trainingSecret": "servingSecret", "servingSecret": "trainingSecret"}
    for kind, role in (("RayJob", "trainingSecret"), ("RayService", "servingSecret")):
        if auth["enabled"]:
            assert auth[other[role]]["name"] not in yaml.safe_dump(one(objs, kind)), kind


def bootstrap_job(objs: list[dict]) -> dict:
    (job,) = [o for o in objs if o["kind"] == "Job"]
    return job


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_mlflow_bootstrap_job(chart, scenario):
    """A post-install/post-upgrade hook Job in the tdm image runs files/mlflow_bootstrap.py (from a ConfigMap,
    read-only) as the admin: the training and serving users from their Secrets, MANAGE for training on the
    experiment and the registered models the chart names (serve.modelName too: serving follows it)."""
    v = values_of(scenario)
    m = v["mlflow"]
    objs = objects(chart, scenario)
    if not (m["enabled"] and m["auth"]["enabled"]):
        assert not [o for o in objs if o["kind"] in ("Job", "ConfigMap")]
        return
    job = bootstrap_job(objs)
    assert job["metadata"]["annotations"] == {"helm.sh/hook": "post-install,post-upgrade",
                                              "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded"}
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == m["auth"]["bootstrap"]["backoffLimit"]
    (c,) = pod["containers"]
    assert c["image"] == "tdm:0.1.0"
    cmd = c["command"]
    assert cmd[:2] == ["python", "/etc/tdm/mlflow-bootstrap/mlflow_bootstrap.py"]
    pairs = list(zip(cmd[2::2], cmd[3::2]))
    assert ("--timeout-s", str(m["auth"]["bootstrap"]["timeoutS"])) in pairs
    assert [val for flag, val in pairs if flag == "--experiment"] == [v["distill"]["registry"]["experiment"]]
    assert [val for flag, val in pairs if flag == "--model"] == \
        list(dict.fromkeys([v["distill"]["registry"]["modelName"], v["serve"]["modelName"]]))
    env = env_of(c)
    assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:5000"
    admin = m["auth"]["adminSecret"]
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": admin["name"],
                                                                          "key": admin["passwordKey"]}
    for role, key in (("TRAINING", "trainingSecret"), ("SERVING", "servingSecret")):
        secret = m["auth"][key]
        assert env[f"TDM_{role}_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": secret["name"],
                                                                            "key": secret["passwordKey"]}
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert cm["data"]["mlflow_bootstrap.py"].rstrip() == (CHART / "files" / "mlflow_bootstrap.py").read_text().rstrip()
    script = {vol["name"]: vol for vol in pod["volumes"]}["script"]
    assert script["configMap"]["name"] == cm["metadata"]["name"]
    assert {"name": "script", "mountPath": "/etc/tdm/mlflow-bootstrap", "readOnly": True} in c["volumeMounts"]


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
    egress = v["networkPolicy"]["egress"]
    s3_open = bool(egress["objectStore"]["cidrs"] or egress["objectStore"]["extraTo"])
    for name in (f"{RELEASE}-ray-distill", f"{RELEASE}-ray-serve"):
        egress_ports = {p["port"] for r in policies[name]["egress"] for p in r.get("ports", [])}
        assert 53 in egress_ports
        assert (5000 in egress_ports) or not v["mlflow"]["enabled"]
        assert (443 in egress_ports) == (s3_open or bool(egress["modelHub"]["cidrs"] or egress["modelHub"]["extraTo"])
                                         or (not v["mlflow"]["enabled"] and bool(egress["externalMlflow"]["cidrs"]))
                                         or (name.endswith("serve") and v["serve"]["autoscaling"]["enabled"]))
        if v["s3"]["endpointUrl"] and s3_open:
            assert 9000 in egress_ports
        # the autoscaler sidecar reaches the API server
        assert (6443 in egress_ports) == (name.endswith("serve") and v["serve"]["autoscaling"]["enabled"])
    submitter = policies[f"{RELEASE}-distill-submitter"]
    assert "ingress" not in submitter and submitter["policyTypes"] == ["Ingress", "Egress"]
    if v["mlflow"]["enabled"]:
        (rule,) = policies[f"{RELEASE}-mlflow"]["ingress"]
        assert rule["ports"] == [{"port": 5000, "protocol": "TCP"}]
        (sources,) = [p["podSelector"]["matchExpressions"] for p in rule["from"] if "podSelector" in p]
        bootstrap = ["mlflow-bootstrap"] if v["mlflow"]["auth"]["enabled"] else []
        assert sources == [{"key": "app.kubernetes.io/component", "operator": "In",
                            "values": ["ray-distill", "ray-serve", *bootstrap]}]
        assert (f"{RELEASE}-mlflow-bootstrap" in policies) == v["mlflow"]["auth"]["enabled"]
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
    from tdm.serve.config import ServeResources

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["serve"]["properties"]
    fields = ServeConfig.model_json_schema()["properties"] | ServeResources.model_json_schema()["properties"]
    mapping = {"pollIntervalS": "poll_interval_s", "maxBatchSize": "max_batch_size",
               "batchInvariant": "batch_invariant", "batchWaitTimeoutS": "batch_wait_timeout_s",
               "maxImagesPerRequest": "max_images_per_request", "maxPromptChars": "max_prompt_chars",
               "maxBodyBytes": "max_body_bytes", "requestTimeoutS": "request_timeout_s",
               "bodyTimeoutS": "body_timeout_s",
               "maxQueuedRequests": "max_queued_requests", "enableDocs": "enable_docs",
               "modelCacheVersions": "model_cache_versions", "dtype": "dtype",
               "loadRetry.initialS": "load_retry_initial_s", "loadRetry.maxS": "load_retry_max_s",
               "upscaleFactors": "upscale_factors", "videoStore.maxJobs": "video_store_max_jobs",
               "videoStore.ttlS": "video_store_ttl_s", "videoStore.jobTimeoutS": "video_job_timeout_s",
               "numReplicas": "num_replicas", "gpusPerReplica": "num_gpus", "cpusPerReplica": "num_cpus"}
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
    args = set(yaml.safe_load(chart_default_serve_config())["applications"][0]["args"])
    assert args - set(mapping.values()) == {"model_uri", "tracking_uri"}
    assert BUILD_APP_EXTRAS == set(ServeResources.model_fields)


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
    # the hardening's values
    "autoscaling without the API server's egress": (
        {"serve": {"autoscaling": {"enabled": True}}},
        "serve.autoscaling.enabled: the KubeRay autoscaler sidecar talks to the Kubernetes API, which the network "
        "policy denies until you name it: set networkPolicy.egress.kubernetesApi.cidrs"),
    "one ServiceAccount name for all": ({"serviceAccount": {"name": "tdm"}},
                                        "additional properties 'name' not allowed"),
    "no ephemeral-storage limit": ({"distill": {"workers": {"resources": {"limits": {"ephemeral-storage": None}}}}},
                                   "missing property 'ephemeral-storage'"),
    "no ephemeral-storage request on MLflow": ({"mlflow": {"resources": {"requests": {"ephemeral-storage": None}}}},
                                               "missing property 'ephemeral-storage'"),
    "scratch size not a quantity": ({"serve": {"scratch": {"tmp": "lots"}}}, "'/serve/scratch/tmp'"),
    "scratch without a size": ({"distill": {"scratch": {"tdmHome": None}}}, "missing property 'tdmHome'"),
    "auth without the training Secret": ({"mlflow": {"auth": {"trainingSecret": {"name": ""}}}},
                                         "'/mlflow/auth/trainingSecret/name': minLength"),
    "auth without the serving Secret": ({"mlflow": {"auth": {"servingSecret": {"name": ""}}}},
                                        "'/mlflow/auth/servingSecret/name': minLength"),
    "auth server without the admin Secret": ({"mlflow": {"auth": {"adminSecret": {"name": ""}}}},
                                             "'/mlflow/auth/adminSecret/name': minLength"),
    "default permission is not a value": ({"mlflow": {"auth": {"defaultPermission": "EDIT"}}},
                                          "additional properties 'defaultPermission' not allowed"),
    "egress CIDRs not a list": ({"networkPolicy": {"egress": {"database": {"cidrs": "10.0.0.0/8"}}}},
                                "'/networkPolicy/egress/database/cidrs'"),
    "unknown egress key": ({"networkPolicy": {"egress": {"database": {"cidr": ["10.0.0.0/8"]}}}},
                           "additional properties 'cidr' not allowed"),
    "checkpoint Secret key empty": ({"s3": {"checkpointsCredentialsSecret": {"accessKeyIdKey": ""}}},
                                    "'/s3/checkpointsCredentialsSecret/accessKeyIdKey'"),
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


# ------------------------------------------------------------------------------------------ egress

def egress_rules(objs: list[dict]) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], rule) for o in objs if o["kind"] == "NetworkPolicy"
            for rule in o["spec"].get("egress", [])]


DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_egress_rule_names_its_destinations(chart, scenario):
    """A NetworkPolicy egress rule without `to` allows every destination: the chart renders none (a target
    of networkPolicy.egress without cidrs or extraTo gets no rule at all)."""
    for name, rule in egress_rules(objects(chart, scenario)):
        assert rule.get("to"), f"{name}: an egress rule without `to` ({rule})"


def test_default_egress_stays_in_the_cluster(chart):
    """With the default values no NetworkPolicy lets anything out of the cluster: no 0.0.0.0/0, no ipBlock at
    all. What remains is in-cluster: DNS (port 53 in any namespace), the pods of the same Ray cluster, the
    chart's MLflow, the distill head for the submitter."""
    objs = objects(chart, "default")
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert len(policies) == 5
    assert not any("0.0.0.0/0" in text for text in render(chart, "default").values())
    for name, rule in egress_rules(objs):
        for peer in rule["to"]:
            assert "ipBlock" not in peer, name
            if "namespaceSelector" in peer:                  # any namespace: only for DNS
                assert peer == {"namespaceSelector": {}} and rule["ports"] == DNS_PORTS, name
            else:                                          # a pod of this release, in its namespace
                labels = peer["podSelector"]["matchLabels"]
                assert labels["app.kubernetes.io/instance"] == RELEASE, name


#: target -> (extra values, the policies that get its rule)
EGRESS_TARGETS = {
    "objectStore": ({}, {"ray-distill", "ray-serve", "mlflow"}),
    "modelHub": ({}, {"ray-distill", "ray-serve"}),
    "database": ({}, {"mlflow"}),
    "externalMlflow": ({"mlflow": {"enabled": False, "externalUri": "https://mlflow.example.com"}},
                       {"ray-distill", "ray-serve"}),
    "kubernetesApi": ({"serve": {"autoscaling": {"enabled": True}}}, {"ray-serve"}),
}


@pytest.mark.parametrize("target", EGRESS_TARGETS)
def test_an_egress_target_opens_where_it_is_used(chart, target):
    """Setting one target's cidrs and extraTo renders them (ipBlocks, then the peers) on the target's ports
    in exactly the policies of the pods that use it; nothing else opens."""
    extra, users = EGRESS_TARGETS[target]
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "infra"}}}
    values = deep_merge(extra, {"networkPolicy": {"egress": {target: {"cidrs": ["192.0.2.0/24", "198.51.100.7/32"],
                                                                      "extraTo": [peer]}}}})
    objs = render_objects(chart, values)
    ports = [{"port": p, "protocol": "TCP"} for p in _defaults()["networkPolicy"]["egress"][target]["ports"]]
    expected = {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}, {"ipBlock": {"cidr": "198.51.100.7/32"}}, peer],
                "ports": ports}
    opened = {name.removeprefix(f"{RELEASE}-") for name, rule in egress_rules(objs) if rule == expected}
    assert opened == users
    ip_rules = [(name, rule) for name, rule in egress_rules(objs) if any("ipBlock" in p for p in rule["to"])]
    assert len(ip_rules) == len(users)
    for obj in ray_objects_last(objs):
        assert_valid(obj)


def test_the_s3_endpoint_port_joins_the_object_store_rule(chart):
    objs = objects(chart, "egress")
    rules = dict((name, rule) for name, rule in egress_rules(objs)
                 if {"ipBlock": {"cidr": "10.0.0.0/8"}} in rule["to"])
    assert set(rules) == {f"{RELEASE}-ray-distill", f"{RELEASE}-ray-serve", f"{RELEASE}-mlflow"}
    for rule in rules.values():
        assert rule["ports"] == [{"port": 443, "protocol": "TCP"}, {"port": 9000, "protocol": "TCP"}]
        assert rule["to"][1] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}
    (db,) = [rule for name, rule in egress_rules(objs) if name == f"{RELEASE}-mlflow"
             and {"port": 5432, "protocol": "TCP"} in rule.get("ports", [])]
    assert db["to"] == values_of("egress")["networkPolicy"]["egress"]["database"]["extraTo"]


def test_notes_name_the_closed_egress_targets(chart):
    assert "denied: objectStore, modelHub, database" in notes(chart, "default")
    assert "denied:" not in notes(chart, "egress")


# ------------------------------------------------------------------------ S3 credentials by component

def test_checkpoint_credentials_are_the_distill_pods_own(chart):
    """s3.checkpointsCredentialsSecret: the distill pods' every S3 access (checkpoints and the s3:// teacher:
    tdm reads one set of AWS_* variables) uses it; MLflow (artifacts) and the serve pods (an s3:// decoder)
    keep s3.credentialsSecret, which the distill pods never see."""
    objs = objects(chart, "checkpoint_credentials")
    for where, pod in pod_specs(objs):
        for c in pod["containers"]:
            env = env_of(c)
            if "AWS_ACCESS_KEY_ID" not in env:
                continue
            ref = env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
            expected = ({"name": "tdm-checkpoints", "key": "id"} if where.startswith("RayJob")
                        else {"name": "tdm-s3", "key": "AWS_ACCESS_KEY_ID"})
            assert ref == expected, where
    assert "tdm-s3" not in yaml.safe_dump(one(objs, "RayJob"))
    assert "tdm-checkpoints" not in yaml.safe_dump([o for o in objs if o["kind"] != "RayJob"])
    assert "create secret generic tdm-checkpoints" in notes(chart, "checkpoint_credentials")


# --------------------------------------------------------------------- MLflow authentication, for real

def _kubelet_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment with its secretKeyRefs resolved from `secrets` ({name: {key: value}})."""
    env = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = var["value"]
    return env


def _in_pod_tmp(env: dict[str, str], tmp: Path) -> dict[str, str]:
    """The pod's /tmp emptyDir played by a fresh directory; PATH is this venv's (the image's Python)."""
    out = {k: (str(tmp) + v[len(TMP):] if v == TMP or v.startswith(TMP + "/") else v) for k, v in env.items()}
    return {**out, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_auth_config_is_written_from_the_environment(chart, tmp_path):
    """The MLflow container's start script, run by /bin/sh with a stand-in `mlflow` that reads the auth
    config the way MLflow does (mlflow.server.auth.config.read_auth_config): default_permission and the
    database URI (with a '%' that configparser would otherwise reject) come through exactly, the admin comes
    from the environment, the file is private to its owner, and the arguments reach `mlflow server` as given."""
    objs = render_objects(chart, {})
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    uri = "postgresql+psycopg2://mlflow:p%40ss%word@pg.db.svc:5432/mlflow"
    secrets = {"tdm-mlflow-db": {"uri": uri}, "tdm-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "k"},
               "tdm-mlflow-admin": {"username": "root-user", "password": "an admin password", "flask-secret-key": "f"}}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mlflow"
    # mlflow/server/auth/config.py by its path: the package's __init__ needs Flask-WTF, the config reader not
    import mlflow

    config_py = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    fake.write_text(f"#!{sys.executable}\nCONFIG_PY = {str(config_py)!r}\n" + """import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("auth_config", CONFIG_PY)
config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config)
cfg = config.read_auth_config()
print(json.dumps({"argv": sys.argv[1:], "default_permission": cfg.default_permission,
                  "database_uri": cfg.database_uri, "admin": [cfg.admin_username, cfg.admin_password],
                  "mode": oct(os.stat(os.environ["MLFLOW_AUTH_CONFIG_PATH"]).st_mode & 0o777)}))
""")
    fake.chmod(0o755)
    env = _in_pod_tmp(_kubelet_env(c, secrets), tmp_path / "pod-tmp")
    (tmp_path / "pod-tmp").mkdir()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    out = subprocess.run(c["command"] + c["args"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["argv"] == ["server", "--app-name", "basic-auth", *c["args"]]
    assert got["database_uri"] == uri and got["default_permission"] == "READ"
    assert got["admin"] == ["root-user", "an admin password"]
    assert got["mode"] == "0o600"
    assert uri not in " ".join(c["command"] + c["args"])


@pytest.mark.slow
def test_rendered_mlflow_auth_and_bootstrap_give_each_role_its_rights(chart, tmp_path, monkeypatch):
    """The rendered MLflow container (its start script and `mlflow server --app-name basic-auth`, on SQLite
    here) and the rendered bootstrap Job's command against it, twice (idempotent): the training user may log
    a run in the experiment, register a version and move the alias; the serving user may read the alias but
    not move it, nor register a version; a wrong password is refused."""
    import flask_wtf  # noqa: F401 - mlflow's basic-auth app needs it (mlflow[auth], in the test extra and the image)
    from conftest import free_port
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    port = free_port()
    objs = render_objects(chart, {"mlflow": {"port": port, "workers": 1}})
    (server,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    (job,) = bootstrap_job(objs)["spec"]["template"]["spec"]["containers"]
    users = {"admin": ("root-user", "admin-password-123"), "training": ("trainer", "training-password-123"),
             "serving": ("server", "serving-password-123")}
    secrets = {"tdm-mlflow-db": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
               "tdm-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"},
               "tdm-mlflow-admin": {"username": users["admin"][0], "password": users["admin"][1],
                                    "flask-secret-key": "0123456789abcdef"},
               **{f"tdm-mlflow-{role}": dict(zip(("username", "password"), users[role]))
                  for role in ("training", "serving")}}
    pod_tmp = tmp_path / "pod-tmp"
    pod_tmp.mkdir()
    log = tmp_path / "mlflow.log"
    uri = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(server["command"] + server["args"],
                                env=_in_pod_tmp(_kubelet_env(server, secrets), pod_tmp),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(uri, proc, log, 180)
        job_env = _in_pod_tmp(_kubelet_env(job, secrets), pod_tmp)
        job_env["MLFLOW_TRACKING_URI"] = uri                     # the DNS stand-in
        script = str(CHART / "files" / "mlflow_bootstrap.py")
        argv = [sys.executable, script, *job["command"][2:]]
        for attempt in ("created", "updated"):
            ran = subprocess.run(argv, env=job_env, capture_output=True, text=True, timeout=120)
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert f"user trainer: {attempt}" in ran.stdout and f"user server: {attempt}" in ran.stdout
        assert "registered_model tdm-student: trainer MANAGE, server READ" in ran.stdout

        def as_user(role: str) -> MlflowClient:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", users[role][0])
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", users[role][1])
            return MlflowClient(uri)

        trainer = as_user("training")
        experiment = trainer.get_experiment_by_name("tdm")
        run = trainer.create_run(experiment.experiment_id)
        trainer.log_metric(run.info.run_id, "loss", 0.5)
        version = trainer.create_model_version("tdm-student", "s3://tdm/mlflow/model", tags={"by": "trainer"})
        trainer.set_registered_model_alias("tdm-student", "champion", version.version)
        server_client = as_user("serving")
        assert server_client.get_model_version_by_alias("tdm-student", "champion").version == version.version
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            server_client.set_registered_model_alias("tdm-student", "champion", "1")
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            server_client.create_model_version("tdm-student", "s3://elsewhere/model")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(MlflowException, match="401|Unauthorized|UNAUTHENTICATED"):
            MlflowClient(uri).get_registered_model("tdm-student")
        assert secrets["tdm-mlflow-db"]["uri"] not in " ".join(server["command"] + server["args"])
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
