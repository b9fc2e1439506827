"""Ray Serve against a real local Ray cluster and MLflow store: OpenAI-style generation, batch
invariance, errors, overload, and a hot swap of the champion under load."""
import base64
import concurrent.futures as cf
import io
import threading
import time

import pytest
import requests
from conftest import free_port
from PIL import Image

from tdm.serve import ServeConfig
from tdm.serve.protocol import ServedModel, parse_request
from tdm.spec import ModelSpec, ScheduleSpec

MODEL = "tdm-serve-test"
GRIDS = {1: [999], 2: [999, 500], 4: [999, 749, 500, 250]}
VP = ScheduleSpec(kind="vp", prediction_type="epsilon", num_train_timesteps=1000)
INFO = ServedModel(id=f"{MODEL}/1", name=MODEL, version="1", uri=f"models:/{MODEL}@champion", spec=ModelSpec(
    kind="student", family="unet", schedule=VP, default_steps=4, grids=GRIDS, step_conditioned=True,
    guidance_scale=2.0, image_size=(8, 8)))


def _student_version(tmp_path, seed, tiny_toy_dir):
    """Register a tiny TDM-unify student pipeline as a new version of MODEL."""
    import mlflow
    import torch

    from tdm.backbones import load_backbone
    from tdm.generation import TDMPipeline
    from tdm.spec import model_spec
    from tdm.tracking import get_or_create_experiment, log_pipeline_model, register, use_tracking_uri

    use_tracking_uri()
    b = load_backbone(tiny_toy_dir)
    torch.manual_seed(seed)
    student = b.trainable_copy([1, 2, 4])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = model_spec(b, "student", 4, 2.0, grids=GRIDS, step_conditioned=True)
    out = tmp_path / f"student{seed}"
    TDMPipeline(b, spec, denoiser=student).save_pretrained(out)
    # the tdm experiment keeps artifacts in $TDM_HOME (MLflow's Default experiment would use ./mlruns)
    with mlflow.start_run(run_name=f"serve-fixture-{seed}", experiment_id=get_or_create_experiment("tdm")):
        info = log_pipeline_model(out, spec)
    return register(info.model_uri, MODEL, {"kind": "student"})


@pytest.fixture(scope="module")
def server(ray_cluster, tdm_home, tiny_toy_dir, tmp_path_factory):
    from mlflow import MlflowClient
    from ray import serve

    from tdm.serve import build_app

    tmp = tmp_path_factory.mktemp("serve")
    v1 = _student_version(tmp, 1, tiny_toy_dir)
    v2 = _student_version(tmp, 2, tiny_toy_dir)
    MlflowClient().set_registered_model_alias(MODEL, "champion", v1.version)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_uri": f"models:/{MODEL}@champion", "poll_interval_s": 1, "max_batch_size": 4,
                         "upscale_factors": [1, 4]}), name="tdm", route_prefix="/")
    serve.run(build_app({"model_uri": f"models:/{MODEL}/{v1.version}", "poll_interval_s": 0, "max_batch_size": 1,
                         "max_ongoing_requests": 1, "max_queued_requests": 1}), name="small",
              route_prefix="/small")
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    yield {"url": url, "v1": str(v1.version), "v2": str(v2.version)}
    serve.shutdown()


def gen(url, timeout=60, **body):
    return requests.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def decode(item):
    img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    img.load()
    return img


def test_generation_and_sizes(server):
    r = gen(server["url"], prompt="a handwritten digit 7", n=2, seed=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2 and body["model"] == r.headers["x-tdm-model"] == f"{MODEL}/{server['v1']}"
    assert [decode(d).size for d in body["data"]] == [(8, 8), (8, 8)]
    big = gen(server["url"], prompt="a handwritten digit 7", n=1, size="32x32", seed=3, steps=2)
    assert big.status_code == 200 and decode(big.json()["data"][0]).size == (32, 32)
    models = requests.get(f"{server['url']}/v1/models", timeout=10).json()["data"]
    assert models[0]["id"] == f"{MODEL}/{server['v1']}" and models[0]["steps"] == [1, 2, 4]
    assert requests.get(f"{server['url']}/healthz", timeout=10).json()["status"] == "ok"


def test_batching_does_not_change_results(server):
    alone = gen(server["url"], prompt="a handwritten digit 5", n=1, seed=11).json()["data"][0]["b64_json"]
    others = [dict(prompt=f"a handwritten digit {d}", n=2, seed=100 + d) for d in range(6)]
    with cf.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(gen, server["url"], **b) for b in others]
        target = pool.submit(gen, server["url"], prompt="a handwritten digit 5", n=1, seed=11)
        [f.result() for f in futs]
        batched = target.result().json()["data"][0]["b64_json"]
    assert batched == alone
    two = gen(server["url"], prompt="a handwritten digit 5", n=2, seed=10).json()["data"][1]["b64_json"]
    assert two == alone   # image i of a request is seeded seed + i


