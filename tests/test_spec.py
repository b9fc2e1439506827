"""The typed contracts (tdm.spec): ModelSpec round-trips, rejects unknown and invalid fields naming them,
and alone decides which steps and guidance a request may use; TeacherRef and WorkerSpec."""
import json

import pytest

from tdm.config import load_config
from tdm.errors import InputError, ParamError
from tdm.spec import SCHEMA_VERSION, SPEC_FILE, ModelSpec, ScheduleSpec, TeacherRef, WorkerSpec

VP = ScheduleSpec(kind="vp", prediction_type="epsilon", num_train_timesteps=1000)
TEACHER = TeacherRef(kind="registry", uri="models:/t@champion", location="models:/t/3", revision="3-abcdef012345")


def student(**kw) -> ModelSpec:
    base = dict(kind="student", family="unet", schedule=VP, default_steps=4, grids={4: [999, 749, 500, 250]},
                guidance_scale=2.0, image_size=(8, 8), teacher=TEACHER)
    return ModelSpec(**(base | kw))


def unify() -> ModelSpec:
    return student(grids={1: [999], 2: [999, 500], 4: [999, 749, 500, 250]}, step_conditioned=True)


def teacher() -> ModelSpec:
    return ModelSpec(kind="teacher", family="unet", schedule=VP, default_steps=50, guidance_scale=2.0)


@pytest.mark.parametrize("make", [student, unify, teacher])
def test_round_trip_through_the_file(make, tmp_path):
    spec = make()
    path = spec.save(tmp_path)
    assert path.name == SPEC_FILE
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert ModelSpec.load(tmp_path) == spec
    assert ModelSpec.parse(json.loads(spec.model_dump_json())) == spec


@pytest.mark.parametrize("change,field", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"schedule": {"kind": "vp", "prediction_type": "epsilon", "num_train_timesteps": 1000, "sift": 3}},
     "unknown key 'schedule.sift'"),
    ({"teacher": {"kind": "ftp", "uri": "x", "location": "x", "revision": None}}, "teacher.kind"),
    ({"kind": "fake"}, "kind"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"default_steps": 0}, "default_steps"),
    ({"default_steps": 2}, "default_steps: 2 has no grid"),
    ({"grids": {"4": [999, 749, 500]}}, "grids: the grid has 3 entries for K=4"),
    ({"grids": {"4": [999, 500, 749, 250]}}, "grids: the grid must be strictly descending and > 0"),
    ({"grids": {"4": [1200, 749, 500, 250]}}, "grids: the grid of K=4 starts at 1200, beyond the schedule's last"),
    ({"fps": 8.0}, "fps: only a video model"),
    ({"frames": 0}, "frames"),
    ({"schema_version": 7}, "schema_version 7 is not supported"),
])
def test_unknown_and_invalid_fields_are_named(change, field):
    data = json.loads(student().model_dump_json()) | change
    with pytest.raises(InputError, match="^where: ") as err:
        ModelSpec.parse(data, "where")
    assert field in str(err.value)


def test_a_teacher_has_no_grids():
    with pytest.raises(ValueError, match="a teacher samples the uniform grid"):
        ModelSpec(kind="teacher", family="unet", schedule=VP, default_steps=50, guidance_scale=1.0, grids={4: [999, 749,
                                                                                                            500, 250]})


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(InputError, match="is not a tdm model directory"):
        ModelSpec.load(tmp_path)
    (tmp_path / SPEC_FILE).write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        ModelSpec.load(tmp_path)
    (tmp_path / SPEC_FILE).write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a JSON object"):
        ModelSpec.load(tmp_path)


# ---------------------------------------------------------------- the generation rules

def test_fixed_k_student_uses_its_grid_and_guidance():
    p = student().check_generation()
    assert (p.steps, p.guidance_scale, p.timesteps, p.cfg) == (4, 2.0, (999, 749, 500, 250), False)
    assert student().check_generation(2, 2.0).timesteps == (999, 500)       # other K: the uniform grid
    assert student().check_generation(4.0).steps == 4                       # an integral float is an integer
    with pytest.raises(ParamError, match="^guidance_scale: this student has guidance 2.0 distilled in") as e:
        student().check_generation(4, 3.0)
    assert e.value.param == "guidance_scale"
    for bad in (0, 1000, -3):
        with pytest.raises(ParamError, match=r"^num_inference_steps: must be in \[1, 999\]"):
            student().check_generation(bad)
    for bad in (2.5, "4", True):
        with pytest.raises(ParamError, match="^num_inference_steps: must be an integer"):
            student().check_generation(bad)


