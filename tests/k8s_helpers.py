"""Offline Kubernetes checks shared by test_chart.py (the Helm chart) and test_k8s_manifests.py (the plain
manifests in k8s/, generated from it): kubernetes-validate (strict) for built-in kinds, the KubeRay v1.7
CRD schemas made strict for ray.io kinds, KubeRay controller rules the schemas do not carry, and a scan
for literal credentials."""
import functools
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

#: where the KubeRay CRD schemas are (they cannot live in this repository): $TDM_KUBERAY_CRDS, default
#: ../shared/kuberay-crds beside the clone. README, "Quick start", says how to get them.
CRDS_ENV = "TDM_KUBERAY_CRDS"
#: set (as .ci/run does) to make missing schemas a failure instead of a skip
REQUIRE_CRDS_ENV = "TDM_REQUIRE_KUBERAY_CRDS"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
K8S_VERSION = "1.33"
RAY_NAME_MAX = 47            # KubeRay validation.go: RayJob / RayService names
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


# -------------------------------------------------------------------- KubeRay CRD schemas (strict)

def _strict(node):
    """openAPIV3Schema -> a JSON schema that rejects unknown fields (where the schema does not say they are kept)."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def kuberay_crds() -> Path:
    """The directory of the KubeRay CRD schemas; skips the calling test (fails it, with $TDM_REQUIRE_KUBERAY_CRDS
    set) when they are not there."""
    path = Path(os.environ.get(CRDS_ENV) or Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds")
    missing = [f for f in CRD_FILES if not (path / f).is_file()]
    if missing:
        message = (f"KubeRay CRD schemas not found: {path} has no {', '.join(missing)}; set {CRDS_ENV} to a "
                   f"directory holding them (README, Quick start)")
        if os.environ.get(REQUIRE_CRDS_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((kuberay_crds() / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def kuberay_rules(obj: dict) -> list[str]:
    """Controller rules (ray-operator/controllers/ray/utils/validation.go) the CRD schema lacks."""
    errors, name, spec = [], obj["metadata"]["name"], obj["spec"]
    if len(name) > RAY_NAME_MAX or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"name {name!r}: not a DNS-1035 label of at most {RAY_NAME_MAX} characters")
    if obj["kind"] == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes")
        if spec.get("shutdownAfterJobFinishes") and spec.get("deletionStrategy", {}).get("deletionRules"):
            errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            errors.append(f"submissionMode {spec.get('submissionMode')!r}")
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            errors.append("exactly one of rayClusterSpec and clusterSelector")
        if spec.get("backoffLimit") and spec.get("submissionMode") == "InteractiveMode":
            errors.append("backoffLimit is incompatible with InteractiveMode")
        if "submitterPodTemplate" in spec and spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            errors.append("submitterPodTemplate only applies to K8sJobMode")
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    for group in cluster["workerGroupSpecs"]:
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            errors.append(f"worker group {group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    return errors


def assert_valid(obj: dict) -> None:
    """One object, as the API server (built-in kinds) or the KubeRay operator (ray.io kinds) checks it. A
    ray.io object needs the CRD schemas (kuberay_crds): check it after everything else in a test."""
    assert obj["apiVersion"] and obj["metadata"]["name"]
    if obj["apiVersion"].startswith("ray.io/"):
        assert obj["apiVersion"] == "ray.io/v1"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in crd_validator(obj["kind"]).iter_errors(obj)]
        assert errors == [], f"{obj['kind']} violates the KubeRay CRD schema: {errors[:5]}"
        assert kuberay_rules(obj) == []
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------ literal credentials

_CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{20,}"),
    re.compile(r"://[^/\s:@'\"]+:[^/\s@'\"]+@"),                      # user:password@host in a URI
    re.compile(r"(?i)-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
SENSITIVE_ENV = re.compile(r"(?i)(secret|password|passwd|token|credential|access_key|backend_store_uri)")


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def credential_problems(texts: dict[str, str], objs: list[dict]) -> list[str]:
    """Literal credentials in rendered files {path: text} or their objects: secret-looking strings, Secret
    objects, and sensitive env vars that do not come from a secretKeyRef."""
    problems = [f"{path}: looks like a literal credential ({pattern.pattern})"
                for path, text in texts.items() for pattern in _CREDENTIAL_PATTERNS if pattern.search(text)]
    problems += [f"Secret {o['metadata']['name']}: the Secrets must be created outside the manifests"
                 for o in objs if o["kind"] == "Secret"]
    for obj in objs:
        for node in walk(obj):
            if "name" in node and ("value" in node or "valueFrom" in node) and SENSITIVE_ENV.search(node["name"]) \
                    and ("value" in node or "secretKeyRef" not in node["valueFrom"]):
                problems.append(f"{obj['kind']}: env {node['name']} must come from a Secret")
    return problems


def ray_objects_last(objs: list[dict]) -> list[dict]:
    """Objects in validation order: built-in kinds first, so they are checked even when the ray.io ones skip."""
    return sorted(objs, key=lambda o: str(o.get("apiVersion", "")).startswith("ray.io/"))


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def wait_for_health(uri: str, proc, log: Path, timeout_s: float) -> None:
    """Until `uri`/health answers 200 (an MLflow server started as `proc`, writing `log`); the test fails with
    the log's tail when the process exits or `timeout_s` passes."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not answer /health in {timeout_s:g}s\n{tail(log)}")
        time.sleep(0.5)
