"""Serving's pure parts, hand-checked without Ray: batch buckets, retry back-off, API keys, the model
cache (bounded, never partial) and the dtype a model loads in."""
import pytest
import torch

from tdm.serve.auth import ENV, APIKeys, bind_refusal, parse_keys
from tdm.serve.generator import backoff_s, bucket_size, resolve_dtype, run_images
from tdm.serve.protocol import GenerationJob
from tdm.spec import GenerationParams


@pytest.mark.parametrize("n,max_size,invariant,want", [
    (1, 8, False, 1), (2, 8, False, 2), (3, 8, False, 4), (5, 8, False, 8), (8, 8, False, 8),
    (5, 6, False, 6),      # capped at max_batch_size even when it is not a power of two
    (1, 8, True, 8), (7, 16, True, 16),
])
def test_bucket_size(n, max_size, invariant, want):
    assert bucket_size(n, max_size, invariant) == want


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_s(k, 5, 60) for k in (1, 2, 3, 4, 5, 100)] == [5, 10, 20, 40, 60, 60]


class CountingPipe:
    class spec:  # noqa: N801 - what run_images reads of a ModelSpec
        fps = None

    def __init__(self):
        self.batch_sizes = []

    def render(self, prompts, params, seeds):  # noqa: ARG002 - the pipeline signature
        self.batch_sizes.append(len(prompts))
        return torch.stack([torch.full((3, 2, 2), (s % 5) / 5.0) for s in seeds])


def _job(n, seed=0):
    params = GenerationParams(steps=4, guidance_scale=1.0, timesteps=(999, 749, 500, 250), cfg=False)
    return GenerationJob(prompt="a digit", n=n, params=params, seed=seed, scale=1, model_id="m/1")


def test_chunks_are_padded_to_their_bucket_or_to_the_maximum_when_invariant():
    pipe = CountingPipe()
    run_images(pipe, [_job(1)], chunk=8)
    run_images(pipe, [_job(3), _job(8)], chunk=8)          # 11 images: 8 + 3 -> buckets 8 and 4
    assert pipe.batch_sizes == [1, 8, 4]
    pipe.batch_sizes.clear()
    run_images(pipe, [_job(1)], chunk=8, invariant=True)
    assert pipe.batch_sizes == [8]


def test_api_keys_parse_check_and_rotate(tmp_path):
    assert parse_keys("a\n# comment\n b , c # trailing\n\n") == ["a", "b", "c"]
    off = APIKeys(None, env="")
    assert not off.enabled and off.check(None)
    env = APIKeys(None, env="k1, k2")
    assert env.enabled and env.check("Bearer k1") and env.check("bearer k2") and env.check("Bearer  k2 ")
    for bad in (None, "", "Bearer", "Bearer k", "Bearer k1k2", "Basic k1", "k1", "Bearer k3"):
        assert not env.check(bad), bad
    f = tmp_path / "keys"
    f.write_text("file-key\n")
    keys = APIKeys(str(f), env="env-key")
    assert keys.check("Bearer file-key") and keys.check("Bearer env-key") and len(keys) == 2
    f.write_text("new-key\n")
    keys._reload(force=True)        # what the next check does after RECHECK_S
    assert keys.check("Bearer new-key") and not keys.check("Bearer file-key")
    f.unlink()
    keys._reload(force=True)
    assert keys.error and not keys.check("Bearer new-key") and keys.check("Bearer env-key")
    closed = APIKeys(None, env="", required=True)   # fail closed: nothing configured, nothing accepted
    assert closed.enabled and not closed.check("Bearer ") and not closed.check("Bearer anything")


def test_api_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, "rot-old,rot-new")
    keys = APIKeys(None)                     # read from $TDM_API_KEYS, as the chart's Secret sets it
    assert keys.enabled and keys.check("Bearer rot-old") and keys.check("Bearer rot-new") and len(keys) == 2
    monkeypatch.delenv(ENV)
    assert not APIKeys(None).enabled


def test_secure_by_default_binding():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.8.9.10"):
        assert bind_refusal(host, keyed=False, insecure=False) is None, host
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org"):
        assert "refusing to serve a non-loopback address without API keys" in bind_refusal(host, False, False)
        assert bind_refusal(host, keyed=True, insecure=False) is None          # keys given
        assert bind_refusal(host, keyed=False, insecure=True) is None          # --insecure-no-auth


