"""A failure inside the batched network call fails only the request that caused it: the others in the
batch get the same images they would have got batched (tdm.serve.generator.run_isolated)."""
import pytest
import torch

from tdm.errors import ParamError
from tdm.serve.generator import run_images, run_isolated
from tdm.serve.protocol import GenerationJob
from tdm.spec import GenerationParams


class FakePipe:
    """Renders a flat image per sample from its seed; a prompt holding 'poison' breaks the whole call,
    as a tokenizer that raises on one prompt does."""

    class spec:  # noqa: N801 - what run_images reads of a ModelSpec
        fps = None

    def __init__(self):
        self.calls = 0

    def render(self, prompts, params, seeds):  # noqa: ARG002 - the pipeline signature
        self.calls += 1
        if any("poison" in p for p in prompts):
            raise UnicodeError("the tokenizer could not encode a prompt")
        return torch.stack([torch.full((3, 4, 4), (s % 7) / 7.0) for s in seeds])


def job(prompt, seed, n=1):
    params = GenerationParams(steps=4, guidance_scale=1.0, timesteps=(999, 749, 500, 250), cfg=False)
    return GenerationJob(prompt=prompt, n=n, params=params, seed=seed, scale=1, model_id="m/1")


def test_a_poisoned_job_fails_alone_and_the_others_keep_their_images():
    good = [job("a digit 1", 1, n=2), job("a digit 2", 5)]
    jobs = [good[0], job("poison", 3), good[1]]
    out = run_isolated(FakePipe(), jobs, chunk=4)
    assert isinstance(out[1], ParamError) and out[1].param == "prompt"
    alone = [run_images(FakePipe(), [g], chunk=4)[0] for g in good]
    assert out[0] == alone[0] and out[2] == alone[1] and len(out[0]) == 2


def test_a_clean_batch_runs_once():
    pipe = FakePipe()
    out = run_isolated(pipe, [job("a", 1), job("b", 2)], chunk=4)
    assert pipe.calls == 1 and all(isinstance(o, list) and len(o) == 1 for o in out)


@pytest.mark.slow
def test_a_poisoned_request_in_a_real_batch_fails_alone(ray_cluster, tdm_home, tiny_toy_dir, tmp_path):
    """Against a real Serve app and MLflow registry: a model whose text encoder knows one token fewer than
    its tokenizer (the word "handwritten") raises inside the batched call for any prompt holding it. That
    request gets a 400 on `prompt`; the good requests batched with it get the images they get alone."""
    import shutil
    import threading

    import requests
    from conftest import free_port
    from ray import serve
    from test_serve import _student_version
    from transformers import CLIPTextModel

    from tdm.serve import build_app

    toy = tmp_path / "poisoned-toy"
    shutil.copytree(tiny_toy_dir, toy)
    encoder = CLIPTextModel.from_pretrained(toy / "text_encoder")
    encoder.resize_token_embeddings(encoder.config.vocab_size - 1)   # drops the last token, "handwritten"
    encoder.save_pretrained(toy / "text_encoder")
    version = _student_version(tmp_path, 21, toy, name="tdm-poison-test")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_uri": f"models:/tdm-poison-test/{version.version}", "poll_interval_s": 0,
                         "max_batch_size": 8, "batch_wait_timeout_s": 0.5, "batch_invariant": True}),
              name="poison", route_prefix="/poison")
    url = f"http://127.0.0.1:{port}/poison/v1/images/generations"
    health = f"http://127.0.0.1:{port}/poison/healthz"

    def isolated():
        return requests.get(health, timeout=10).json()["counts"]["isolated_batches"]

    try:
        bodies = [{"prompt": f"a digit {d}", "seed": d} for d in range(5)]
        alone = [requests.post(url, json=b, timeout=60).json()["data"][0]["b64_json"] for b in bodies]
        bodies.insert(2, {"prompt": "a handwritten digit 3", "seed": 9})
        assert isolated() == 0
        # sent together; the replica's first job may still run alone (nothing else was in flight when it
        # came), so rounds repeat until the poisoned one has shared a batch with good ones
        for _ in range(6):
            start, answers = threading.Barrier(len(bodies)), [None] * len(bodies)

            def send(i, start=start, answers=answers):
                start.wait()
                answers[i] = requests.post(url, json=bodies[i], timeout=60)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            poisoned = answers.pop(2)
            assert poisoned.status_code == 400 and poisoned.json()["error"]["param"] == "prompt", poisoned.text
            assert "Traceback" not in poisoned.text and "IndexError" not in poisoned.text
            assert [a.status_code for a in answers] == [200] * 5
            assert [a.json()["data"][0]["b64_json"] for a in answers] == alone
            if isolated() > 0:
                break
        assert isolated() > 0       # it did share a batch, and only it failed
    finally:
        # shut Serve down: a later module's serve.start with its own port must not find this proxy running
        serve.shutdown()


def test_isolation_is_counted():
    counts = {}
    run_isolated(FakePipe(), [job("a digit 1", 1), job("poison", 3)], chunk=4, counts=counts)
    run_isolated(FakePipe(), [job("poison", 3)], chunk=4, counts=counts)      # alone: not a batch to isolate
    assert counts == {"isolated_batches": 1, "failed_jobs": 2}
