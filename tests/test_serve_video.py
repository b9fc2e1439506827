"""Serving a video model over HTTP against a real local Ray cluster, MLflow store and S3-compatible
server (moto): `POST /v1/videos` jobs, their status and MP4 content (decoded back with PyAV), batching,
refusals that say why, and a failing job reported on the job only."""
import asyncio
import concurrent.futures as cf
import json
import time

import numpy as np
import pytest
import requests
from conftest import free_port

from tdm.serve.store import MemoryJobStore, S3JobStore, VideoJob

VMODEL = "tdm-serve-video-test"
IMODEL = "tdm-serve-video-image-test"


def _register(tmp_path, name, backbone, spec, seed):
    import mlflow
    import torch

    from tdm.generation import TDMPipeline
    from tdm.tracking import get_or_create_experiment, log_pipeline_model, register, use_tracking_uri

    use_tracking_uri()
    torch.manual_seed(seed)
    out = tmp_path / f"{name}-{seed}"
    TDMPipeline(backbone, spec).save_pretrained(out)
    with mlflow.start_run(run_name=f"serve-video-{seed}", experiment_id=get_or_create_experiment("tdm")):
        info = log_pipeline_model(out, spec)
    return register(info.model_uri, name, {"kind": spec.kind}, alias="champion")


@pytest.fixture(scope="module")
def video_server(ray_cluster, tdm_home, s3_server, tiny_toy_dir, tmp_path_factory):
    from ray import serve

    from tdm.backbones import load_backbone
    from tdm.serve import build_app
    from tdm.spec import model_spec
    from tdm.toy.video_teacher import build_toy_video_backbone

    tmp = tmp_path_factory.mktemp("serve_video")
    video = build_toy_video_backbone(seed=0, heads=1, layers=1, head_dim=16)
    _register(tmp, VMODEL, video, model_spec(video, "student", 2, 1.0, grids={2: [1000, 500]}), 1)
    image = load_backbone(tiny_toy_dir)
    _register(tmp, IMODEL, image, model_spec(image, "student", 2, 1.0, grids={2: [999, 500]}), 2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_uri": f"models:/{VMODEL}@champion", "poll_interval_s": 0, "max_batch_size": 2,
                         "upscale_factors": [1, 2], "video_store": "s3://tdm-test/video-jobs"}),
              name="video", route_prefix="/video")
    serve.run(build_app({"model_uri": f"models:/{IMODEL}@champion", "poll_interval_s": 0}), name="image",
              route_prefix="/image")
    url = f"http://127.0.0.1:{port}"
    for prefix in ("/video", "/image"):
        deadline = time.time() + 120
        while requests.get(f"{url}{prefix}/healthz", timeout=30).status_code != 200:
            assert time.time() < deadline, f"{prefix} did not become healthy"
            time.sleep(1)
    yield {"url": url, "video": f"{url}/video", "image": f"{url}/image"}
    serve.delete("video")
    serve.delete("image")


def wait_done(base, video_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = requests.get(f"{base}/v1/videos/{video_id}", timeout=30).json()
        if body["status"] in ("completed", "failed"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{video_id} did not finish")


def test_video_job_lifecycle_and_mp4_content(video_server):
    from tdm.video import mp4_frames

    base = video_server["video"]
    r = requests.post(f"{base}/v1/videos", json={"prompt": "a handwritten digit 3 moving left", "seconds": "1.25",
                                                  "seed": 5}, timeout=30)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["id"].startswith("video_")
    assert job["model"].startswith(f"{VMODEL}/") and job["size"] == "16x16" and job["num_frames"] == 5
    assert job["created_at"] <= time.time() and job["expires_at"] > job["created_at"]
    done = wait_done(base, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"] >= job["created_at"]
    content = requests.get(f"{base}/v1/videos/{job['id']}/content", timeout=30)
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    frames, fps = mp4_frames(content.content)
    assert frames.shape == (5, 16, 16, 3) and fps == pytest.approx(4.0)
    # the job and its MP4 live in the S3-compatible store, where any replica reads them
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="tdm-test", Prefix="video-jobs/")["Contents"]}
    assert {f"video-jobs/{job['id']}.json", f"video-jobs/{job['id']}.mp4"} <= keys
    # num_frames instead of seconds, a larger size, and the same seed: the same video, upscaled
    again = requests.post(f"{base}/v1/videos", json={"prompt": "a handwritten digit 3 moving left", "num_frames": 5,
                                                      "seed": 5, "size": "32x32"}, timeout=30).json()
    assert wait_done(base, again["id"])["status"] == "completed"
    big, _ = mp4_frames(requests.get(f"{base}/v1/videos/{again['id']}/content", timeout=30).content)
    assert big.shape == (5, 32, 32, 3)


def test_concurrent_video_jobs_are_batched_and_seeded(video_server):
    base = video_server["video"]

    def post(seed):
        return requests.post(f"{base}/v1/videos", json={"prompt": "a handwritten digit 7 moving up", "seed": seed},
                             timeout=30).json()["id"]

    with cf.ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(post, [1, 2, 3, 4, 5, 1]))
    bodies = [wait_done(base, i) for i in ids]
    assert all(b["status"] == "completed" for b in bodies)
    content = [requests.get(f"{base}/v1/videos/{i}/content", timeout=30).content for i in ids]
    assert content[0] == content[5]             # the same seed gives the same video whatever its batch
    assert len(set(content[:5])) == 5


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "seconds": "3"}, "seconds"),
    ({"prompt": "x", "seconds": "soon"}, "seconds"),
    ({"prompt": "x", "num_frames": 7}, "num_frames"),
    ({"prompt": "x", "size": "640x480"}, "size"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "model": "someone-else"}, "model"),
])
def test_bad_video_requests_name_the_field(video_server, body, param):
    r = requests.post(f"{video_server['video']}/v1/videos", json=body, timeout=30)
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, r.text