@pytest.mark.parametrize("body,param,status", [
    ({"n": 1}, "prompt", 400),
    ({"prompt": "   "}, "prompt", 400),
    ({"prompt": "x" * 1001}, "prompt", 400),
    ({"prompt": "a", "n": 0}, "n", 400),
    ({"prompt": "a", "n": 99}, "n", 400),
    ({"prompt": "a", "n": "2"}, "n", 400),
    ({"prompt": 7}, "prompt", 400),
    ({"prompt": "a", "steps": 3}, "steps", 400),
    ({"prompt": "a", "size": "1024x1024"}, "size", 400),
    ({"prompt": "a", "response_format": "url"}, "response_format", 400),
    ({"prompt": "a", "quality": "ultra"}, "quality", 400),
    ({"prompt": "a", "style": "baroque"}, "style", 400),
    ({"prompt": "a", "output_format": "gif"}, "output_format", 400),
    ({"prompt": "a", "output_format": "jpeg", "output_compression": 101}, "output_compression", 400),
    ({"prompt": "a", "output_compression": 50}, "output_compression", 400),      # png is lossless
    ({"prompt": "a", "background": "chequered"}, "background", 400),
    ({"prompt": "a", "moderation": "none"}, "moderation", 400),
    ({"prompt": "a", "colour": "red"}, "colour", 400),
    ({"prompt": "a", "model": "dall-e-3"}, "model", 404),
    ({"prompt": "a", "seed": -1}, "seed", 400),
])
def test_bad_requests_get_openai_errors(server, body, param, status):
    r = gen(server["url"], **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"]


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_format_is_honoured_and_the_other_standard_fields_accepted(server, fmt, magic):
    r = gen(server["url"], prompt="a handwritten digit 4", seed=3, output_format=fmt, quality="high", style="natural",
            background="auto", moderation="low", **({} if fmt == "png" else {"output_compression": 20}))
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert raw.startswith(magic) and r.json()["output_format"] == fmt
    assert Image.open(io.BytesIO(raw)).size == (8, 8)


def test_the_openai_client(server):
    """The official client, as an application would call it (it sends a Bearer key; none is checked yet)."""
    import openai

    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)
    out = client.images.generate(prompt="a handwritten digit 6", n=2, size="32x32", quality="high",
                                 extra_body={"seed": 4, "output_format": "webp"})
    assert len(out.data) == 2 and Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (32, 32)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a handwritten digit 6", size="1024x1024")
    assert info.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="a", model="dall-e-3")
    with pytest.raises(openai.APIStatusError) as info:
        client.images.edit(image=("a.png", b"\x89PNG", "image/png"), prompt="a")
    assert info.value.status_code == 501


def test_malformed_json(server):
    r = requests.post(f"{server['url']}/v1/images/generations", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("raw,param,words", [
    (b'{"prompt": "a digit \\ud800"}', "prompt", "surrogate"),            # valid JSON, not encodable text
    (b'{"prompt": "a \\u0007 digit"}', "prompt", "U+0007"),                # a control character
    (b'{"prompt": "a", "user": "x\\udfff"}', "user", "surrogate"),
    (b'{"prompt": "a", "seed": NaN}', None, "finite"),
    (b'{"prompt": "a", "seed": -Infinity}', None, "finite"),
    (b'{"prompt": "a", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested"),
])
def test_input_that_parses_but_cannot_be_served_is_a_400(server, raw, param, words):
    r = requests.post(f"{server['url']}/v1/images/generations", data=raw, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert gen(server["url"], prompt="a handwritten digit 1", n=1, seed=1).status_code == 200  # still serving


def test_unknown_routes_and_methods_get_openai_errors(server):
    r = requests.get(f"{server['url']}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error" and "detail" not in r.json()
    r = requests.get(f"{server['url']}/v1/images/generations", timeout=10)
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"] and "POST" in r.headers["allow"]
    for route in ("edits", "variations"):  # the Images API's other endpoints: refused, in the error shape
        r = requests.post(f"{server['url']}/v1/images/{route}", files={"image": b"x"}, data={"prompt": "a"}, timeout=10)
        assert r.status_code == 501 and "not supported" in r.json()["error"]["message"], r.text


def test_overload_gets_503_quickly_and_stays_healthy(server):
    url = server["url"] + "/small"

    def one(i):
        t0 = time.time()
        r = gen(url, prompt="a handwritten digit 1", n=4 if i % 2 else 1, seed=i)
        return r.status_code, time.time() - t0

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(48)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
    assert max(t for c, t in results if c == 503) < 5
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_alias_move_under_load_has_zero_failures(server):
    from mlflow import MlflowClient

    stop, results = threading.Event(), []

    def client(i):
        while not stop.is_set():
            r = gen(server["url"], prompt="a handwritten digit 2", n=1, seed=i)
            results.append((r.status_code, r.headers.get("x-tdm-model"), time.time()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    moved_at = time.time()
    MlflowClient().set_registered_model_alias(MODEL, "champion", server["v2"])
    new = f"{MODEL}/{server['v2']}"
    deadline = moved_at + 60
    while time.time() < deadline and not any(m == new for _, m, _ in results):
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    first_new = min(ts for _, m, ts in results if m == new)
    assert first_new - moved_at < 60
    assert all(code == 200 for code, _, _ in results), {c for c, _, _ in results}
    assert [m for _, m, ts in results if ts > first_new + 1].count(f"{MODEL}/{server['v1']}") == 0


def test_parse_request_unit():
    cfg = ServeConfig(upscale_factors=[1, 32])
    assert INFO.sizes(cfg.upscale_factors) == ["8x8", "256x256"]
    job = parse_request(b'{"prompt": " a ", "n": 2, "size": "256x256", "seed": 5}', INFO, cfg)
    assert dict(prompt=job.prompt, n=job.n, steps=job.params.steps, seed=job.seed, scale=job.scale) == \
        {"prompt": "a", "n": 2, "steps": 4, "seed": 5, "scale": 32}
