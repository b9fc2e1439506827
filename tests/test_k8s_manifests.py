"""The plain manifests in k8s/ (generated from charts/tdm by k8s/generate.py) and the image the chart runs
(Dockerfile), offline: k8s/ equals a fresh render, every object validates like the chart's own (strict
kubernetes-validate, strict KubeRay CRD schemas), no literal credentials, and the Dockerfile provides what
the chart assumes (app dir, non-root uid owning none of the code, pinned install, MLflow's auth extra) with
no docker daemon."""
import copy
import importlib.util
import posixpath
import re
import shlex
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from k8s_helpers import SENSITIVE_ENV, assert_valid, credential_problems, ray_objects_last, walk

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
VALUES = yaml.safe_load((ROOT / "charts" / "tdm" / "values.yaml").read_text())
FILES = {"serviceaccount.yaml", "mlflow.yaml", "mlflow-bootstrap.yaml", "pvc-runs.yaml", "rayjob-distill.yaml",
         "rayservice.yaml", "networkpolicy.yaml"}

_spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


@pytest.fixture(scope="module")
def fresh() -> dict[str, str]:
    return generate.render()


def manifest_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(K8S.glob("*.yaml"))}


def manifest_objects() -> list[dict]:
    return [doc for text in manifest_texts().values() for doc in yaml.safe_load_all(text) if doc]


# ------------------------------------------------------------------------------------------- k8s/

def test_manifests_are_in_sync_with_the_chart(fresh):
    stale = generate.stale(K8S, fresh)
    assert stale == [], f"k8s/ differs from charts/tdm in {', '.join(stale)}: run `python k8s/generate.py`"
    assert set(fresh) == FILES
    assert generate.render() == fresh                       # deterministic


def test_check_mode_names_the_stale_file(tmp_path, capsys):
    for name in FILES:
        shutil.copy(K8S / name, tmp_path / name)
    assert generate.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "rayservice.yaml").write_text((tmp_path / "rayservice.yaml").read_text().replace("8000", "8001"))
    (tmp_path / "pvc-runs.yaml").unlink()
    (tmp_path / "old.yaml").write_text("{}\n")
    capsys.readouterr()
    assert generate.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert {line.split(":")[0].rsplit("/", 1)[1] for line in err.splitlines()} == \
        {"rayservice.yaml", "pvc-runs.yaml", "old.yaml"}
    assert "run `python k8s/generate.py`" in err
    assert generate.main(["--dir", str(tmp_path)]) == 0      # regenerates, removes what the chart lacks
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert generate.main(["--check", "--dir", str(tmp_path)]) == 0