def test_unify_student_accepts_exactly_its_step_counts():
    spec = unify()
    assert spec.supported_steps == [1, 2, 4]
    assert [spec.check_generation(k).timesteps for k in (1, 2)] == [(999,), (999, 500)]
    with pytest.raises(ParamError, match=r"^num_inference_steps: must be one of \[1, 2, 4\] for this TDM-unify"):
        spec.check_generation(3)


def test_teacher_accepts_any_steps_and_guidance():
    spec = teacher()
    assert spec.supported_steps is None and spec.check_generation().steps == 50
    p = spec.check_generation(8, 4.5)
    assert (p.steps, p.guidance_scale, p.cfg, len(p.timesteps)) == (8, 4.5, True, 8)
    assert spec.check_generation(8, 1).cfg is False                          # guidance 1: one branch
    with pytest.raises(ParamError, match=r"^guidance_scale: must be >= 1"):
        spec.check_generation(8, 0.5)
    for bad in (float("nan"), "2", True):
        with pytest.raises(ParamError, match="^guidance_scale: must be a finite number"):
            spec.check_generation(8, bad)


def test_param_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ParamError("num_inference_steps", "must be one of [1]")))
    assert (err.param, err.detail, str(err)) == ("num_inference_steps", "must be one of [1]",
                                                 "num_inference_steps: must be one of [1]")


# ---------------------------------------------------------------- what it generates

def test_registry_tags():
    tags = unify().registry_tags()
    assert tags["kind"] == "student" and tags["num_steps"] == "4" and tags["step_values"] == "[1, 2, 4]"
    assert json.loads(tags["timesteps"]) == {"1": [999], "2": [999, 500], "4": [999, 749, 500, 250]}
    assert (tags["guidance_scale"], tags["prediction_type"], tags["step_conditioned"]) == ("2.0", "epsilon", "True")
    assert (tags["teacher"], tags["teacher_revision"]) == ("models:/t/3", "3-abcdef012345")
    assert all(isinstance(v, str) for v in tags.values())
    assert "timesteps" not in teacher().registry_tags() and teacher().registry_tags()["kind"] == "teacher"


def test_models_entry():
    entry = unify().models_entry("m/1", "models:/m@champion", ["8x8", "32x32"])
    assert entry == {"id": "m/1", "object": "model", "owned_by": "tdm", "uri": "models:/m@champion",
                     "kind": "student", "steps": [1, 2, 4], "default_steps": 4, "trained_steps": [1, 2, 4],
                     "sizes": ["8x8", "32x32"], "decoder": None, "decoder_class": None}
    assert student().models_entry("m/2", "u", [])["steps"] == {"min": 1, "max": 999}
    video = student(frames=9, fps=8.0).models_entry("v/1", "u", [])
    assert (video["frames"], video["fps"]) == (9, 8.0)
    swapped = student(decoder={"class_name": "AutoencoderKL"}).with_decoder("AutoencoderTiny", "madebyollin/taesd")
    assert swapped.models_entry("m/3", "u", [])["decoder"] == "madebyollin/taesd"


# ---------------------------------------------------------------- TeacherRef, WorkerSpec

def test_teacher_ref_identity():
    same = TEACHER.model_copy(update={"uri": "models:/t/3"})
    moved = TEACHER.model_copy(update={"revision": "4-000000000000", "location": "models:/t/4"})
    rebuilt = TEACHER.model_copy(update={"revision": "3-ffffffffffff"})   # same number, another registry
    legacy = TEACHER.model_copy(update={"revision": None})
    assert TEACHER.same_as(same) and not TEACHER.same_as(moved) and not TEACHER.same_as(rebuilt)
    assert legacy.same_as(TEACHER) and TEACHER.key == "models:/t/3@3-abcdef012345"
    with pytest.raises(ValueError):
        TeacherRef(kind="registry", uri="x", location="x")              # revision must be said, even if None


def test_worker_spec_carries_the_typed_config():
    cfg = load_config({"name": "r1", "train": {"num_workers": 2}})
    ws = WorkerSpec(config=cfg, teacher=TEACHER, prompts=["a"], tracking_uri="sqlite:///x.db", run_id="abc",
                    storage="s3://b/runs")
    assert ws.config is cfg and ws.checkpoint_uri(300) == "s3://b/runs/r1/checkpoint_0000300"
    assert WorkerSpec.model_validate_json(ws.model_dump_json()) == ws
    with pytest.raises(ValueError, match="extra"):
        WorkerSpec.model_validate(json.loads(ws.model_dump_json()) | {"teacher_dir": "/x"})
    with pytest.raises(ValueError, match="prompts"):
        WorkerSpec(config=cfg, teacher=TEACHER, prompts=[], tracking_uri="t", run_id="r", storage="s")
