"""Teacher identity (tdm.teacher): every kind of teacher.uri is pinned once to an immutable revision, every
process loads exactly that revision, a teacher changed under a run is refused with both identities, and
a resumed run whose teacher now resolves differently stops before any work."""
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import tiny_config

from tdm.errors import ConfigError, TeacherChangedError
from tdm.teacher import directory_hash, resolve_teacher, teacher_dir


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TDM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _weights(path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"]


def test_local_directory_is_pinned_by_content(home, tiny_toy_dir, tmp_path):
    d = tmp_path / "teacher"
    shutil.copytree(tiny_toy_dir, d)
    ref = resolve_teacher(str(d))
    assert (ref.kind, ref.location, ref.uri) == ("local", str(d.resolve()), str(d))
    assert ref.revision == f"sha256-{directory_hash(d)}" and len(ref.revision) == 7 + 64
    assert resolve_teacher(str(d)) == ref and teacher_dir(ref) == str(d.resolve())
    assert list((home / "cache" / "hashes").glob("*.txt"))           # hashed once, then by (path, size, mtime)
    (d / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler", "beta_end": 0.02}')
    with pytest.raises(TeacherChangedError) as err:
        teacher_dir(ref)
    assert ref.revision in str(err.value) and resolve_teacher(str(d)).revision in str(err.value)


def test_bad_locations_name_the_field(home, tmp_path):
    with pytest.raises(ConfigError, match="^teacher.uri: path does not exist: /no/such/teacher"):
        resolve_teacher("/no/such/teacher")
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory"):
        resolve_teacher(str(tmp_path))
    with pytest.raises(ConfigError, match="^teacher.uri: no-such-org/no-such-model is not in the Hugging Face cache"):
        resolve_teacher("no-such-org/no-such-model")       # HF_HUB_OFFLINE=1 in the test session


def test_s3_prefix_is_pinned_by_etags(home, s3_server, tiny_toy_dir):
    import boto3

    s3 = boto3.client("s3")
    for f in tiny_toy_dir.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "tdm-test", f"teachers/pinned/{f.relative_to(tiny_toy_dir)}")
    ref = resolve_teacher("s3://tdm-test/teachers/pinned/")
    assert (ref.kind, ref.location) == ("s3", "s3://tdm-test/teachers/pinned") and ref.revision.startswith("etags-")
    local = teacher_dir(ref)
    assert torch.equal(_weights(tiny_toy_dir), _weights(Path(local)))
    assert teacher_dir(ref) == local                    # one download per node and revision
    # the bucket is rewritten: a process that has no copy yet refuses it
    shutil.rmtree(local)
    s3.put_object(Bucket="tdm-test", Key="teachers/pinned/scheduler/scheduler_config.json", Body=b"{}")
    with pytest.raises(TeacherChangedError, match=f"pinned to revision {ref.revision} but now holds etags-"):
        teacher_dir(ref)
    assert resolve_teacher("s3://tdm-test/teachers/pinned").revision != ref.revision


def test_hub_id_is_pinned_to_a_commit(home, tiny_toy_dir, tmp_path, monkeypatch):
    """An offline Hugging Face cache laid out as the hub client writes it: refs/main -> snapshots/<commit>."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    repo = cache / "models--tdm-test--tiny-toy"
    for sha in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_toy_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    ref = resolve_teacher("tdm-test/tiny-toy")
    assert (ref.kind, ref.location, ref.revision) == ("hub", "tdm-test/tiny-toy", "a" * 40)
    assert teacher_dir(ref).endswith("snapshots/" + "a" * 40)
    from tdm.preflight import teacher_scheduler_config

    assert teacher_scheduler_config(ref)["num_train_timesteps"] == 1000   # one file, at the pinned commit
    (repo / "refs" / "main").write_text("b" * 40)        # the branch moves on
    assert resolve_teacher("tdm-test/tiny-toy").revision == "b" * 40
    assert teacher_dir(ref).endswith("snapshots/" + "a" * 40)   # the pinned commit is what loads


def _register_teacher_versions(name, tiny_toy_dir, tmp_path, n=2):
    """n versions of a tiny toy teacher in the registry, the first one aliased champion."""
    from mlflow import MlflowClient

    from tdm.backbones import load_backbone
    from tdm.spec import teacher_spec
    from tdm.tracking import get_or_create_experiment, log_pipeline_model, register, use_tracking_uri

    use_tracking_uri()
    versions = []
    for i in range(n):
        d = tmp_path / f"{name}-{i}"
        shutil.copytree(tiny_toy_dir, d)
        spec = teacher_spec(load_backbone(d), 4, 2.0)
        spec.save(d)
        with mlflow.start_run(experiment_id=get_or_create_experiment(name)):
            versions.append(register(log_pipeline_model(d, spec).model_uri, name, {"kind": "teacher"}).version)
    MlflowClient().set_registered_model_alias(name, "champion", versions[0])
    return versions


def test_registry_alias_is_pinned_to_a_version(ray_cluster, tdm_home, tiny_toy_dir, tmp_path):
    from mlflow import MlflowClient

    v1, v2 = _register_teacher_versions("tdm-pinned-teacher", tiny_toy_dir, tmp_path)
    ref = resolve_teacher("models:/tdm-pinned-teacher@champion")
    assert (ref.kind, ref.location) == ("registry", f"models:/tdm-pinned-teacher/{v1}")
    assert ref.revision.startswith(f"{v1}-")
    MlflowClient().set_registered_model_alias("tdm-pinned-teacher", "champion", v2)
    assert resolve_teacher("models:/tdm-pinned-teacher@champion").location.endswith(f"/{v2}")
    assert (Path(teacher_dir(ref)) / "model_index.json").is_file()   # still version 1
    stale = ref.model_copy(update={"revision": f"{v1}-000000000000"})  # same number in another registry
    with pytest.raises(TeacherChangedError, match="was pinned to revision"):
        teacher_dir(stale)


def test_resume_with_a_changed_teacher_is_refused(ray_cluster, tdm_home, tiny_toy_dir, tmp_path):
    """The run's teacher is models:/<name>@champion; the alias moves; the same command is refused before any
    work, naming both identities, and the run is left as it was."""
    from mlflow import MlflowClient

    from tdm.job import distill
    from tdm.tracking import find_run, get_or_create_experiment

    v1, v2 = _register_teacher_versions("tdm-resume-teacher", tiny_toy_dir, tmp_path)
    cfg = tiny_config(name="resume-changed-teacher", teacher={"uri": "models:/tdm-resume-teacher@champion"},
                      data={"prompts": ["a handwritten digit 1", "a handwritten digit 2"]}, eval={"enabled": False},
                      train={"max_steps": 2, "num_workers": 1, "checkpoint_every": 2, "sample_every": 100})
    first = distill(cfg)
    run = MlflowClient().get_run(first["run_id"])
    assert run.data.tags["tdm.teacher"] == f"models:/tdm-resume-teacher/{v1}"
    assert MlflowClient().get_model_version("tdm-student", first["model_version"]).tags["teacher"].endswith(f"/{v1}")
    MlflowClient().set_registered_model_alias("tdm-resume-teacher", "champion", v2)
    with pytest.raises(TeacherChangedError) as err:
        distill(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})}))
    message = str(err.value)
    assert message.startswith("teacher.uri: run 'resume-changed-teacher' was started with teacher")
    assert f"models:/tdm-resume-teacher/{v1}@{v1}-" in message and f"models:/tdm-resume-teacher/{v2}@{v2}-" in message
    after = find_run(get_or_create_experiment("tdm"), "resume-changed-teacher")
    assert after.info.status == "FINISHED"
    assert "train/resumed_from" not in after.data.metrics        # nothing resumed


def test_a_checkpoint_resumes_only_onto_its_teacher():
    from tdm.spec import TeacherRef
    from tdm.train import check_checkpoint_teacher

    ref = TeacherRef(kind="local", uri="/t", location="/t", revision="sha256-aa")
    check_checkpoint_teacher({"teacher": ref.model_dump()}, ref)
    check_checkpoint_teacher({"teacher_source": "/t"}, ref)                     # tdm 0.1.0 checkpoints
    with pytest.raises(TeacherChangedError, match="trained against /t@sha256-bb, this run's teacher is /t@sha256-aa"):
        check_checkpoint_teacher({"teacher": ref.model_copy(update={"revision": "sha256-bb"}).model_dump()}, ref)
    with pytest.raises(TeacherChangedError):
        check_checkpoint_teacher({"teacher_source": "/elsewhere"}, ref)


def test_the_cli_reports_a_changed_teacher_in_one_line(capsys):
    from tdm.cli import run_cli

    def job():
        raise TeacherChangedError("teacher.uri: run 'x' was started with teacher a@1, but b now resolves to a@2")

    assert run_cli("distill.py", job) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distill.py: error: teacher.uri: run 'x' was started with teacher a@1, but b now resolves to a@2"]
