"""Bad input to pipelines/distill.py: a one-line error naming the field, exit code 2, before any
training, and nothing registered."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_distill(tmp_path, *args):
    env = dict(os.environ, TDM_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "distill.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,field", [
    (["--student.bogus", "1"], "--student.bogus"),
    (["--student.num_steps", "0"], "student.num_steps"),
    (["--student.num_steps", "2000"], "larger than the schedule"),
    (["--student.num_steps", "50"], "margin"),
    (["--optim.lr_student", "-0.001"], "optim.lr_student"),
    (["--data.prompts", "[]"], "data.prompts is empty"),
    (["--teacher.uri", "/nonexistent/teacher", "--eval.enabled", "false"], "teacher.uri: path does not exist"),
    (["--teacher.uri", "./relative/missing", "--eval.enabled", "false"], "teacher.uri: path does not exist"),
    (["--teacher.uri", "models:/no-such-model@champion", "--data.prompts", "a", "--eval.enabled", "false"],
     "teacher.uri: registered model"),
    (["--teacher.uri", "s3://tdm-test/no/teacher", "--data.prompts", "a", "--eval.enabled", "false"],
     "teacher.uri: no diffusers pipeline at s3://tdm-test/no/teacher"),
    # the most basic error first: the path, not the option a non-toy teacher also needs
    (["--teacher.uri", "/nonexistent/teacher", "--data.prompts", "a"], "teacher.uri: path does not exist"),
    (["--teacher.uri", "org/model", "--data.prompts", "a"], "eval.clip_model is required"),
    (["--teacher.uri", "models:/x", "--data.prompts", "a"], "teacher.uri: 'models:/x' is not models:/<name>@<alias>"),
    (["--teacher.uri", "models:/x", "--eval.enabled", "false"], "teacher.uri: 'models:/x' is not models:/"),
    (["--teacher.uri", "s3://", "--data.prompts", "a"], "teacher.uri: 's3://' names no bucket"),
    (["--teacher.uri", "gs://bucket/sd", "--data.prompts", "a"], "teacher.uri: 'gs://bucket/sd': only a toy"),
    (["--train.storage_path", "s3:/bad"], "train.storage_path: only local paths and s3://bucket/prefix"),
    (["--train.storage_path", "gs://bucket/runs"], "train.storage_path: only local paths and s3://bucket/prefix"),
    (["--data.prompt_source", "/nonexistent/prompts.txt"], "data.prompt_source"),
    (["--train.num_workers", "3", "--train.batch_size", "64"], "train.batch_size"),
    (["--optim.lr_student", "inf"], "optim.lr_student"),
    (["--loss.guidance_scale", "nan"], "loss.guidance_scale"),
    (["--student.step_set", "1,2", "--student.step_probs", "nan,1"], "student.step_probs"),
    (["--registry.alias", "latest"], "registry.alias: 'latest' is reserved by MLflow"),
    (["--registry.alias", "v3"], "registry.alias: 'v3' is reserved"),
    (["--registry.alias", "a b"], "registry.alias"),
    (["--name", "bob's"], "use letters, digits"),
    (["--name", "../escape"], "use letters, digits"),
    (["--name", "a..b"], "use letters, digits"),
    (["--registry.model_name", "x' or name='y"], "registry.model_name"),
    # a flag must name a field exactly: a prefix of one is not it
    (["--train.max_step", "10"], "unrecognized arguments: --train.max_step 10"),
    (["--student.num_step", "4"], "unrecognized arguments: --student.num_step 4"),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, s3_server, args, field):
    proc = run_distill(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and field in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    home = tmp_path / "home"
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())   # no training started
    if (home / "mlflow.db").exists():                                            # nothing registered
        import sqlite3

        with sqlite3.connect(home / "mlflow.db") as db:
            assert db.execute("select count(*) from registered_models").fetchone()[0] == 0
            assert db.execute("select count(*) from runs").fetchone()[0] == 0


@pytest.fixture(scope="module")
def broken_teachers(tiny_toy_dir, tmp_path_factory):
    """Copies of a real (tiny) teacher directory with one part broken."""
    import shutil

    root = tmp_path_factory.mktemp("broken")
    no_scheduler, foreign = root / "no-scheduler", root / "foreign-class"
    shutil.copytree(tiny_toy_dir, no_scheduler)
    shutil.rmtree(no_scheduler / "scheduler")
    shutil.copytree(tiny_toy_dir, foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    (foreign / "model_index.json").write_text(json.dumps({**index, "_class_name": "FooBarPipeline"}))
    return {"no-scheduler": no_scheduler, "foreign-class": foreign}


@pytest.mark.parametrize("args,env,message", [
    (["--teacher.uri", "{no-scheduler}"], {}, "teacher.uri: {no-scheduler} has no readable scheduler/ config"),
    (["--teacher.uri", "{foreign-class}"], {}, "teacher.uri: pipeline class 'FooBarPipeline' is not supported"),
    (["--teacher.uri", "no-such-org/no-such-model"], {"HF_HUB_OFFLINE": "1"},
     "teacher.uri: no-such-org/no-such-model is not in the Hugging Face cache"),
    (["--teacher.uri", "no-such-org/no-such-model"], {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "teacher.uri: cannot resolve hub id no-such-org/no-such-model"),
    (["--eval.teacher_steps", "5000"], {}, "eval.teacher_steps: at most 999 for this teacher's schedule"),
    (["--eval.student_steps", "1,2000"], {}, "eval.student_steps: at most 999 for this teacher's schedule"),
    ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "MLFLOW_TRACKING_URI: cannot reach the MLflow server"),
])
def test_teacher_and_service_errors_come_before_any_work(tmp_path, broken_teachers, args, env, message):
    """Each found on the driver before Ray starts: one line naming the field, exit 2, no run in MLflow."""
    args = [a.format(**broken_teachers) for a in args]
    if args[:1] == ["--teacher.uri"]:
        args += ["--data.prompts", "a cat", "--eval.enabled", "false"]
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "distill.py"), *args], capture_output=True,
                          text=True, timeout=120, env={**base, "TDM_HOME": str(tmp_path / "home"),
                                                       "RAY_AUTH_MODE": "disabled", **env})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message.format(**broken_teachers) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in proc.stdout.lower()
    db = tmp_path / "home" / "mlflow.db"
    if db.exists():
        import sqlite3

        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from runs").fetchone()[0] == 0


def test_empty_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n  \n")
    proc = run_distill(tmp_path, "--data.prompt_source", str(f))
    assert proc.returncode == 2 and "contains no prompts" in proc.stderr


def test_teacher_directory_without_model_index(tmp_path):
    proc = run_distill(tmp_path, "--teacher.uri", str(tmp_path), "--data.prompts", "a cat", "--eval.enabled", "false")
    assert proc.returncode == 2 and "not a diffusers pipeline directory" in proc.stderr


def test_register_rejects_a_missing_checkpoint(tmp_path):
    env = dict(os.environ, TDM_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "register.py"), "--checkpoint",
                           str(tmp_path / "nope")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--checkpoint:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    from tdm.testing import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan"))


@pytest.mark.parametrize("args,message", [
    (["--video.frames", "6"], "video.frames: must be 1 + a multiple of 4"),
    (["--video.height", "40"], "video.height: must be a positive multiple of 16"),
    (["--student.t_start", "900"], "student.t_start: this teacher's stock pipeline walks"),
    (["--loss.teacher_guidance", "embedded"], "loss.teacher_guidance: 'embedded' feeds the guidance scale to the "
                                              "network, and this teacher (WanPipeline) takes none"),
])
def test_bad_video_geometry_fails_before_training(tmp_path, tiny_wan_dir, args, message):
    """Checked from the teacher's configs on the driver, before Ray starts."""
    proc = run_distill(tmp_path, "--teacher.uri", str(tiny_wan_dir), "--data.prompts", "a cat", "--eval.enabled",
                       "false", "--video.frames", "5", "--video.height", "32", "--video.width", "32", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in proc.stdout.lower()


@pytest.mark.parametrize("args,message", [
    (["--teacher.uri", "toy-video", "--video.frames", "9"], "video.frames: the embedded toys have a fixed geometry"),
    (["--video.fps", "8"], "video.fps: the embedded toys have a fixed geometry"),
    (["--preset", "no-such-preset"], "--preset: unknown preset"),
])
def test_video_config_errors(tmp_path, args, message):
    proc = run_distill(tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_image_teacher_refuses_video_options(tmp_path, tiny_sd_dir):
    proc = run_distill(tmp_path, "--teacher.uri", str(tiny_sd_dir), "--data.prompts", "a cat", "--eval.enabled",
                       "false", "--video.frames", "5")
    assert proc.returncode == 2 and "video.frames: the teacher (StableDiffusionPipeline) is an image model" in \
        proc.stderr, proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["--upscale-factors", "1,a"], "--upscale-factors: integers separated by commas"),
    (["--upscale-factors", "1,0"], "--upscale-factors (item 1): Input should be greater than or equal to 1"),
    (["--upscale-factors", "-3"], "--upscale-factors (item 0)"),
    (["--upscale-factors", "4,4"], "each factor once"),
    (["--poll-interval-s", "inf"], "--poll-interval-s: Input should be a finite number"),
    (["--batch-wait-timeout-s", "nan"], "--batch-wait-timeout-s: Input should be a finite number"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--max-body-bytes", "10"], "--max-body-bytes: Input should be greater than or equal to 1024"),
    (["--request-timeout-s", "0"], "--request-timeout-s: Input should be greater than 0"),
    (["--request-timeout-s", "inf"], "--request-timeout-s"),
    (["--max-queued-requests", "0"], "--max-queued-requests"),
    (["--model-cache-versions", "0"], "--model-cache-versions"),
    (["--dtype", "float8"], "--dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    (["--load-retry-max-s", "-1"], "--load-retry-max-s"),
    (["--batch-invariant", "maybe"], "--batch-invariant: Input should be a valid boolean"),
    (["--max-prompt-chars", "1000000"], "--max-prompt-chars"),
    (["--max-images-per-request", "100000"], "--max-images-per-request: Input should be less than or equal to 256"),
    (["--num-replicas", "-3"], "--num-replicas: Input should be greater than or equal to 1"),
    (["--num-replicas", "two"], "--num-replicas: Input should be a valid integer"),
    (["--num-gpus", "-1"], "--num-gpus: Input should be greater than or equal to 0"),
    (["--num-cpus", "inf"], "--num-cpus: Input should be a finite number"),
    (["--video-store-ttl-s", "1e12"], "--video-store-ttl-s: Input should be less than or equal to 2592000"),
    (["--video-store-max-jobs", "0"], "--video-store-max-jobs"),
    (["--video-job-timeout-s", "-5"], "--video-job-timeout-s"),
    (["--port", "0"], "--port: an integer in 1-65535, got '0'"),
    (["--port", "http"], "--port: an integer in 1-65535"),
    # secure by default: a non-loopback address needs keys (checked without --print-config, which
    # only prints)
    (["--host", "0.0.0.0", "--no-print"], "--host 0.0.0.0: refusing to serve a non-loopback address without "
                                          "API keys"),
])
def test_bad_serve_options_fail_with_one_line(args, expected):
    flags = [a for a in args if a != "--no-print"] + ([] if "--no-print" in args else ["--print-config"])
    env = {k: v for k, v in os.environ.items() if k != "TDM_API_KEYS"}
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "serve.py"), *flags],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_print_config_is_the_resolved_config():
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "serve.py"), "--max-batch-size", "16",
                           "--batch-invariant", "--print-config"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from tdm.serve import ServeConfig, build_app  # noqa: F401 - build_app: the args must be what it takes

    args = json.loads(proc.stdout)["applications"][0]["args"]
    resolved = ServeConfig(max_batch_size=16, batch_invariant=True).model_dump()
    assert {k: args[k] for k in resolved} == resolved      # every option, defaults included
    assert args["num_replicas"] == 1 and "derived deployment options" in proc.stderr
    assert '"max_ongoing_requests": 96' in proc.stderr      # the generator: two batches of 16, plus 64 queued


@pytest.mark.parametrize("content,words", [
    (b"student: {num_steps: 4\n", "is not valid YAML at line"),
    (b"student:\n  num_steps: \xff\xfe\n", "is not UTF-8 text"),
    (b"- a\n- b\n", "must contain a mapping"),
])
def test_a_broken_config_file_is_one_line(tmp_path, content, words):
    f = tmp_path / "run.yaml"
    f.write_bytes(content)
    proc = run_distill(tmp_path, "--config", str(f))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and words in proc.stderr, proc.stderr
    assert f"--config: {f}" in proc.stderr


def test_an_unreachable_tracking_server_is_one_line_before_any_work(tmp_path):
    from conftest import free_port

    env = dict(os.environ, TDM_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled",
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "distill.py")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "MLFLOW_TRACKING_URI: cannot reach the MLflow server" in lines[0], proc.stderr
    assert "toy teacher" not in proc.stdout + proc.stderr      # nothing was trained
