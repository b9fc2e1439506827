"""The embedded toy video teacher end to end through Ray Train (2 CPU workers) and a real MLflow store:
trained and registered as tdm-toy-video-teacher@champion on first use, a student distilled from it,
evaluated with the motion classifier (FID, adherence, temporal consistency), logged with GIF/MP4 samples,
registered as tdm-video-student, and served through the pyfunc contract as MP4s."""
import mlflow
import pandas as pd
import pytest
from conftest import TINY_RUN
from mlflow import MlflowClient

PASS_ALL = {"max_fid_ratio_teacher": 1e9, "max_adherence_drop": 100.0, "max_fid_ratio_teacher_ddim": 1e9,
            "max_consistency_drop": 100.0}


@pytest.fixture(scope="module")
def video_run(ray_cluster, tdm_home):
    from tdm.config import load_config
    from tdm.job import distill

    cfg = load_config({"name": "toy-video-e2e", "teacher": {"uri": "toy-video"},
                       "toy_video": {"train_steps": 30, "head_dim": 16, "batch_size": 16, "classifier_epochs": 2},
                       "train": {**TINY_RUN["train"], "max_steps": 3, "checkpoint_every": 3, "sample_every": 3},
                       "eval": {"num_samples": 40, "teacher_steps": 4, "batch_size": 40}, "gate": PASS_ALL})
    return distill(cfg)


def test_toy_video_job_registers_teacher_and_student(video_run):
    client = MlflowClient()
    assert video_run["passed"] is True
    student = client.get_model_version_by_alias("tdm-video-student", "champion")
    assert student.version == video_run["model_version"]
    assert student.tags["family"] == "wan" and student.tags["frames"] == "5" and student.tags["fps"] == "4.0"
    assert student.tags["teacher"].startswith("models:/tdm-toy-video-teacher/")
    teacher = client.get_model_version_by_alias("tdm-toy-video-teacher", "champion")
    assert teacher.tags["kind"] == "teacher" and teacher.tags["frames"] == "5"
    # the image toy's names are untouched
    assert not [m for m in client.search_model_versions("name='tdm-student'")
                if m.run_id == video_run["run_id"]]


def test_toy_video_evaluation_and_samples_are_logged(video_run):
    client = MlflowClient()
    run = client.get_run(video_run["run_id"])
    for row in ("teacher_k4", "teacher_ddim_k4", "student_k1", "student_k2", "student_k4"):
        for metric in ("fid", "adherence", "consistency", "latency_ms"):
            assert f"eval/{row}/{metric}" in run.data.metrics, (row, metric)
    assert "gate/consistency_drop" in run.data.metrics
    files = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/student@4.gif", "eval/student@4.mp4", "eval/teacher@4.gif", "eval/table.json"} <= files
    assert "samples/K4/step_0000003.gif" in {f.path for f in client.list_artifacts(run.info.run_id, "samples/K4")}
    evaluator = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/eval/evaluator.json")
    assert evaluator["kind"] == "moving-digits" and evaluator["classifier_direction_accuracy"] > 90
    assert evaluator["epochs"] == 2     # toy_video.classifier_epochs reached the classifier


def test_toy_video_student_pyfunc_returns_mp4(video_run):
    from tdm.video import mp4_frames

    model = mlflow.pyfunc.load_model("models:/tdm-video-student@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a handwritten digit 3 moving left"]}), params={"seed": 1})
    frames, fps = mp4_frames(out[0])
    assert frames.shape == (5, 16, 16, 3) and fps == 4.0
