"""A failure inside the batched network call fails only the request that caused it: the others in the
batch get the same images they would have got batched (tdm.serve.generator.run_isolated)."""
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
