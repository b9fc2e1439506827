"""The typed config and the command line: unknown keys and out-of-range values name the field."""
import json

import pytest

from tdm.cli import build_arg_parser, config_from_args
from tdm.config import TDMConfig, load_config
from tdm.errors import ConfigError


def parse(*argv):
    return config_from_args(build_arg_parser("test").parse_args(list(argv)))


def test_defaults_document_every_field():
    from tdm.cli import _leaf_fields

    for key, field in _leaf_fields(TDMConfig):
        assert field.description, f"{key} has no description"
    assert load_config().student.num_steps == 4 and load_config().loss.guidance_scale == 2.0


@pytest.mark.parametrize("data,match", [
    ({"student": {"bogus": 1}}, "unknown config key 'student.bogus'"),
    ({"nope": {}}, "unknown config key 'nope'"),
    ({"student": {"num_steps": 0}}, "student.num_steps"),
    ({"optim": {"lr_student": -1e-4}}, "optim.lr_student"),
    ({"optim": {"betas": [0.9, 1.0]}}, "betas"),
    ({"data": {"prompts": []}}, "data.prompts is empty"),
    ({"data": {"prompts": ["  "]}}, "data.prompts is empty"),
    ({"student": {"step_set": [1, 2]}}, "student.num_steps .4. must be one of"),
    ({"student": {"timesteps": [999, 500]}}, "student.timesteps has 2 entries"),
    ({"student": {"num_steps": 2, "timesteps": [500, 999]}}, "descending"),
    ({"student": {"step_set": [1, 2, 4], "timesteps": [999, 749, 500, 250]}}, "student.timesteps: with .*mapping"),
    ({"student": {"step_set": [1, 2, 4], "timesteps": {3: [999, 666, 333]}}}, "K=3 is not a trained step count"),
    ({"student": {"step_set": [1, 2, 4], "timesteps": {2: [999]}}}, "1 entries for K=2"),
    ({"student": {"step_set": [1, 2, 4], "timesteps": {2: [399, 999]}}}, "descending"),
    ({"train": {"batch_size": 63, "num_workers": 2}}, "divisible"),
    ({"loss": {"interval": "sideways"}}, "loss.interval"),
    ({"loss": {"guidance_scale": 0.5}}, "loss.guidance_scale"),
    ({"toy": {"channels": [12, 24]}}, "multiples of 8"),
    ({"toy_video": {"patch": 3}}, "toy_video: patch must divide the toy's 16-pixel canvas"),
    ({"toy_video": {"patch_frames": 2}}, "toy_video: patch_frames must divide the toy's 5 frames"),
    ({"toy_video": {"classifier_epochs": 0}}, "toy_video.classifier_epochs"),
    ({"train": {"strategy": "zero3"}}, "train.strategy"),
    ({"train": {"strategy": "fsdp", "use_gpu": True, "mixed_precision": "fp16"}}, "fp16 is not supported with "
     "train.strategy fsdp"),
    ({"train": {"fsdp_cpu_offload": True}}, "train.fsdp_cpu_offload needs train.strategy fsdp and train.use_gpu"),
    ({"train": {"strategy": "fsdp", "fsdp_cpu_offload": True}}, "train.fsdp_cpu_offload needs"),
    ({"train": {"gradient_checkpointing_every": 2}}, "needs train.gradient_checkpointing true"),
    ({"train": {"gradient_checkpointing": True, "gradient_checkpointing_every": 0}}, "gradient_checkpointing_every"),
])
def test_bad_values_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data)


def test_command_line_types():
    cfg = parse("--student.step_set", "1,2,4", "--loss.randmid", "true", "--optim.betas", "0,0.95",
                "--loss.snr_gamma", "none", "--optim.lr_fake", "1e-4", "--name", "x")
    assert cfg.student.step_set == [1, 2, 4] and cfg.student.unify and cfg.student.steps == [1, 2, 4]
    assert cfg.loss.randmid is True and cfg.optim.betas == (0.0, 0.95) and cfg.loss.snr_gamma is None
    assert cfg.optim.lr_fake == 1e-4 and cfg.name == "x"
    assert parse("--data.prompts", '["a, b", "c"]').data.prompts == ["a, b", "c"]
    unify = parse("--student.step_set", "1,2,4", "--student.timesteps", '{"2": [999, 399]}').student
    assert unify.explicit_grids == {2: [999, 399]}
    assert parse("--student.timesteps", "999,700,400,100").student.explicit_grids == {4: [999, 700, 400, 100]}


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  num_steps: 2\ntrain:\n  max_steps: 7\n")
    cfg = parse("--config", str(f), "--train.max_steps", "9")
    assert (cfg.student.num_steps, cfg.train.max_steps) == (2, 9)
    f.write_text("student:\n  bogus: 2\n")
    with pytest.raises(ConfigError, match="student.bogus"):
        parse("--config", str(f))
    with pytest.raises(ConfigError, match="--config: file not found"):
        parse("--config", str(tmp_path / "missing.yaml"))


