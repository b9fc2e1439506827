"""Serving benchmark on the toy student (a registered tdm model).

1. Throughput (images/s) with batching (max_batch_size=16, chunks padded to their power-of-two bucket)
   vs without (max_batch_size=1) at concurrency 1, 4 and 16: closed-loop HTTP clients, each sending n=1
   requests back to back. Targets: >= 0.9x at 1, >= 1.5x at 4, >= 2.5x at 16. The batch-invariant
   variant (every chunk padded to 16) is measured beside them, for the trade-off in the README.
2. Latency at batch 1: median end-to-end HTTP latency (unbatched deployment, one client) vs the bare
   sampler called in-process on the same model (sampling + PNG encoding), same machine, same run.
   Generator replicas get every core (`num_cpus` = the machine's), so their torch uses as many threads
   as the bare sampler's (Ray gives an actor OMP_NUM_THREADS = its num_cpus). Where the time goes, measured
   interleaved with the two: the generator called through its DeploymentHandle (no HTTP), and an HTTP
   request the ingress rejects (400, never reaches the model: the proxy + ingress floor).
3. The API key check: the same rejected request to an app that requires a key (10 active keys, the
   right one sent) vs one without keys, interleaved; and APIKeys.check alone, in-process. Target: the
   check adds <= 1 ms at p50.

    python bench/bench_serve.py [--model-uri models:/tdm-student@champion] [--seconds 15]

Uses the local tdm MLflow store ($TDM_HOME); run `python pipelines/distill.py` first.
"""
import argparse
import concurrent.futures as cf
import os
import statistics
import tempfile
import time
from pathlib import Path

import requests


