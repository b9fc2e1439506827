"""The typed contracts that cross a process or file boundary (docs/architecture.md, "Contracts").

- `ModelSpec`: what a teacher or distilled student *is*: family, noise schedule and prediction type,
  the timestep grid of every step count it was trained for, the guidance rules, the decoder, the teacher it
  came from, and (for video) frames and fps. Stored as `tdm_model.json` beside the diffusers-layout
  weights, versioned by `schema_version`. It alone decides whether a generation request may use given
  steps and guidance (`ModelSpec.check_generation`), and it writes the registry version tags and the
  `/v1/models` entry.
- `TeacherRef`: a teacher resolved once, on the driver, to an immutable identity (`tdm.teacher`
  resolves and materialises it).
- `WorkerSpec`: everything the driver hands a Ray Train worker.

Validated once when built or read; unknown keys are errors that name the field. This module is part
of the library core: it imports neither MLflow, Ray nor FastAPI.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from . import __version__
from .config import TDMConfig, embedded_scale, grid_problem
from .errors import InputError, ParamError, validation_message
from .grids import uniform_grid

if TYPE_CHECKING:   # the spec stays torch-free: the serving HTTP tier imports it
    from .schedules import NoiseSchedule

SPEC_FILE = "tdm_model.json"
#: a TDM-unify student's step embedding (one row per supported step count), beside tdm_model.json
STEP_EMBEDDING_FILE = "step_embedding.safetensors"
#: the ModelSpec schema this code writes; files without `schema_version` are version 0 (tdm 0.1.0)
SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- the teacher's identity

class TeacherRef(_Frozen):
    """A teacher pinned to an immutable identity (docs/architecture.md, "Teacher identity").

    `location` is what every process loads; `revision` what makes it immutable:

    | kind     | location                      | revision                                            |
    |----------|-------------------------------|-----------------------------------------------------|
    | registry | models:/<name>/<version>      | the version, and a digest of its source, run, time  |
    | hub      | the hub id                    | the commit sha                                      |
    | s3       | s3://bucket/prefix            | a digest of every object's key, size and ETag       |
    | local    | the absolute directory        | sha256 of every file's path and bytes               |

    `revision` is None only for teachers recorded before identities existed (schema 0).
    """

    kind: Literal["registry", "hub", "s3", "local"]
    uri: str = Field(description="The teacher as configured (teacher.uri; the toy's registered URI).")
    location: str = Field(description="What every process loads.")
    revision: Optional[str] = Field(description="The immutable identity of what `location` holds.")

    @property
    def key(self) -> str:
        """One string for the identity: location@revision."""
        return f"{self.location}@{self.revision or 'unknown'}"

    def same_as(self, other: "TeacherRef") -> bool:
        """Whether both pin the same teacher (an unknown revision compares by location alone)."""
        if self.location != other.location:
            return False
        return self.revision is None or other.revision is None or self.revision == other.revision

    def __str__(self) -> str:
        return self.key


# ---------------------------------------------------------------- the model description

class ScheduleSpec(_Frozen):
    """The noise schedule the model was trained on (tdm.schedules.NoiseSchedule.to_dict)."""

    kind: Literal["vp", "flow"]
    prediction_type: Literal["epsilon", "v_prediction", "flow"]
    num_train_timesteps: int = Field(ge=2)
    shift: float = Field(1.0, gt=0, allow_inf_nan=False)

    @classmethod
    def of(cls, schedule: NoiseSchedule) -> "ScheduleSpec":
        return cls(**schedule.to_dict())

    @property
    def max_timestep(self) -> int:
        """Largest network timestep: T - 1 for VP, T for flow (as NoiseSchedule.max_timestep)."""
        return self.num_train_timesteps - 1 if self.kind == "vp" else self.num_train_timesteps


class DecoderSpec(_Frozen):
    """How latents become pixels: the autoencoder class, and where it came from when it replaces the
    model's own VAE (source None: the model's VAE)."""

    class_name: str
    source: Optional[str] = None


class DiffusersUsage(_Frozen):
    """How to sample an exported student with stock diffusers (see tdm.export)."""

    pipeline: str
    scheduler: str
    call: dict[str, Any]
    step_conditioned: bool = False
    lora: Optional[str] = Field(None, description="diffusers LoRA weights of a LoRA student, relative path.")
    note: Optional[str] = Field(None, description="Where stock diffusers cannot reproduce tdm's sampler exactly, "
                                "why; none: the call reproduces it.")


@dataclass(frozen=True)
class GenerationParams:
    """Generation parameters checked against a ModelSpec (only `ModelSpec.check_generation` makes them)."""

    steps: int
    guidance_scale: float
    timesteps: tuple[int | float, ...]  # the descending grid the sampler walks (floats: a flow_match grid)
    cfg: bool                       # teacher sampling with classifier-free guidance (two branches per call)


class ModelSpec(_Frozen):
    """What a teacher or distilled student is, and the rules its generation parameters follow."""

    schema_version: Literal[1] = 1
    kind: Literal["teacher", "student"]
    family: str = Field(description="Backbone adapter family (tdm.backbones): unet, sdxl, pixart, sd3, ...")
    schedule: ScheduleSpec
    default_steps: int = Field(ge=1, description="Steps when a request gives none (a student's K).")
    grids: dict[int, list[int | float]] = Field(default_factory=dict, description="Students: the descending timestep "
                                        "grid of every step count they were trained for. Other step counts "
                                        "(not for TDM-unify) sample the uniform grid. Teachers: none.")
    step_conditioned: bool = Field(False, description="TDM-unify: the network is conditioned on the step count "
                                   "(step_embedding.safetensors holds one row per supported step count).")
    guidance_scale: float = Field(ge=1.0, allow_inf_nan=False, description="Students: the CFG scale distilled "
                                  "in (requests must not ask for another). Teachers: the default CFG scale.")
    guidance_mode: Literal["cfg", "embedded"] = Field("cfg", description="'cfg': a teacher guides with two "
                                                      "branches per call; 'embedded': the network takes the scale "
                                                      "as an input (FLUX.1-dev) and samples in one pass, a student "
                                                      "at its distilled scale (docs/method.md §9).")
    negative_prompt: str = Field("", description="Prompt of a teacher's unconditional CFG branch.")
    image_size: Optional[tuple[int, int]] = Field(None, description="(height, width) of the decoded output.")
    frames: Optional[int] = Field(None, ge=1, description="Frames per sample of a video model; none: images.")
    fps: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description="Frame rate of a video model.")
    decoder: Optional[DecoderSpec] = Field(None, description="The autoencoder that decodes latents; none: the "
                                           "model generates pixels.")
    teacher: Optional[TeacherRef] = Field(None, description="Students: the teacher they were distilled from.")
    diffusers: Optional[DiffusersUsage] = None
    tdm_version: str = __version__

    @model_validator(mode="after")
    def _rules(self):
        top = self.schedule.max_timestep
        for k, grid in self.grids.items():
            problem = grid_problem(grid, k)
            if problem:
                raise ValueError(f"grids: the grid {problem}")
            if grid[0] > top:
                raise ValueError(f"grids: the grid of K={k} starts at {grid[0]}, beyond the schedule's last "
                                 f"timestep {top}")
        if self.kind == "student":
            if self.default_steps not in self.grids:
                raise ValueError(f"default_steps: {self.default_steps} has no grid; grids: {sorted(self.grids)}")
        else:
            if self.grids or self.step_conditioned:
                raise ValueError("grids/step_conditioned: a teacher samples the uniform grid of any step count")
            if self.default_steps > top:
                raise ValueError(f"default_steps: at most {top} for this schedule, got {self.default_steps}")
        if self.fps is not None and self.frames is None:
            raise ValueError("fps: only a video model (frames set) has a frame rate")
        return self

    @field_serializer("diffusers")
    def _usage_without_nulls(self, usage: Optional[DiffusersUsage]):
        # "lora" is present exactly when there is an adapter to load
        return None if usage is None else usage.model_dump(mode="json", exclude_none=True)

    # ------------------------------------------------------------------ the rules
    @property
    def max_timestep(self) -> int:
        return self.schedule.max_timestep

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def supported_steps(self) -> list[int] | None:
        """The step counts a TDM-unify student accepts (its step embedding has a row for each); None for
        every other model, which accepts any of 1..max_timestep."""
        return sorted(self.grids) if self.step_conditioned else None

    def grid(self, steps: int) -> list[int | float]:
        """The descending timesteps of a `steps`-step sampler: the trained grid when there is one, else
        the uniform grid from the schedule's last timestep."""
        if steps in self.grids:
            return list(self.grids[steps])
        return list[int | float](uniform_grid(steps, self.max_timestep))

    def check_generation(self, num_inference_steps: Any = None, guidance_scale: Any = None) -> GenerationParams:
        """Resolve and check generation parameters (None: the model's default). Raises ParamError naming
        num_inference_steps or guidance_scale."""
        n = self.default_steps if num_inference_steps is None else num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int):
            if isinstance(n, float) and n.is_integer():
                n = int(n)
            else:
                raise ParamError("num_inference_steps", f"must be an integer, got {n!r}")
        supported = self.supported_steps
        if supported is not None and n not in supported:
            raise ParamError("num_inference_steps", f"must be one of {supported} for this TDM-unify student, "
                             f"got {n}")
        if supported is None and not 1 <= n <= self.max_timestep:
            raise ParamError("num_inference_steps", f"must be in [1, {self.max_timestep}], got {n}")
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
            raise ParamError("guidance_scale", f"must be a finite number, got {g!r}")
        g = float(g)
        if self.kind == "student" and abs(g - self.guidance_scale) > 1e-6:
            raise ParamError("guidance_scale", f"this student has guidance {self.guidance_scale} distilled in and "
                             f"samples without CFG; got {g}")
        if g < 1.0:
            raise ParamError("guidance_scale", f"must be >= 1 (diffusers convention), got {g}")
        return GenerationParams(n, g, tuple(self.grid(n)),
                                cfg=self.kind == "teacher" and g != 1.0 and self.guidance_mode == "cfg")

    def embedded_guidance(self, params: GenerationParams) -> float:
        """The scale fed to a guidance-embedding network: the requested (teacher) or distilled (student) one
        in 'embedded' mode, 1 under 'cfg' (the value of the stock pipelines' guidance_scale=1 call)."""
        return embedded_scale(self.guidance_mode, params.guidance_scale)

    # ------------------------------------------------------------------ what it generates
    def with_decoder(self, class_name: str, source: str) -> "ModelSpec":
        """This spec decoding with the autoencoder `class_name` from `source` instead of the model's VAE."""
        return self.model_copy(update={"decoder": DecoderSpec(class_name=class_name, source=source)})

    def registry_tags(self) -> dict[str, str]:
        """Tags of a registered version: what it is and how to sample it."""
        tags = {"kind": self.kind, "family": self.family, "num_steps": str(self.default_steps),
                "guidance_scale": str(self.guidance_scale), "prediction_type": self.prediction_type,
                "model_spec_schema": str(self.schema_version)}
        if self.kind == "student":
            tags |= {"step_values": str(sorted(self.grids)), "step_conditioned": str(self.step_conditioned),
                     "timesteps": json.dumps({str(k): g for k, g in sorted(self.grids.items())})}
        if self.teacher is not None:
            tags |= {"teacher": self.teacher.location, "teacher_revision": str(self.teacher.revision)}
        if self.frames is not None:
            tags |= {"frames": str(self.frames), "fps": str(self.fps)}
        return tags

    def models_entry(self, model_id: str, uri: str, sizes: list[str]) -> dict:
        """The `/v1/models` item of this model served as `model_id` from `uri`, in the given sizes."""
        steps: Any = self.supported_steps or {"min": 1, "max": self.max_timestep}
        return {"id": model_id, "object": "model", "owned_by": "tdm", "uri": uri, "kind": self.kind,
                "steps": steps, "default_steps": self.default_steps, "trained_steps": sorted(self.grids),
                "sizes": sizes,
                # decoder None: the model's own VAE (or a pixel-space model)
                "decoder": self.decoder.source if self.decoder else None,
                "decoder_class": self.decoder.class_name if self.decoder else None,
                **({"frames": self.frames, "fps": self.fps} if self.frames is not None else {})}

    # ------------------------------------------------------------------ the file
    def save(self, directory: str | Path) -> Path:
        """Write tdm_model.json into a model directory; returns its path."""
        path = Path(directory) / SPEC_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def parse(cls, data: Any, where: str = SPEC_FILE) -> "ModelSpec":
        """Validate a decoded tdm_model.json (any schema version); InputError names `where` and the field."""
        if not isinstance(data, dict):
            raise InputError(f"{where}: must hold a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            data = _migrate_v0(data, where)
        elif data["schema_version"] != SCHEMA_VERSION:
            raise InputError(f"{where}: schema_version {data['schema_version']!r} is not supported by tdm "
                             f"{__version__} (it reads 0 and {SCHEMA_VERSION}); upgrade tdm to load this model")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InputError(f"{where}: {validation_message(e)}") from None

    @classmethod
    def load(cls, directory: str | Path) -> "ModelSpec":
        """The spec of a tdm model directory (written by any tdm version)."""
        path = Path(directory) / SPEC_FILE
        if not path.is_file():
            raise InputError(f"{directory} is not a tdm model directory (no {SPEC_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        return cls.parse(data, str(path))


#: the keys tdm 0.1.0 wrote into tdm_model.json (schema 0)
_V0_KEYS = {"kind", "num_steps", "guidance_scale", "t_start", "timesteps", "step_conditioned", "step_values",
            "prediction_type", "schedule", "teacher", "negative_prompt", "diffusers", "tdm_version", "family"}


def _migrate_v0(d: dict, where: str) -> dict:
    """tdm 0.1.0's tdm_model.json -> schema 1 (same meaning, one home per fact)."""
    unknown = sorted(set(d) - _V0_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}' (schema 0 file: no schema_version)")
    for key in ("kind", "num_steps", "guidance_scale", "schedule", "family"):
        if key not in d:
            raise InputError(f"{where}: {key}: required (schema 0 file: no schema_version)")
    schedule = d["schedule"]
    if not isinstance(schedule, dict):
        raise InputError(f"{where}: schedule: must be an object, got {schedule!r}")
    top = int(schedule.get("num_train_timesteps", 1000)) - (1 if schedule.get("kind") == "vp" else 0)
    if d.get("t_start", top) != top:  # 0.1.0 always wrote the schedule's last timestep
        raise InputError(f"{where}: t_start: {d['t_start']} is not the schedule's last timestep {top}")
    grids = {int(k): v for k, v in (d.get("timesteps") or {}).items()}
    if d.get("step_conditioned") and sorted(grids) != sorted(d.get("step_values") or []):
        raise InputError(f"{where}: step_values {d.get('step_values')} do not match the grids {sorted(grids)}")
    if d["kind"] == "student":  # 0.1.0 samples a student's default step count on its grid or the uniform one
        grids.setdefault(int(d["num_steps"]), uniform_grid(int(d["num_steps"]), top))
    teacher = d.get("teacher")
    out = {"schema_version": SCHEMA_VERSION, "kind": d["kind"], "family": d["family"], "schedule": schedule,
           "default_steps": d["num_steps"], "grids": grids, "step_conditioned": bool(d.get("step_conditioned")),
           "guidance_scale": d["guidance_scale"], "negative_prompt": d.get("negative_prompt", ""),
           "tdm_version": d.get("tdm_version", "0.1.0")}
    if teacher:
        kind = "registry" if teacher.startswith("models:/") else "s3" if teacher.startswith("s3://") else \
            "local" if teacher.startswith(("/", ".", "~")) else "hub"
        out["teacher"] = {"kind": kind, "uri": teacher, "location": teacher, "revision": None}
    if d.get("diffusers"):
        out["diffusers"] = d["diffusers"]
    return out


def model_spec(backbone, kind: str, default_steps: int, guidance_scale: float,
               grids: dict[int, list] | None = None, step_conditioned: bool = False, negative_prompt: str = "",
               teacher: TeacherRef | None = None, guidance_mode: str = "cfg") -> ModelSpec:
    """A ModelSpec for `backbone` (a tdm.backbones.Backbone): its family, schedule, output size and decoder."""
    return ModelSpec(kind=kind, family=backbone.family, schedule=ScheduleSpec.of(backbone.schedule),
                     default_steps=default_steps, grids={k: list(g) for k, g in (grids or {}).items()},
                     step_conditioned=step_conditioned, guidance_scale=guidance_scale,
                     guidance_mode=guidance_mode, negative_prompt=negative_prompt, image_size=backbone.image_size,
                     frames=backbone.frames, fps=backbone.fps, decoder=backbone.decoder_spec(), teacher=teacher)


def teacher_spec(backbone, num_steps: int = 50, guidance_scale: float = 1.0, negative_prompt: str = "",
                 guidance_mode: str = "cfg") -> ModelSpec:
    """Spec of a teacher: multi-step DDIM with guidance (CFG or embedded), both overridable per call."""
    return model_spec(backbone, "teacher", num_steps, guidance_scale, negative_prompt=negative_prompt,
                      guidance_mode=guidance_mode)


def student_spec(cfg: TDMConfig, grids: dict[int, list], backbone, teacher: TeacherRef) -> ModelSpec:
    """The spec of a student of `backbone` distilled with `cfg` on `grids` from `teacher`."""
    return model_spec(backbone, "student", cfg.student.num_steps, cfg.loss.guidance_scale, grids=grids,
                      step_conditioned=cfg.student.unify, negative_prompt=cfg.teacher.negative_prompt,
                      teacher=teacher, guidance_mode=cfg.loss.teacher_guidance)


class WorkerSpec(_Frozen):
    """What the driver hands every Ray Train worker: the run's config (validated once, on the driver),
    its resolved teacher, its prompts, where to log and where to checkpoint."""

    config: TDMConfig
    teacher: TeacherRef
    prompts: list[str] = Field(min_length=1)
    tracking_uri: str
    run_id: str
    storage: str = Field(description="Checkpoint storage root: a directory or s3://bucket/prefix; the run's "
                         "checkpoints are under <storage>/<config.name>/.")

    @property
    def run_dir(self) -> str:
        """The run's storage directory: its checkpoints and any unsent tracking writes (tdm.outbox)."""
        return f"{self.storage}/{self.config.name}"

    def checkpoint_uri(self, step: int) -> str:
        return f"{self.run_dir}/{checkpoint_dir_name(step)}"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"