def test_model_cache_is_bounded_and_keeps_what_is_served(tdm_home):
    from tdm import paths
    from tdm.tracking import cached_versions, prune_model_cache

    cache = paths.cache_dir("models")
    for v in (1, 2, 3, 10):
        d = cache / f"unit-cache--{v}--abcdef{v:06d}"
        (d / "pipeline").mkdir(parents=True)
        (d / "MLmodel").write_text("flavors: {}\n")
    (cache / "unit-cache--11--partial").mkdir()              # no MLmodel: not a complete version
    (cache / "unit-cache-other--12--x").mkdir()
    (cache / "unit-cache-other--12--x" / "MLmodel").write_text("")
    assert [v for v, _ in cached_versions("unit-cache")] == [10, 3, 2, 1]
    served = cache / "unit-cache--1--abcdef000001" / "pipeline"
    deleted = prune_model_cache("unit-cache", keep=2, protect=(served,))
    assert sorted(d.name for d in deleted) == ["unit-cache--2--abcdef000002"]
    assert [v for v, _ in cached_versions("unit-cache")] == [10, 3, 1]
    assert [v for v, _ in cached_versions("unit-cache-other")] == [12]


def test_a_failed_download_leaves_nothing_behind(tdm_home, monkeypatch):
    import mlflow

    from tdm import paths
    from tdm.tracking import download_model

    def half_then_fail(artifact_uri, dst_path):  # noqa: ARG001 - mlflow's signature
        from pathlib import Path

        (Path(dst_path) / "model").mkdir()
        (Path(dst_path) / "model" / "weights.bin").write_bytes(b"x" * 1000)
        raise ConnectionError("connection reset mid-download")

    class Version:
        name, version, source, run_id, creation_timestamp = "unit-download", "4", "s3://b/m", "r", 1

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", half_then_fail)
    with pytest.raises(ConnectionError):
        download_model(Version())
    cache = paths.cache_dir("models")
    assert not list(cache.glob(".download-*")) and not list(cache.glob("unit-download--*"))


def test_models_load_in_the_configured_dtype(tiny_toy_dir):
    from tdm.serve.generator import load_model_dir
    from tdm.spec import model_spec

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    for bf16, want in ((True, torch.bfloat16), (False, torch.float16)):   # auto on a GPU: what the card has
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "is_bf16_supported", lambda _b=bf16: _b)
            assert resolve_dtype("auto", "cuda") == want
    assert resolve_dtype("float16", "cuda") == torch.float16
    from tdm.backbones import load_backbone
    from tdm.generation import TDMPipeline

    b = load_backbone(tiny_toy_dir)
    out = tiny_toy_dir.parent / "dtype-student"
    TDMPipeline(b, model_spec(b, "student", 4, 2.0, grids={4: [999, 749, 500, 250]})).save_pretrained(out)
    pipe, model = load_model_dir(out, str(out), "dtype-student", "local", None, "bfloat16")
    assert {p.dtype for p in pipe.denoiser.parameters()} == {torch.bfloat16}
    params = model.spec.check_generation(None)
    images = pipe.render(["a handwritten digit 3"], params, [0])
    assert images.dtype == torch.float32 and torch.isfinite(images).all() and images.shape[-2:] == (8, 8)


def test_queue_bounds_follow_from_the_config():
    from tdm.serve import ServeConfig
    from tdm.serve.app import INGRESS_HEADROOM, deployment_options

    opts = deployment_options(ServeConfig(max_batch_size=48, max_images_per_request=4, max_queued_requests=100))
    # two batches of 48 jobs (above the 32 that used to be hard-coded, so a batch of 48 can fill) plus
    # the queue bound, so what the ingress lets through waits in the replica, not in Ray's router
    assert opts["TDMGenerator"] == {"max_ongoing_requests": 96 + 100, "max_queued_requests": 100}
    # the ingress's own bound (100) answers first, in JSON; Ray's queue in front of it is unbounded
    assert opts["TDMIngress"] == {"max_ongoing_requests": 100 + INGRESS_HEADROOM, "max_queued_requests": -1}
    assert deployment_options(ServeConfig(max_batch_size=1, max_images_per_request=4))["TDMGenerator"][
        "max_ongoing_requests"] == 8 + 64
