"""The Kubernetes workflow driver (what `pipelines/workflow.py` calls): distil, promote, serve.

  tdm config + RayJob template -> create a RayJob (unique name; --name = the run name, so a retry
  resumes) -> follow its status until terminal -> find the student version the run registered in
  MLflow -> move registry.alias to it if its quality gate passed -> merge-patch the RayService's
  serveConfigV2 so the tdm app serves models:/<name>/<version> (an explicit version: declarative and
  auditable; KubeRay applies a serveConfigV2 change in place, without a new Ray cluster).

Everything that can be checked before the job runs is checked first (config, template, the RayService
and its tdm app, the MLflow store), so a misconfiguration never surfaces after hours of training.
The driver never deletes anything: a timed-out or interrupted follow leaves the RayJob running.

The job's config is layered like `pipelines/register.py` layers a checkpoint's config: the flags of the
template's own entrypoint (the deployment's settings, e.g. the chart's storage path on the checkpoint
volume and its registry names; its --name is dropped, every submission names its run), then
`--config FILE`, then `--section.field` flags.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from .cli import build_arg_parser, config_from_args
from .config import TDMConfig
from .console import log
from .errors import ConfigError, redact

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
RAY_NAME_MAX = 47                       # KubeRay validation.go: RayJob / RayService names
ENTRYPOINT = ("python", "pipelines/distill.py")
SERVE_IMPORT_PATH = "tdm.serve:build_app"
GATE_TAG = "gate.passed"                # model-version tag written by tdm.job.evaluate_and_register
RUN_NAME_ANNOTATION = "tdm/run-name"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 30
# Fields the API server owns: present when the template came from `kubectl get -o yaml`, rejected on create.
SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


class WorkflowError(RuntimeError):
    """A failure after the input was accepted: the job failed, the gate refused, an API call failed."""


class ApiUnavailable(WorkflowError):
    """The API server did not answer or answered 429/5xx: worth another try while following a job."""


# ---------------------------------------------------------------- config <-> entrypoint

def _flag_value(value: Any) -> str:
    """A config value as the tdm CLI parses it back (tdm.config._parse_value): sequences as JSON (safe
    for prompts with commas), None as 'none', scalars as JSON literals, strings verbatim."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def distill_entrypoint(cfg: TDMConfig) -> str:
    """`python pipelines/distill.py` + one shell-quoted `--key=value` per non-default field. The `=` form
    keeps values that start with '-' (a negative prompt, a negative number) from reading as flags."""
    defaults = TDMConfig().to_flat_dict()
    words = list(ENTRYPOINT)
    for key, value in cfg.to_flat_dict().items():
        if value != defaults[key]:
            words.append(f"--{key}={_flag_value(value)}")
    entry = shlex.join(words)
    parsed = parse_entrypoint(entry, "the generated entrypoint").to_flat_dict()
    lost = [key for key, value in cfg.to_flat_dict().items() if parsed[key] != value]
    if lost:    # e.g. an optional string field set to the text 'none'
        raise ConfigError(f"{', '.join(lost)}: the value does not survive the command line; change it")
    return entry


def parse_entrypoint(entrypoint: str, where: str) -> TDMConfig:
    """The config a `python pipelines/distill.py ...` entrypoint runs with: tdm's own parser and
    resolution, as in distill.py. Errors start with `where`."""
    words = shlex.split(entrypoint)
    if tuple(words[:2]) != ENTRYPOINT:
        raise ConfigError(f"{where}: entrypoint must start with '{' '.join(ENTRYPOINT)}', got {entrypoint[:80]!r}")
    parser = build_arg_parser("")
    parser.exit_on_error = False        # an exception, not SystemExit with usage text
    try:
        args, unknown = parser.parse_known_args(words[2:])
        if unknown:
            raise ConfigError(f"entrypoint has arguments tdm does not know: {' '.join(unknown)}")
        return config_from_args(args)
    except (argparse.ArgumentError, ConfigError) as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_config(args: argparse.Namespace, template: dict) -> TDMConfig:
    """Template entrypoint flags (minus --name), then --config FILE, then --section.field flags; a run
    without a name gets tdm's timestamped default here, so the entrypoint carries it."""
    base: dict = {}
    entry = template["spec"].get("entrypoint")
    if entry:
        base = parse_entrypoint(entry, "--rayjob").model_dump(mode="json", exclude={"name"})
    cfg = config_from_args(args, base)
    if cfg.name is None:
        cfg = cfg.model_copy(update={"name": time.strftime("tdm-%Y%m%d-%H%M%S")})
    return cfg


