"""The served model's life cycle against a real local Ray cluster and MLflow store: a broken version
under load never replaces the served one and is retried with back-off; start-up with the registry
unreachable serves the newest cached version (or is not ready); the model cache stays bounded and
failed downloads leave nothing behind. README, "Serving: the model life cycle"."""
import concurrent.futures as cf
import threading
import time

import pytest
import requests
from conftest import free_port
from test_serve import _student_version, gen

MODEL = "tdm-lifecycle-test"


@pytest.fixture(scope="module")
def life(ray_cluster, tdm_home, tiny_toy_dir, tmp_path_factory):
    from mlflow import MlflowClient
    from ray import serve

    from tdm.serve import build_app

    tmp = tmp_path_factory.mktemp("life")
    good = _student_version(tmp, 11, tiny_toy_dir, name=MODEL)
    broken = _student_version(tmp, 12, tiny_toy_dir, name=MODEL, broken=True)
    MlflowClient().set_registered_model_alias(MODEL, "champion", good.version)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_uri": f"models:/{MODEL}@champion", "poll_interval_s": 0.5,
                         "load_retry_initial_s": 1, "load_retry_max_s": 4, "model_cache_versions": 2}),
              name="life", route_prefix="/life")
    yield {"url": f"http://127.0.0.1:{port}", "good": str(good.version), "broken": str(broken.version),
           "tmp": tmp, "toy": tiny_toy_dir}
    serve.shutdown()


def _health(url):
    r = requests.get(f"{url}/healthz", timeout=10)
    return r.status_code, r.json()


def test_a_broken_version_under_load_never_replaces_the_served_one(life):
    from mlflow import MlflowClient

    from tdm import paths
    from tdm.tracking import cached_versions

    url, old = life["url"] + "/life", f"{MODEL}/{life['good']}"
    stop, results = threading.Event(), []

    def client(i):
        while not stop.is_set():
            r = gen(url, prompt="a handwritten digit 4", seed=i)
            results.append((r.status_code, r.headers.get("x-tdm-model")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    MlflowClient().set_registered_model_alias(MODEL, "champion", life["broken"])
    t_moved = time.time()
    seen = []
    while time.time() - t_moved < 9:
        seen.append(_health(url))
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert results and all(r == (200, old) for r in results), {r for r in results if r != (200, old)}
    code, last = seen[-1]
    assert code == 200 and last["serving"] == old and last["pending"]["model"] == f"{MODEL}/{life['broken']}"
    assert last["last_error"]["model"] == f"{MODEL}/{life['broken']}" and last["last_error"]["message"]
    # back-off 1, 2, 4, 4 s: a handful of attempts in 9 s, where polling every 0.5 s would make 18
    assert 2 <= last["pending"]["attempts"] <= 6, last
    assert last["pending"]["retry_at"] >= int(t_moved)
    listed = requests.get(f"{url}/v1/models", timeout=10).json()
    assert listed["serving"] == old and listed["pending"]["model"] == f"{MODEL}/{life['broken']}"
    assert not list(paths.cache_dir("models").glob(".download-*"))   # nothing partial left behind

    # a good version behind it is served; the cache keeps model_cache_versions (2) versions of the model
    newer = _student_version(life["tmp"], 13, life["toy"], name=MODEL)
    MlflowClient().set_registered_model_alias(MODEL, "champion", newer.version)
    deadline = time.time() + 60
    while time.time() < deadline and _health(url)[1]["serving"] != f"{MODEL}/{newer.version}":
        time.sleep(0.5)
    code, now = _health(url)
    assert code == 200 and now["serving"] == f"{MODEL}/{newer.version}" and now["pending"] is None
    assert [v for v, _ in cached_versions(MODEL)] == [int(newer.version), int(life["broken"])]


def test_start_up_with_the_registry_down_serves_the_newest_cached_version(life):
    from ray import serve

    from tdm.serve import build_app
    from tdm.tracking import cached_versions

    down = f"http://127.0.0.1:{free_port()}"           # nothing listens there
    newest = cached_versions(MODEL)[0][0]              # v3; the broken v2 is older
    serve.run(build_app({"model_uri": f"models:/{MODEL}@champion", "tracking_uri": down, "poll_interval_s": 1}),
              name="offline", route_prefix="/offline")
    url = life["url"] + "/offline"
    code, health = _health(url)
    assert code == 200 and health["serving"] == f"{MODEL}/{newest}" and health["source"] == "cache"
    assert "registry" in health["last_error"]["message"]
    r = gen(url, prompt="a handwritten digit 5", seed=1)
    assert r.status_code == 200 and r.headers["x-tdm-model"] == f"{MODEL}/{newest}"
    serve.delete("offline")


def test_start_up_with_the_registry_down_and_nothing_cached_is_not_ready(life):
    from ray import serve

    from tdm.serve import build_app

    down = f"http://127.0.0.1:{free_port()}"
    serve.run(build_app({"model_uri": "models:/tdm-never-downloaded@champion", "tracking_uri": down,
                         "poll_interval_s": 0, "load_retry_initial_s": 2}), name="cold", route_prefix="/cold")
    url = life["url"] + "/cold"
    with cf.ThreadPoolExecutor(8) as pool:   # answered at once, never hanging, never a 500
        answers = list(pool.map(lambda _: requests.get(f"{url}/healthz", timeout=10), range(8)))
    for r in answers:
        assert r.status_code == 503 and r.json()["status"] in ("loading", "unavailable") and r.json()["model"] is None
    r = gen(url, prompt="a handwritten digit 5")
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "server_error" and "/healthz" in r.json()["error"]["message"]
    serve.delete("cold")


def test_healthz_answers_at_once_while_a_replica_is_still_loading(life):
    """A registry that accepts connections and never answers keeps the generator's first load busy (MLflow
    waits out its timeouts); /healthz still answers within seconds, 503 with a status."""
    import socket

    from ray import serve

    from tdm.serve import build_app

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)                      # accepts (the kernel does), never reads, never answers
    down = f"http://127.0.0.1:{hole.getsockname()[1]}"
    app = build_app({"model_uri": f"models:/{MODEL}@champion", "tracking_uri": down, "poll_interval_s": 0})

    def deploy():  # serve.run returns once the replicas are up, after the first load attempt
        try:
            serve.run(app, name="loading", route_prefix="/loading")
        except Exception:  # noqa: BLE001 - deleted before it was up
            pass

    deployer = threading.Thread(target=deploy, daemon=True)
    deployer.start()
    try:
        url = life["url"] + "/loading"
        answers, deadline = [], time.time() + 60
        while len(answers) < 3 and time.time() < deadline:
            t0 = time.time()
            r = requests.get(f"{url}/healthz", timeout=30)
            if r.status_code == 404:     # the route is not up yet
                time.sleep(0.5)
                continue
            answers.append((r.status_code, r.json(), time.time() - t0))
        assert len(answers) == 3, answers
        for code, body, took in answers:
            assert code == 503 and body["status"] in ("loading", "unavailable") and took < 10, (code, body, took)
        r = gen(url, prompt="a handwritten digit 5", timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        hole.close()                     # the registry now refuses: the load falls back on the cache
        deployer.join(timeout=120)
        serve.delete("loading")