def test_image_and_video_requests_to_the_wrong_kind_of_model_get_400(video_server):
    r = requests.post(f"{video_server['video']}/v1/images/generations", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and "generates videos; use POST /v1/videos" in r.json()["error"]["message"]
    r = requests.post(f"{video_server['image']}/v1/videos", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and "generates images; use POST /v1/images/generations" in r.json()["error"]["message"]
    ok = requests.post(f"{video_server['image']}/v1/images/generations", json={"prompt": "a handwritten digit 1"},
                       timeout=60)
    assert ok.status_code == 200
    models = requests.get(f"{video_server['video']}/v1/models", timeout=30).json()["data"]
    assert models[0]["frames"] == 5 and models[0]["fps"] == 4.0


def test_unknown_and_unfinished_jobs(video_server, s3_server):
    base = video_server["video"]
    assert requests.get(f"{base}/v1/videos/video_nope", timeout=30).status_code == 404
    assert requests.get(f"{base}/v1/videos/video_nope/content", timeout=30).status_code == 404
    # a job still running (written straight into the shared store) has no content yet
    store = S3JobStore("s3://tdm-test/video-jobs")
    job = VideoJob(id=VideoJob.new_id(), model="m/1", prompt="p", seconds="1.25", size="12x12", seed=0, steps=2,
                   num_frames=5, status="in_progress")
    store.put(job)
    r = requests.get(f"{base}/v1/videos/{job.id}/content", timeout=30)
    assert r.status_code == 409 and "in_progress" in r.json()["error"]["message"]
    # one whose runner vanished long ago is reported failed (timeout), not left running forever
    stale = VideoJob(id=VideoJob.new_id(), model="m/1", prompt="p", seconds="1.25", size="12x12", seed=0, steps=2,
                     num_frames=5, status="in_progress",
                     created_at=int(time.time()) - 1000)  # past the job timeout (900 s), within the TTL
    store.put(stale)
    body = requests.get(f"{base}/v1/videos/{stale.id}", timeout=30).json()
    assert body["status"] == "failed" and body["error"]["code"] == "timeout"


def test_a_failing_job_is_reported_on_the_job_only():
    """Fault injection: the generator raises for one job. That job is stored as failed with the reason;
    the next job, on the same ingress, completes."""
    from tdm.serve.ingress import TDMIngress
    from tdm.serve.protocol import GenerationJob, GenerationResult
    from tdm.spec import GenerationParams

    class Remote:  # a deployment method: .remote() gives an awaitable that can be cancelled
        def __init__(self, fn):
            self.remote = lambda *args: asyncio.ensure_future(fn(*args))

    class FaultyGenerator:
        def __init__(self):
            self.calls = 0

            async def generate(job):
                self.calls += 1
                if self.calls == 1:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                if self.calls == 2:
                    raise KeyError()      # no message: nothing of the exception reaches the client
                return GenerationResult("m/1", (b"mp4-bytes",))
            self.generate = Remote(generate)

    ingress = TDMIngress.func_or_class.__new__(TDMIngress.func_or_class)
    ingress.generator, ingress.store = FaultyGenerator(), MemoryJobStore(max_jobs=10, ttl_s=60)
    params = GenerationParams(2, 1.0, (1000, 500), False)
    job = GenerationJob("p", 1, params, 0, 1, "m/1", video=True)
    records = [VideoJob(id=VideoJob.new_id(), model="m/1", prompt="p", seconds="1", size="12x12", seed=0, steps=2,
                        num_frames=5) for _ in range(3)]
    for r in records:
        asyncio.run(ingress._run_video(r, job))
    failed, bare, ok = (ingress.store.get(r.id) for r in records)
    assert failed.status == "failed" and failed.error["message"] == \
        "generation failed: CUDA error: an illegal memory access was encountered"      # no exception type
    assert bare.status == "failed" and bare.error["message"] == "generation failed: internal error (see the " \
        "server log)" and "KeyError" not in json.dumps(bare.error)
    assert ok.status == "completed" and ingress.store.content(ok.id) == b"mp4-bytes"


def test_stores_are_bounded(s3_server):
    mem = MemoryJobStore(max_jobs=3, ttl_s=60)
    jobs = [VideoJob(id=VideoJob.new_id(), model="m", prompt="p", seconds="1", size="1x1", seed=i, steps=1,
                     num_frames=1) for i in range(5)]
    for j in jobs:
        mem.put(j)
    assert [mem.get(j.id) is not None for j in jobs] == [False, False, True, True, True]
    old = VideoJob(id=VideoJob.new_id(), model="m", prompt="p", seconds="1", size="1x1", seed=9, steps=1,
                   num_frames=1, created_at=int(time.time()) - 120)
    mem.put(old)
    assert mem.get(old.id) is None                          # past its TTL
    s3 = S3JobStore("s3://tdm-test/bounded", max_jobs=2, ttl_s=60)
    for j in jobs[:4]:
        s3.put(j, b"x")
    assert s3.prune() == 2
    left = [j for j in jobs[:4] if s3.get(j.id) is not None]
    assert len(left) == 2 and s3.content(left[0].id) == b"x"


def test_the_playground_plays_the_video_the_api_makes(video_server):
    """The playground page of a video model (tests/test_playground.py drives the image one), in headless
    chromium: it shows the model as a video model, hides `n`, runs a job, and plays its MP4 back at the
    model's size; the video is the one the API returns for the same prompt and seed."""
    from selenium.webdriver.support.ui import WebDriverWait
    from test_playground import chrome, fill, open_page

    base = video_server["video"]
    model_id = requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    try:
        driver = chrome()
    except RuntimeError as e:      # no chromium here: a failure that says what to install, never a skip
        pytest.fail(str(e), pytrace=False)
    try:
        open_page(driver, base, model_id)
        shown_model = driver.find_element("id", "model").text
        assert shown_model == f"{model_id} (video, 5 frames)", shown_model
        assert not driver.find_element("id", "n").is_displayed()
        fill(driver, "a handwritten digit 4 moving up", seed=11, size="32x32")
        driver.find_element("id", "generate").click()

        def playing(d):   # decoded by the browser: its metadata read and a frame ready to draw
            v = d.find_elements("css selector", "#results video")
            ok = len(v) == 1 and d.execute_script("return arguments[0].readyState >= 2", v[0])
            return v[0] if ok else False

        try:
            video = WebDriverWait(driver, 120).until(playing)
        except Exception:
            raise AssertionError(f"no playable video: status {driver.find_element('id', 'status').text!r}, "
                                 f"error {driver.find_element('id', 'error').text!r}") from None
        size = driver.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video)
        assert size == [32, 32]
        assert not driver.find_element("id", "error").is_displayed()
        assert driver.find_element("css selector", "#results figcaption").text == f"{model_id}\nseed 11"
        shown = driver.execute_async_script(
            "const done = arguments[1]; fetch(arguments[0].src).then(r => r.arrayBuffer())"
            ".then(b => done(Array.from(new Uint8Array(b))));", video)
    finally:
        driver.quit()
    job = requests.post(f"{base}/v1/videos", json={"prompt": "a handwritten digit 4 moving up", "seed": 11,
                                                    "size": "32x32"}, timeout=30).json()
    assert wait_done(base, job["id"])["status"] == "completed"
    direct = requests.get(f"{base}/v1/videos/{job['id']}/content", timeout=30).content
    # the same video, not the same bytes: a job batched with another runs at another bucket size (README,
    # "Serving: batching"), which moves pixels by rounding and so the H.264 stream
    from tdm.video import mp4_frames

    (page, _), (api, _) = mp4_frames(bytes(shown)), mp4_frames(direct)
    assert page.shape == api.shape == (5, 32, 32, 3)
    assert np.abs(page.astype(np.float64) - api.astype(np.float64)).mean() < 2.0