# ---------------------------------------------------------------- the RayJob

def load_rayjob_template(path: str) -> dict:
    """The one RayJob of a manifest file (`helm template` output or k8s/rayjob-distill.yaml)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--rayjob: file not found: {p}")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d]
    except yaml.YAMLError as e:
        raise ConfigError(f"--rayjob: {p} is not YAML: {e}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayJob"]
    if len(jobs) != 1:
        kinds = [d.get("kind") if isinstance(d, dict) else type(d).__name__ for d in docs]
        raise ConfigError(f"--rayjob: {p} must contain exactly one RayJob, found {len(jobs)} (kinds: {kinds})")
    job = jobs[0]
    if job.get("apiVersion") != f"{RAY_GROUP}/{RAY_VERSION}" or not isinstance(job.get("spec"), dict):
        raise ConfigError(f"--rayjob: {p}: expected apiVersion {RAY_GROUP}/{RAY_VERSION} with a spec, "
                          f"got {job.get('apiVersion')!r}")
    return job


def rayjob_name(run_name: str) -> str:
    """A DNS-1035 name of at most 47 characters, unique per submission: the run name plus a random suffix."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", run_name.lower())).strip("-")
    if not slug[:1].isalpha():
        slug = f"tdm-{slug}".rstrip("-")
    suffix = secrets.token_hex(3)
    return f"{slug[:RAY_NAME_MAX - len(suffix) - 1].rstrip('-')}-{suffix}"


def _size_workers(cluster: dict, cfg: TDMConfig) -> None:
    """One Ray Train worker per worker pod (the chart's layout): size a single worker group to
    train.num_workers, and refuse GPU training on a template without GPU workers."""
    groups = cluster.get("workerGroupSpecs") or []
    if len(groups) == 1:
        groups[0].update(replicas=cfg.train.num_workers, minReplicas=cfg.train.num_workers,
                         maxReplicas=cfg.train.num_workers)
    if cfg.train.use_gpu:
        limits = [c.get("resources", {}).get("limits", {}) for g in groups for c in g["template"]["spec"]["containers"]]
        if not any(key.endswith("/gpu") for lim in limits for key in lim):
            raise ConfigError("train.use_gpu: the --rayjob template's worker pods request no GPU "
                              "(render the chart with distill.train.useGpu=true)")


def build_rayjob(template: dict, cfg: TDMConfig, namespace: str) -> dict:
    """The RayJob to create: the template with this run's entrypoint, a fresh name, the namespace and
    worker count, and without server-owned fields."""
    job = copy.deepcopy(template)
    job.pop("status", None)
    meta = job.setdefault("metadata", {})
    for key in SERVER_METADATA:
        meta.pop(key, None)
    meta.update(name=rayjob_name(cfg.name), namespace=namespace)
    meta.setdefault("annotations", {})[RUN_NAME_ANNOTATION] = cfg.name
    job["spec"]["entrypoint"] = distill_entrypoint(cfg)
    if "rayClusterSpec" in job["spec"]:
        _size_workers(job["spec"]["rayClusterSpec"], cfg)
    return job


# ---------------------------------------------------------------- Kubernetes

def kube_api(kubeconfig: str | None, context: str | None = None):
    """CustomObjectsApi from --kubeconfig, else $KUBECONFIG / ~/.kube/config, else (in a pod) the
    service account. Returns (api, where) with `where` naming the server and the source for errors."""
    from kubernetes import client, config

    conf = client.Configuration()
    in_pod = os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG")
    try:
        if kubeconfig is None and in_pod:
            config.load_incluster_config(client_configuration=conf)
            source = "in-cluster service account"
        else:
            if kubeconfig is not None and not Path(kubeconfig).is_file():
                raise ConfigError(f"--kubeconfig: file not found: {kubeconfig}")
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=conf)
            source = f"--kubeconfig {kubeconfig or os.environ.get('KUBECONFIG') or '~/.kube/config'}"
    except config.ConfigException as e:
        raise ConfigError(f"--kubeconfig: {e}") from None
    conf.retries = 1                      # fail within seconds on an unreachable server
    return client.CustomObjectsApi(client.ApiClient(conf)), f"{conf.host} ({source})"


