"""Shared fixtures: tiny models built from configs (no downloads), an isolated TDM_HOME/MLflow store,
and one Ray cluster per test session."""
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")       # Ray 2.60 enables token auth by default; be explicit
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")             # nothing may download
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tdm_home(tmp_path_factory):
    """A private $TDM_HOME (MLflow store, checkpoints, caches) for the whole session."""
    home = tmp_path_factory.mktemp("tdm_home")
    os.environ["TDM_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory):
    """The toy pipeline architecture at minimum width, random weights, saved in diffusers layout."""
    from tdm.testing import build_tiny_toy

    return build_tiny_toy(tmp_path_factory.mktemp("tiny_toy"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random-weight Stable Diffusion 1.5-shaped pipeline (UNet + VAE + CLIP), saved with save_pretrained."""
    from tdm.testing import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on localhost, with bucket 'tdm-test'."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="tdm-test")
    yield env
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tdm_home, s3_server):
    """One local Ray cluster for every test that needs one (4 logical CPUs on a 2-core machine). Workers
    see the session's TDM_HOME and the S3 endpoint."""
    import ray

    env = {"TDM_HOME": str(tdm_home), "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "HF_HUB_OFFLINE": "1",
           **s3_server}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


#: A distillation small enough for CI: tiny toy teacher, 2 CPU workers, a handful of steps.
TINY_RUN = {
    "toy": {"train_steps": 40, "channels": [8, 16], "batch_size": 32},
    "train": {"max_steps": 6, "batch_size": 8, "num_workers": 2, "cpus_per_worker": 1, "checkpoint_every": 3,
              "sample_every": 3, "log_every": 2, "system_metrics_interval_s": 1},
    "eval": {"num_samples": 60, "teacher_steps": 5, "batch_size": 60},
}


def tiny_config(**sections):
    """TINY_RUN with sections merged in (one level deep)."""
    from tdm.config import load_config

    data = {k: dict(v) for k, v in TINY_RUN.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return load_config(data)
