"""Shared fixtures: tiny models built from configs (no downloads), an isolated TDM_HOME/MLflow store,
and one Ray cluster per test session."""
import os
import json
from pathlib import Path

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
    from tdm.toy.teacher import build_toy_backbone

    path = tmp_path_factory.mktemp("tiny_toy")
    build_toy_backbone(seed=0, channels=(8, 16)).save_pretrained(path)
    return path


def _clip_tokenizer(path: Path):
    """A CLIPTokenizer from a hand-written vocabulary (byte-level BPE with no merges)."""
    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random-weight Stable Diffusion 1.5-shaped pipeline (UNet + VAE + CLIP), saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    tok_dir = path / "_tok"
    tok_dir.mkdir()
    tokenizer = _clip_tokenizer(tok_dir)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    # SD 1.5's scheduler: scaled-linear betas, epsilon prediction
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


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
              "sample_every": 3, "log_every": 2},
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