class Cluster:
    """The ray.io/v1 objects of one namespace, with errors that say what failed and where."""

    def __init__(self, api, where: str, namespace: str):
        self.api, self.where, self.namespace = api, where, namespace

    def _call(self, action: str, method: str, plural: str, *args, **kwargs) -> dict:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return getattr(self.api, method)(RAY_GROUP, RAY_VERSION, self.namespace, plural, *args,
                                             _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except ApiException as e:
            try:
                detail = json.loads(e.body).get("message", e.body)
            except (TypeError, ValueError):
                detail = e.body or e.reason
            error = ApiUnavailable if e.status == 429 or e.status >= 500 else WorkflowError
            raise error(f"{action}: HTTP {e.status} {e.reason}: {detail}") from None
        except (HTTPError, OSError) as e:     # urllib3 gave up: refused, DNS, TLS, timeout
            raise ApiUnavailable(f"cannot reach the Kubernetes API server at {self.where}: "
                                f"{getattr(e, 'reason', None) or e}") from None

    def get(self, plural: str, name: str, action: str) -> dict:
        return self._call(action, "get_namespaced_custom_object", plural, name)

    def list(self, plural: str, action: str) -> list[dict]:
        return self._call(action, "list_namespaced_custom_object", plural)["items"]

    def create(self, plural: str, body: dict, action: str) -> dict:
        return self._call(action, "create_namespaced_custom_object", plural, body)

    def merge_patch(self, plural: str, name: str, body: dict, action: str) -> dict:
        return self._call(action, "patch_namespaced_custom_object", plural, name, body, _content_type=MERGE_PATCH)


TERMINAL = ("Complete", "Failed")       # status.jobDeploymentStatus; Retrying/Running/... are not final


def check_no_active_job(cluster: Cluster, run_name: str) -> None:
    """Refuse a second RayJob on a run whose earlier one still runs (e.g. after the driver was stopped):
    both would write the same checkpoints and MLflow run."""
    jobs = cluster.list("rayjobs", f"--namespace {cluster.namespace}: listing RayJobs")
    active = [j["metadata"]["name"] for j in jobs
              if (j["metadata"].get("annotations") or {}).get(RUN_NAME_ANNOTATION) == run_name
              and (j.get("status") or {}).get("jobDeploymentStatus") not in TERMINAL]
    if active:
        raise ConfigError(f"--name: run {run_name!r} already has an unfinished RayJob {', '.join(active)} in "
                          f"namespace {cluster.namespace}; wait for it or delete it before resubmitting")


def follow_rayjob(cluster: Cluster, name: str, timeout_s: float, poll_s: float) -> dict:
    """Poll a RayJob until its deployment status is terminal, printing every status transition.
    Returns the final object on SUCCEEDED; raises WorkflowError with KubeRay's message otherwise."""
    deadline, last = time.monotonic() + timeout_s, None
    t0 = time.monotonic()
    while True:
        try:
            job = cluster.get("rayjobs", name, f"--namespace {cluster.namespace}: reading RayJob {name}")
        except ApiUnavailable as e:     # a blip of the API server must not abandon a days-long job
            if time.monotonic() > deadline:
                raise
            log(f"RayJob {name}: status unavailable, polling again ({e})")
            time.sleep(poll_s)
            continue
        status = job.get("status") or {}
        state = (status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-")
        if state != last:
            log(f"RayJob {name}: {state[0]} / {state[1]} ({time.monotonic() - t0:.0f}s)")
            last = state
        if state[0] in TERMINAL:
            if state == ("Complete", "SUCCEEDED"):
                return job
            raise WorkflowError(
                f"RayJob {cluster.namespace}/{name} failed: jobDeploymentStatus={state[0]}, jobStatus={state[1]}, "
                f"reason={status.get('reason') or '-'}: {status.get('message') or 'no status message'} "
                f"(logs: kubectl -n {cluster.namespace} logs job/{name})")
        if time.monotonic() > deadline:
            raise WorkflowError(f"RayJob {cluster.namespace}/{name} not finished after {timeout_s:g}s (--timeout); "
                                f"it keeps running: kubectl -n {cluster.namespace} get rayjob {name}")
        time.sleep(poll_s)


# ---------------------------------------------------------------- the RayService's tdm app

def tdm_app(rayservice: dict) -> tuple[dict, dict]:
    """(serve config, its tdm application) from a RayService's spec.serveConfigV2 (a YAML string built
    like tdm.serve.serve_config). The tdm app is found by its import path, whatever its name."""
    name = rayservice.get("metadata", {}).get("name")
    try:
        serve_cfg = yaml.safe_load(rayservice.get("spec", {}).get("serveConfigV2") or "") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--rayservice: RayService {name}: spec.serveConfigV2 is not YAML: {e}") from None
    apps = serve_cfg.get("applications") if isinstance(serve_cfg, dict) else None
    apps = [a for a in apps or [] if isinstance(a, dict) and a.get("import_path") == SERVE_IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"--rayservice: RayService {name} must have exactly one application with import_path "
                          f"{SERVE_IMPORT_PATH} in spec.serveConfigV2, found {len(apps)}")
    return serve_cfg, apps[0]


def check_serves_model(rayservice: dict, model_name: str) -> None:
    """Refuse to repoint a RayService that serves another registered model than the run registers."""
    uri = (tdm_app(rayservice)[1].get("args") or {}).get("model_uri", "")
    served = re.split(r"[@/]", uri.removeprefix("models:/"))[0] if uri.startswith("models:/") else None
    if served is not None and served != model_name:
        raise ConfigError(f"--rayservice: {rayservice['metadata']['name']} serves {uri}, but the run registers "
                          f"registry.model_name={model_name}")


def serve_config_patch(rayservice: dict, model_uri: str) -> dict:
    """Merge patch setting the tdm app's args.model_uri. serveConfigV2 is one string, so the patch carries
    all of it; metadata.resourceVersion makes it conditional (409 instead of a lost concurrent edit)."""
    serve_cfg, app = tdm_app(rayservice)
    app.setdefault("args", {})["model_uri"] = model_uri
    return {"metadata": {"resourceVersion": rayservice["metadata"]["resourceVersion"]},
            "spec": {"serveConfigV2": yaml.safe_dump(serve_cfg, sort_keys=False)}}


# ---------------------------------------------------------------- MLflow

def check_tracking(tracking_uri: str) -> None:
    """Prove the MLflow store answers before the job runs (the driver needs it only at the end)."""
    from .preflight import tracking_problem
    from .tracking import use_tracking_uri

    problem = tracking_problem(use_tracking_uri(tracking_uri))
    if problem is not None:
        raise WorkflowError(f"--tracking-uri: {problem}")


def registered_version(cfg: TDMConfig, tracking_uri: str):
    """The newest version of registry.model_name registered by the run named cfg.name."""
    from mlflow import MlflowClient

    from .tracking import find_run, use_tracking_uri

    client = MlflowClient(use_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    run = find_run(exp.experiment_id, cfg.name) if exp else None
    if run is None:
        raise WorkflowError(f"no MLflow run named {cfg.name!r} in experiment {cfg.registry.experiment!r} at "
                            f"{redact(tracking_uri)} (--tracking-uri must be the store the job logs to)")
    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}' and run_id = '{run.info.run_id}'")
    if not versions:
        raise WorkflowError(f"run {cfg.name!r} (MLflow run {run.info.run_id}) registered no version of "
                            f"{cfg.registry.model_name}")
    return max(versions, key=lambda mv: int(mv.version))


def promote(cfg: TDMConfig, tracking_uri: str, force: bool = False):
    """Move registry.alias to the run's version if its quality gate passed (or --force). Returns it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mv = registered_version(cfg, tracking_uri)
    name, alias = cfg.registry.model_name, cfg.registry.alias
    passed = mv.tags.get(GATE_TAG) == "True"
    if not passed and not force:
        gate = {k: v for k, v in mv.tags.items() if k.startswith("gate.")}
        raise WorkflowError(f"{name} version {mv.version} (run {cfg.name}) did not pass the quality gate {gate}; "
                            f"not moving @{alias} (--force promotes it anyway)")
    client = MlflowClient(tracking_uri)
    if not passed:  # forced: the version says so (and when) before the alias moves
        client.set_model_version_tag(name, mv.version, "promotion.forced", "true")
        client.set_model_version_tag(name, mv.version, "promotion.forced_at", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()))
    try:
        before = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        before = None
    client.set_registered_model_alias(name, alias, mv.version)
    log(f"{name}@{alias}: {before or 'unset'} -> version {mv.version}"
        + ("" if passed else " (--force: the gate did not pass)"))
    return mv


def namespace_of(flag: str | None, template: dict) -> str:
    """--namespace, else the template's (plain manifests name one; `helm template` output does not)."""
    namespace = flag or template.get("metadata", {}).get("namespace")
    if not namespace:
        raise ConfigError("--namespace: required (the --rayjob template names none)")
    return namespace


def tracking_uri_of(flag: str | None, template: dict) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the job's own MLFLOW_TRACKING_URI (right when the
    driver runs in the cluster, e.g. as a pipeline step)."""
    if flag or os.environ.get("MLFLOW_TRACKING_URI"):
        return flag or os.environ["MLFLOW_TRACKING_URI"]
    head = template["spec"].get("rayClusterSpec", {}).get("headGroupSpec", {}).get("template", {})
    for container in head.get("spec", {}).get("containers", []):
        for env in container.get("env", []):
            if env.get("name") == "MLFLOW_TRACKING_URI" and env.get("value"):
                return env["value"]
    raise ConfigError("--tracking-uri: no MLflow tracking URI (set --tracking-uri or MLFLOW_TRACKING_URI)")


# ---------------------------------------------------------------- the workflow

def dry_run_documents(rayjob: dict, cfg: TDMConfig, rayservice: str, tracking_uri: str, timeout_s: float) -> list:
    """[the RayJob to create, the plan of the steps that follow]: what a real run would do, computed
    without a cluster or MLflow (the version exists only after the job)."""
    ns, job, model = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"], cfg.registry.model_name
    plan = {"workflow": {
        "dryRun": True,
        "runName": cfg.name,
        "create": {"apiVersion": rayjob["apiVersion"], "kind": "RayJob", "namespace": ns, "name": job},
        "follow": {"until": "status.jobDeploymentStatus Complete (jobStatus SUCCEEDED) or Failed",
                   "timeoutSeconds": timeout_s},
        "promote": {"trackingUri": redact(tracking_uri), "experiment": cfg.registry.experiment,
                    "version": f"newest version of {model} whose run_id is the run tagged tdm.run_name={cfg.name}",
                    "alias": cfg.registry.alias, "requires": f"model version tag {GATE_TAG}=True (or --force)"},
        "patch": {"apiVersion": f"{RAY_GROUP}/{RAY_VERSION}", "kind": "RayService", "namespace": ns,
                  "name": rayservice, "contentType": MERGE_PATCH, "field": "spec.serveConfigV2",
                  "set": {f"applications[import_path={SERVE_IMPORT_PATH}].args.model_uri":
                          f"models:/{model}/<version>"}},
    }}
    return [rayjob, plan]


def run_workflow(cfg: TDMConfig, rayjob: dict, cluster: Cluster, rayservice: str, tracking_uri: str,
                 timeout_s: float, poll_s: float, force: bool = False) -> dict:
    """Pre-flight checks, then submit -> follow -> promote -> patch. Returns a summary."""
    ns = cluster.namespace
    read_service = f"--rayservice: reading RayService {ns}/{rayservice}"
    check_serves_model(cluster.get("rayservices", rayservice, read_service), cfg.registry.model_name)
    check_no_active_job(cluster, cfg.name)
    check_tracking(tracking_uri)

    name = rayjob["metadata"]["name"]
    cluster.create("rayjobs", rayjob, f"--namespace {ns}: creating RayJob {name}")
    log(f"submitted RayJob {ns}/{name} (run {cfg.name}; to retry, run again with --name {cfg.name})")
    follow_rayjob(cluster, name, timeout_s, poll_s)

    mv = promote(cfg, tracking_uri, force)
    model_uri = f"models:/{mv.name}/{mv.version}"
    patch = serve_config_patch(cluster.get("rayservices", rayservice, read_service), model_uri)
    cluster.merge_patch("rayservices", rayservice, patch, f"--rayservice: patching RayService {ns}/{rayservice}")
    log(f"RayService {ns}/{rayservice} now serves {model_uri}")
    return {"run_name": cfg.name, "rayjob": name, "model_uri": model_uri, "alias": cfg.registry.alias}