def test_unknown_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        build_arg_parser("t").parse_args(["--student.bogus", "1"])
    assert e.value.code == 2 and "--student.bogus" in capsys.readouterr().err


def test_resolved_config_round_trips():
    cfg = parse("--student.step_set", "1,2,4")
    again = TDMConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg and cfg.to_flat_dict()["student.step_set"] == [1, 2, 4]


@pytest.mark.parametrize("name", sorted(__import__("tdm.presets", fromlist=["PRESETS"]).PRESETS))
def test_every_preset_is_a_valid_config_with_its_sources(name):
    from tdm.presets import PRESETS, SOURCES, preset

    cfg = load_config(preset(name))
    assert cfg.teacher.uri == PRESETS[name]["teacher"]["uri"]
    # every section the preset sets has a stated source
    sourced = {k.split(".")[0] for key in SOURCES[name] for k in key.split(", ")}
    assert set(PRESETS[name]) - {"eval", "registry"} <= sourced, (set(PRESETS[name]), sourced)
    if name == "wan2.1-t2v-14b-tdm":
        assert (cfg.train.strategy, cfg.train.num_workers) == ("fsdp", 8)
        assert preset("wan21-14b-tdm") == PRESETS[name]                  # the issue tracker's name
    if name == "flux1-dev-tdm":   # guidance-distilled: one teacher pass with the scale embedded
        assert (cfg.loss.teacher_guidance, cfg.loss.guidance_scale) == ("embedded", 3.5)


def test_toy_video_patch_limits_match_the_toy_geometry():
    """The config's patch checks hard-code the toy's geometry (tdm.config does not import torch)."""
    from tdm.toy.motion import CANVAS, FRAMES

    assert (CANVAS, FRAMES) == (16, 5)
    for p in range(1, 17):
        ok = CANVAS % p == 0
        assert _valid({"toy_video": {"patch": p}}) is ok, p
    assert [f for f in range(1, 6) if _valid({"toy_video": {"patch_frames": f}})] == [1, 5]


def _valid(data) -> bool:
    try:
        load_config(data)
        return True
    except ConfigError:
        return False


def test_classifier_epochs_leave_the_toy_teacher_identity_alone():
    from tdm.toy.lifecycle import toy_config_key

    base, fewer = (load_config({"teacher": {"uri": "toy-video"}, "toy_video": {"classifier_epochs": n}})
                   for n in (8, 2))
    assert base.toy_video.classifier_epochs == 8 and fewer.toy_video.classifier_epochs == 2
    # the teacher is reused (same key), and the key is the one teachers were registered with before the field
    assert toy_config_key(base.toy_video) == toy_config_key(fewer.toy_video)
    assert "classifier_epochs" not in toy_config_key(base.toy_video)
    other = load_config({"teacher": {"uri": "toy-video"}, "toy_video": {"train_steps": 10}})
    assert toy_config_key(other.toy_video) != toy_config_key(base.toy_video)


def test_toy_video_defaults_yield_to_explicit_values():
    video = load_config({"teacher": {"uri": "toy-video"}})
    assert video.registry.model_name == "tdm-video-student" and video.optim.lr_student == 2.5e-5
    assert (video.train.max_steps, video.train.batch_size) == (300, 32)
    given = load_config({"teacher": {"uri": "toy-video"}, "optim": {"lr_student": 1e-4, "lr_fake": 1e-4},
                         "train": {"max_steps": 5}})
    assert (given.optim.lr_student, given.optim.lr_fake) == (1e-4, 1e-4)
    assert (given.train.max_steps, given.train.batch_size) == (5, 32)
    assert video.loss.last_step_weight == 3.0 and given.loss.last_step_weight == 3.0
    assert video.student.explicit_grids == given.student.explicit_grids == {4: [1000, 750, 500, 100]}
    # a student that names its own step count or grid gets no toy grid (a K=2 student would reject a K=4 one)
    for student in ({"num_steps": 2}, {"step_set": [1, 2, 4]}, {"t_start": 900}, {"timesteps": [999, 700, 400, 150]}):
        own = load_config({"teacher": {"uri": "toy-video"}, "student": student, "loss": {"last_step_weight": 1}})
        assert own.loss.last_step_weight == 1.0
        assert own.student.explicit_grids == ({4: [999, 700, 400, 150]} if "timesteps" in student else {}), student
    # the resolved config round-trips
    assert load_config(video.model_dump()) == video
    image = load_config({})
    assert image.optim.lr_student == 5e-5 and image.registry.model_name == "tdm-student"
    assert image.loss.last_step_weight == 1.0 and image.student.explicit_grids == {}
