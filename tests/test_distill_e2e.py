"""End to end through Ray Train (2 CPU workers) and a real MLflow store: the toy teacher is trained and
registered on first use, the student is registered, gated, and both honour the pyfunc contract."""
import io
import json

import mlflow
import pandas as pd
import pytest
from conftest import tiny_config
from mlflow import MlflowClient
from PIL import Image

PASS_ALL = {"max_fid_ratio_teacher": 1e9, "max_adherence_drop": 100.0, "max_fid_ratio_teacher_ddim": 1e9}
FAIL_ALL = {"max_fid_ratio_teacher": 1e-9, "max_adherence_drop": 100.0, "max_fid_ratio_teacher_ddim": 1e9}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tdm_home):
    from tdm.job import distill

    return distill(tiny_config(name="e2e-pass", gate=PASS_ALL))


def _png(b):
    img = Image.open(io.BytesIO(b))
    img.load()
    return img


def test_registry_after_a_passing_run(first_run):
    client = MlflowClient()
    assert first_run["passed"] is True
    champion = client.get_model_version_by_alias("tdm-student", "champion")
    assert champion.version == first_run["model_version"]
    tags = champion.tags
    assert tags["teacher"].startswith("models:/tdm-toy-teacher/") and tags["num_steps"] == "4"
    assert json.loads(tags["timesteps"]) == {"4": [999, 749, 500, 250]}
    assert tags["guidance_scale"] == "2.0" and tags["tdm_version"] and tags["gate.passed"] == "True"
    for key in ("gate.fid_ratio_teacher", "gate.adherence_drop", "gate.fid_ratio_teacher_ddim"):
        float(tags[key])
    assert champion.run_id == first_run["run_id"]
    teacher = client.get_model_version_by_alias("tdm-toy-teacher", "champion")
    assert teacher.tags["kind"] == "teacher"


def test_run_tracking(first_run):
    client = MlflowClient()
    run = client.get_run(first_run["run_id"])
    assert run.data.params["student.num_steps"] == "4" and run.data.tags["tdm.run_name"] == "e2e-pass"
    for key in ("train/loss_fake", "train/loss_student", "train/grad_norm_fake", "train/grad_norm_student",
                "train/lr_student", "train/samples_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6], key
    for row in ("teacher_k5", "teacher_ddim_k4", "student_k1", "student_k2", "student_k4"):
        assert f"eval/{row}/fid" in run.data.metrics and f"eval/{row}/adherence" in run.data.metrics
    files = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/table.json", "eval/student@4.png", "eval/teacher@5.png"} <= files
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/eval/table.json")
    names = {row[table["columns"].index("name")] for row in table["data"]}
    assert names == {"teacher@5", "teacher_ddim@4", "student@1", "student@2", "student@4"}
    assert {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/step_0000003.json", "checkpoints/step_0000006.json"}
    assert run.data.tags["tdm.code_version"].startswith("0.") and run.info.status == "FINISHED"
    assert any(k.startswith("system/") and k.endswith("cpu_utilization_percentage") for k in run.data.metrics)
    assert any(f.path.startswith("images") for f in client.list_artifacts(run.info.run_id))


def test_student_pyfunc_contract(first_run):
    model = mlflow.pyfunc.load_model("models:/tdm-student@champion")
    prompts = pd.DataFrame({"prompt": ["a handwritten digit 3", "a handwritten digit 7"]})
    out = model.predict(prompts, params={"seed": 5})
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(b, bytes) for b in out)
    assert _png(out[0]).size == (8, 8)
    assert model.predict(prompts, params={"seed": 5}) == out                       # same seed, same images
    assert model.predict(prompts, params={"seed": 6}) != out
    assert model.predict(prompts, params={"seed": 5, "num_inference_steps": 4, "guidance_scale": 2.0}) == out
    assert model.predict(prompts, params={"seed": 5, "num_inference_steps": 1}) != out
    with pytest.raises(Exception, match="guidance_scale"):
        model.predict(prompts, params={"guidance_scale": 5.0})


def test_teacher_pyfunc_honours_both_params(first_run):
    model = mlflow.pyfunc.load_model("models:/tdm-toy-teacher@champion")
    prompts = pd.DataFrame({"prompt": ["a handwritten digit 0"]})
    base = model.predict(prompts, params={"num_inference_steps": 4, "guidance_scale": 2.0, "seed": 1})
    assert _png(base[0]).size == (8, 8)
    assert model.predict(prompts, params={"num_inference_steps": 4, "guidance_scale": 2.0, "seed": 1}) == base
    assert model.predict(prompts, params={"num_inference_steps": 8, "guidance_scale": 2.0, "seed": 1}) != base
    assert model.predict(prompts, params={"num_inference_steps": 4, "guidance_scale": 4.0, "seed": 1}) != base


def test_failing_gate_registers_without_alias_and_reuses_the_teacher(first_run):
    from tdm.job import distill

    client = MlflowClient()
    teachers = client.search_model_versions("name='tdm-toy-teacher'")
    second = distill(tiny_config(name="e2e-fail", gate=FAIL_ALL, train={"max_steps": 3}))
    assert second["passed"] is False
    assert client.get_model_version_by_alias("tdm-student", "champion").version == first_run["model_version"]
    assert client.get_model_version("tdm-student", second["model_version"]).tags["gate.passed"] == "False"
    assert len(client.search_model_versions("name='tdm-toy-teacher'")) == len(teachers)   # cached, not retrained


def test_a_finished_command_run_again_registers_nothing_new(first_run):
    """Idempotent registration: the same command again (or a RayJob retry) finds its checkpoint already
    registered: no new version, the alias stays, the run ends FINISHED."""
    from tdm.job import distill

    client = MlflowClient()
    before = {mv.version for mv in client.search_model_versions("name='tdm-student'")}
    champion = client.get_model_version_by_alias("tdm-student", "champion").version
    again = distill(tiny_config(name="e2e-pass", gate=PASS_ALL))
    assert again["already_registered"] is True and again["model_version"] == first_run["model_version"]
    assert {mv.version for mv in client.search_model_versions("name='tdm-student'")} == before
    assert client.get_model_version_by_alias("tdm-student", "champion").version == champion
    assert client.get_run(first_run["run_id"]).info.status == "FINISHED"