def test_manifests_are_plain_kubectl_manifests():
    for name, text in manifest_texts().items():
        assert text.startswith("# GENERATED from the Helm chart charts/tdm"), name
        assert "helm.sh" not in text and "managed-by: Helm" not in text, name
    objs = manifest_objects()
    assert sorted({o["kind"] for o in objs}) == ["ConfigMap", "Deployment", "Job", "NetworkPolicy",
                                                 "PersistentVolumeClaim", "RayJob", "RayService", "Service",
                                                 "ServiceAccount"]
    for obj in objs:
        meta = obj["metadata"]
        assert meta["namespace"] == generate.NAMESPACE, meta["name"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubectl", meta["name"]
        assert "annotations" not in meta, meta["name"]        # only helm.sh/resource-policy and hook ones were there


def test_every_object_validates():
    objs = manifest_objects()
    # 4 ServiceAccounts, MLflow's Deployment + Service, its bootstrap ConfigMap + Job, the claim, the RayJob,
    # the RayService, 5 NetworkPolicies
    assert len(objs) == 16
    for obj in ray_objects_last(objs):
        assert_valid(obj)


def test_no_literal_credentials_and_the_readme_creates_every_secret():
    texts, objs = manifest_texts(), manifest_objects()
    assert credential_problems(texts, objs) == []
    # the scan is not vacuous: a credential pasted into the MLflow Deployment is caught
    leaked = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    env = leaked["spec"]["template"]["spec"]["containers"][0]["env"]
    env[0] = {"name": "MLFLOW_BACKEND_STORE_URI", "value": "postgresql+psycopg2://mlflow:hunter2@pg:5432/mlflow"}
    assert len(credential_problems({"leaked.yaml": yaml.safe_dump(leaked)}, [leaked])) == 2
    # the Secrets (and keys) k8s/README.md tells the user to create are exactly the ones referenced
    refs = {(n["secretKeyRef"]["name"], n["secretKeyRef"]["key"])
            for o in objs for n in walk(o) if "secretKeyRef" in n}
    readme = (K8S / "README.md").read_text().replace("\\\n", " ")
    created = {(m.group(1), key) for m in re.finditer(r"create secret generic (\S+)(.*)", readme)
               for key in re.findall(r"--from-literal=([\w.-]+)=", m.group(2))}
    assert refs == created == {("tdm-s3", "AWS_ACCESS_KEY_ID"), ("tdm-s3", "AWS_SECRET_ACCESS_KEY"),
                               ("tdm-mlflow-db", "uri"), ("tdm-mlflow-admin", "username"),
                               ("tdm-mlflow-admin", "password"), ("tdm-mlflow-admin", "flask-secret-key"),
                               ("tdm-mlflow-training", "username"), ("tdm-mlflow-training", "password"),
                               ("tdm-mlflow-serving", "username"), ("tdm-mlflow-serving", "password")}


def test_default_manifests_are_locked_down():
    """The plain manifests carry the chart's hardening: read-only root filesystems, no egress out of the
    cluster (no ipBlock), MLflow with authentication, no API token mounted anywhere."""
    texts, objs = manifest_texts(), manifest_objects()
    assert not any("0.0.0.0/0" in text or "ipBlock" in text for text in texts.values())
    containers = [c for o in objs for node in walk(o) if "containers" in node for c in node["containers"]]
    assert len(containers) == 7          # MLflow, bootstrap, submitter, distill head + worker, serve head + worker
    assert all(c["securityContext"]["readOnlyRootFilesystem"] is True for c in containers)
    assert all(node["automountServiceAccountToken"] is False for o in objs for node in walk(o)
               if "automountServiceAccountToken" in node)
    (mlflow,) = [o for o in objs if o["kind"] == "Deployment"]
    assert "--app-name basic-auth" in mlflow["spec"]["template"]["spec"]["containers"][0]["command"][2]


# -------------------------------------------------------------------------------------- Dockerfile

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile: continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, args = (pending + line).strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        if any(fnmatch(p, pattern.lstrip("!").strip("/")) for p in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerfile_builds_what_the_chart_runs():
    instructions = dockerfile()
    app_dir = VALUES["image"]["appDir"]
    # the base image's Ray is the chart's ray.version (the RayCluster's rayVersion)
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    (base,) = [a for i, a in instructions if i == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)].strip('"'), base)
    assert base == f"rayproject/ray:{VALUES['ray']['version']}-py311"
    # runs as the chart's non-root uid, in the chart's app dir
    users = [a for i, a in instructions if i == "USER"]
    runtime = str(VALUES["securityContext"]["runAsUser"])
    assert users[-1] == runtime and users[-1] not in ("0", "root")
    assert instructions[-1] == ("USER", runtime)             # nothing runs after it at build time
    assert [a for i, a in instructions if i == "WORKDIR"][-1] == app_dir
    # every pip install is pinned by constraints.txt
    pips = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    assert pips and all("-c constraints.txt" in a for a in pips)
    # the MLflow server's basic-auth app (the chart's default) needs mlflow's auth extra (Flask-WTF)
    assert VALUES["mlflow"]["auth"]["enabled"] and any('"mlflow[auth]"' in a and "Flask-WTF==" in a for a in pips)
    # the runtime user owns none of the code: every COPY and install runs as root, COPY keeps root as owner,
    # the Python prefix the base image gave uid 1000 goes to root without group/other write, and the base
    # image's passwordless sudo for it is taken back
    user = "1000"                                            # rayproject/ray's own USER
    for instruction, a in instructions:
        if instruction == "USER":
            user = a
        elif instruction == "COPY":
            assert user == "root" and "--chown" not in a, f"COPY {a} as {user}"
        elif instruction == "RUN":
            assert user == "root", f"RUN {a[:60]} as {user}"
    deps = next(a for i, a in instructions if i == "RUN" and "-r /tmp/requirements.txt" in a)
    assert 'prefix="$(python -c \'import sys; print(sys.prefix)\')"' in deps
    assert deps.index("pip install") < deps.index('chown -R 0:0 "$prefix"') < deps.index('chmod -R go-w "$prefix"')
    assert any(i == "RUN" and "chmod -R go-w /app" in a for i, a in instructions)
    assert any(i == "RUN" and "/^ray ALL=NOPASSWD: ALL$/d" in a and "gpasswd -d ray sudo" in a
               for i, a in instructions)
    # COPY sources exist, are in the build context, and tdm/ + pipelines/ land in the app dir
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    workdir, copied = "/", {}
    for instruction, a in instructions:
        if instruction == "WORKDIR":
            workdir = posixpath.join(workdir, a)
        elif instruction == "COPY":
            *sources, dest = [w for w in shlex.split(a) if not w.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert not dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
                target = posixpath.normpath(posixpath.join(workdir, dest))
                if (ROOT / src).is_file() and dest.endswith("/"):
                    target = posixpath.join(target, posixpath.basename(src))
                copied[src.rstrip("/")] = target
    assert copied["tdm"] == f"{app_dir}/tdm" and copied["pipelines"] == f"{app_dir}/pipelines"
    assert (ROOT / "pipelines" / "distill.py").exists()       # the RayJob runs `python pipelines/distill.py`
    # local state and secrets stay out of the build context and the image
    for path in (".venv", ".git", "mlruns", "mlflow.db", ".tdm-home", "tdm/__pycache__", ".env"):
        assert dockerignored(path, patterns), f"{path}: not excluded by .dockerignore"
    text = (ROOT / "Dockerfile").read_text()
    assert credential_problems({"Dockerfile": text}, []) == []
    for instruction, a in instructions:
        if instruction in ("ARG", "ENV"):
            assert not SENSITIVE_ENV.search(a.split("=")[0]), f"{instruction} {a}: no secrets in the image"
