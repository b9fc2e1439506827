"""Model directories written by tdm 0.1.0 (before ModelSpec: tdm_model.json without schema_version, kept in
tests/fixtures/legacy_v0) still load, describe themselves as the same model, and generate the images
that code generated from them."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdm.errors import InputError, ParamError
from tdm.generation import TDMPipeline
from tdm.spec import SPEC_FILE, ModelSpec

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_v0"
PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURES / "expected_images.safetensors"))


def test_fixtures_are_schema_0():
    for name in ("student_unify_v0", "teacher_v0"):
        assert "schema_version" not in json.loads((FIXTURES / name / SPEC_FILE).read_text())


def test_legacy_student_spec_migrates():
    spec = ModelSpec.load(FIXTURES / "student_unify_v0")
    assert (spec.kind, spec.family, spec.default_steps, spec.guidance_scale) == ("student", "unet", 4, 2.0)
    assert spec.step_conditioned and spec.supported_steps == [1, 2, 4]
    assert spec.grids == {1: [999], 2: [999, 500], 4: [999, 749, 500, 250]}
    assert spec.teacher.location == "models:/tdm-toy-teacher/1" and spec.teacher.revision is None
    assert spec.diffusers.call["timesteps"] == [999, 749, 500, 250] and spec.image_size is None
    teacher = ModelSpec.load(FIXTURES / "teacher_v0")
    assert (teacher.kind, teacher.default_steps, teacher.supported_steps, teacher.grids) == ("teacher", 50, None, {})


def test_legacy_student_generates_what_0_1_0_generated(expected):
    pipe = TDMPipeline.from_pretrained(FIXTURES / "student_unify_v0")
    assert pipe.spec.image_size == (8, 8)                  # filled in from the weights
    for k in (1, 2, 4):
        # the fixture was made on another CPU: float32 kernels (AVX2, AVX-512) round differently, 1e-5 apart
        torch.testing.assert_close(pipe(PROMPTS, num_inference_steps=k, seed=5), expected[f"student_k{k}"],
                                   atol=1e-4, rtol=0, msg=f"num_inference_steps={k}")
    with pytest.raises(ParamError, match="num_inference_steps"):
        pipe(PROMPTS, num_inference_steps=3)


def test_legacy_teacher_generates_what_0_1_0_generated(expected):
    pipe = TDMPipeline.from_pretrained(FIXTURES / "teacher_v0")
    torch.testing.assert_close(pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, seed=5),
                               expected["teacher_k4_g3"], atol=1e-4, rtol=0)


def test_legacy_directory_through_pyfunc_and_serving(expected):
    from types import SimpleNamespace

    from tdm.images import to_png_bytes
    from tdm.pyfunc import TDMPyfuncModel
    from tdm.serve.generator import load_served_model

    model = TDMPyfuncModel()
    model.load_context(SimpleNamespace(artifacts={"pipeline": str(FIXTURES / "student_unify_v0")}, model_config={}))
    assert model.predict(None, PROMPTS, params={"seed": 5, "num_inference_steps": 2}) == \
        to_png_bytes(expected["student_k2"])
    _, served = load_served_model(str(FIXTURES / "student_unify_v0"), None)
    assert served.models_entry([1])["steps"] == [1, 2, 4] and served.sizes([1, 4]) == ["8x8", "32x32"]


def test_resaving_a_legacy_directory_writes_schema_1(tmp_path, expected):
    pipe = TDMPipeline.from_pretrained(FIXTURES / "student_unify_v0")
    pipe.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / SPEC_FILE).read_text())["schema_version"] == 1
    again = TDMPipeline.from_pretrained(tmp_path / "again")(PROMPTS, num_inference_steps=4, seed=5)
    assert torch.equal(again, pipe(PROMPTS, num_inference_steps=4, seed=5))   # same machine: the same bits
    torch.testing.assert_close(again, expected["student_k4"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("change,message", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"t_start": 899}, "t_start: 899 is not the schedule's last timestep 999"),
    ({"step_values": [1, 2]}, "step_values [1, 2] do not match the grids [1, 2, 4]"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
])
def test_broken_legacy_files_name_the_field(tmp_path, change, message):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "student_unify_v0", d)
    data = json.loads((d / SPEC_FILE).read_text()) | change
    (d / SPEC_FILE).write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"^{d / SPEC_FILE}: ") as err:
        TDMPipeline.from_pretrained(d)
    assert message in str(err.value)