def closed_loop(url: str, concurrency: int, seconds: float) -> float:
    """Images per second with `concurrency` clients for `seconds`."""
    stop = time.time() + seconds
    done = [0] * concurrency

    def client(i):
        seed = i * 100_000
        session = requests.Session()  # keep-alive, as real clients do: measure the server, not TCP set-up
        while time.time() < stop:
            r = session.post(url, json={"prompt": f"a handwritten digit {seed % 10}", "n": 1, "seed": seed},
                             timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
            done[i] += 1
            seed += 1

    t0 = time.time()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return sum(done) / (time.time() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", default="models:/tdm-student@champion")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--latency-reps", type=int, default=200)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.03)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from tdm.images import to_png_bytes
    from tdm.serve import build_app
    from tdm.serve.auth import APIKeys
    from tdm.serve.generator import load_served_model
    from tdm.serve.protocol import GenerationJob

    # Two apps, each generator reserving every core: they are measured one at a time, never together.
    cores = os.cpu_count()
    ray.init(num_cpus=3 * cores + 1, include_dashboard=False, log_to_driver=False)  # + the twins' 2 x 0.5
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    base = "http://127.0.0.1:8765"
    common = {"model_uri": args.model_uri, "poll_interval_s": 0, "max_images_per_request": 1, "num_cpus": cores,
              "max_queued_requests": 256}
    batched = {**common, "max_batch_size": 16, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    serve.run(build_app(batched), name="batched", route_prefix="/batched")
    serve.run(build_app({**batched, "batch_invariant": True}), name="invariant", route_prefix="/invariant")
    serve.run(build_app({**common, "max_batch_size": 1, "batch_wait_timeout_s": 0.0}), name="unbatched",
              route_prefix="/unbatched")
    keys = Path(tempfile.mkdtemp()) / "keys"
    keys.write_text("".join(f"bench-key-{i:02d}-{'x' * 40}\n" for i in range(10)))
    # twins but for the keys: the key check is the only difference between their requests
    twin = {**common, "num_cpus": 0.5, "max_batch_size": 1}
    serve.run(build_app({**twin, "api_keys_file": str(keys)}), name="keyed", route_prefix="/keyed")
    serve.run(build_app(twin), name="open", route_prefix="/open")
    for name in ("batched", "invariant", "unbatched"):
        closed_loop(f"{base}/{name}/v1/images/generations", 4, 2)  # warm-up
    print(f"model {args.model_uri}; {os.cpu_count()} CPU cores; {args.seconds:.0f} s per point; batched: "
          f"max_batch_size 16, batch_wait_timeout_s {args.batch_wait_timeout_s:g}\n")
    print(f"{'concurrency':>11}{'batched img/s':>15}{'unbatched img/s':>17}{'ratio':>8}{'invariant img/s':>17}"
          f"{'ratio':>8}")
    rounds = 5
    for c in (1, 4, 16):
        # the three interleaved in `rounds` slices at each point, so the machine's drift hits them alike
        rate = {name: 0.0 for name in ("batched", "unbatched", "invariant")}
        for _ in range(rounds):
            for name in rate:
                rate[name] += closed_loop(f"{base}/{name}/v1/images/generations", c, args.seconds / rounds) / rounds
        b, u, v = rate["batched"], rate["unbatched"], rate["invariant"]
        print(f"{c:>11}{b:>15.1f}{u:>17.1f}{b / u:>8.2f}x{v:>17.1f}{v / u:>8.2f}x")
    serve.delete("invariant")

    pipe, model = load_served_model(args.model_uri, None)
    params = model.spec.check_generation()

    def bare(i):
        t0 = time.perf_counter()
        to_png_bytes(pipe([f"a handwritten digit {i % 10}"], seeds=[i]))
        return time.perf_counter() - t0

    session = requests.Session()
    url = f"{base}/unbatched/v1/images/generations"

    def http(i):
        t0 = time.perf_counter()
        body = {"prompt": f"a handwritten digit {i % 10}", "n": 1, "seed": i}
        session.post(url, json=body, timeout=60).raise_for_status()
        return time.perf_counter() - t0

    generator = serve.get_deployment_handle("TDMGenerator", "unbatched")

    def handle(i):
        t0 = time.perf_counter()
        generator.generate.remote(GenerationJob(f"a handwritten digit {i % 10}", 1, params, i, 1, model.id)).result()
        return time.perf_counter() - t0

    def rejected(_i):
        t0 = time.perf_counter()
        assert session.post(url, json={"prompt": ""}, timeout=60).status_code == 400
        return time.perf_counter() - t0

    auth = {"Authorization": f"Bearer bench-key-09-{'x' * 40}"}

    def rejected_open(_i):
        t0 = time.perf_counter()
        assert session.post(f"{base}/open/v1/images/generations", json={"prompt": ""}, headers=auth,
                            timeout=60).status_code == 400
        return time.perf_counter() - t0

    def rejected_keyed(_i):
        t0 = time.perf_counter()
        assert session.post(f"{base}/keyed/v1/images/generations", json={"prompt": ""}, headers=auth,
                            timeout=60).status_code == 400
        return time.perf_counter() - t0

    # interleave them so machine noise hits all alike
    rows = {"bare sampler (in-process)": bare, "served over HTTP": http, "generator via handle (no HTTP)": handle,
            "HTTP request rejected by the ingress": rejected,
            "rejected, app without keys": rejected_open, "rejected, its twin checking keys (10)": rejected_keyed}
    times = {name: [] for name in rows}
    for i in range(args.latency_reps):
        for name, fn in rows.items():
            times[name].append(fn(i))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    b, h = med["bare sampler (in-process)"], med["served over HTTP"]
    print("\nlatency at batch 1 (median of %d, interleaved):" % args.latency_reps)
    for name, m in med.items():
        print(f"  {name:<38}{m * 1000:7.1f} ms")
    print(f"ratio served / bare: {h / b:.2f}x (target <= 1.15x); HTTP path over the handle "
          f"{(h - med['generator via handle (no HTTP)']) * 1000:.1f} ms")
    added = (med["rejected, its twin checking keys (10)"] - med["rejected, app without keys"]) * 1000
    checker = APIKeys(str(keys))
    header = auth["Authorization"]
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        checker.check(header)
    alone_us = (time.perf_counter() - t0) / n * 1e6
    print(f"API key check: adds {added:+.2f} ms at p50 over HTTP (target <= 1 ms); APIKeys.check alone "
          f"{alone_us:.1f} us (10 keys, in-process)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
