"""What the video adapters share (tdm.backbones.wan, tdm.backbones.cogvideox): the output geometry.

A video model's network has no fixed sample size, so the geometry of what it generates (frames, height,
width, frame rate) is chosen per run: `VideoShape`. It is resolved once when the backbone is loaded
(`tdm.backbones.load_backbone`), from, in this order: the run's `video.*` options, the model directory's
own record (tdm_model.json, or a toy pipeline's model_index.json `tdm_video`), and the family's default
(its release resolution). The latent shape follows from it and from the VAE's compression; each family
owns its latent layout. `decode` returns videos (B, F, C, H, W) in [0, 1], whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import InputError
from .base import Model
from .stock import StockPipelineBackbone


@dataclass(frozen=True)
class VideoShape:
    """Frames per video, frame size in pixels, and frame rate (frames per second)."""

    frames: int
    height: int
    width: int
    fps: float

    def merged(self, overrides: dict | None) -> "VideoShape":
        """This shape with the non-None entries of `overrides` (frames, height, width, fps) in place."""
        return replace(self, **{k: v for k, v in (overrides or {}).items() if v is not None})

    def to_dict(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width, "fps": self.fps}


def recorded_shape(path: str | Path, model_index: dict) -> dict | None:
    """The geometry a model directory records: its tdm_model.json (frames, image_size, fps), else a toy
    pipeline's model_index.json `tdm_video`; None when it records none (e.g. a stock hub pipeline)."""
    from ..spec import SPEC_FILE, ModelSpec

    if (Path(path) / SPEC_FILE).is_file():
        spec = ModelSpec.load(path)
        if spec.frames and spec.image_size:
            return {"frames": spec.frames, "height": spec.image_size[0], "width": spec.image_size[1], "fps": spec.fps}
    return model_index.get("tdm_video")


def latent_geometry(shape: VideoShape, temporal: int, spatial: int, patch: tuple[int, int],
                    what: str, frame_patch: int = 1) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of `shape` for a VAE compressing `temporal` frames into
    one after the first and `spatial` pixels per side, under a network patch of `frame_patch` latent frames
    by `patch` latents; InputError naming video.* when it cannot produce the shape (`what` names the
    pipeline)."""
    if shape.frames < 1 or (shape.frames - 1) % temporal:
        raise InputError(f"video.frames: must be 1 + a multiple of {temporal} for this {what} (its VAE "
                         f"compresses {temporal} frames into one), got {shape.frames}")
    if ((shape.frames - 1) // temporal + 1) % frame_patch:
        raise InputError(f"video.frames: must make a multiple of {frame_patch} latent frames for this {what} "
                         f"(its network patches {frame_patch} frames into one token), got {shape.frames}")
    for name, size, p in (("height", shape.height, patch[0]), ("width", shape.width, patch[1])):
        if size < spatial * p or size % (spatial * p):
            raise InputError(f"video.{name}: must be a positive multiple of {spatial * p} for this {what} "
                             f"(VAE x{spatial}, patch {p}), got {size}")
    if not shape.fps > 0:
        raise InputError(f"video.fps: must be > 0, got {shape.fps}")
    return (shape.frames - 1) // temporal + 1, shape.height // spatial, shape.width // spatial


class VideoBackbone(StockPipelineBackbone):
    """A stock diffusers video pipeline: the geometry, the latent shape, and video decoding."""

    #: the family's text length in tokens (its stock pipeline's default max_sequence_length)
    max_text_tokens: int

    def __init__(self, pipe, shape: VideoShape | None = None):
        super().__init__(pipe)
        self.max_sequence_length = min(self.max_text_tokens, int(pipe.tokenizer.model_max_length))
        self.set_shape(shape or self.default_shape())

    # ------------------------------------------------------------------ geometry
    @classmethod
    def factors(cls, transformer_config, vae_config) -> tuple[int, int, tuple[int, int]]:
        """(temporal, spatial, (patch h, patch w)) from the network's and the VAE's configs (no VAE: the
        toy's pixel space, factors 1)."""
        raise NotImplementedError

    @classmethod
    def family_shape_of(cls, transformer_config, model_index, spatial: int) -> VideoShape:
        """The family's release geometry, from its configs."""
        raise NotImplementedError

    @classmethod
    def frame_patch(cls, transformer_config) -> int:  # noqa: ARG003 - a family with temporal patches reads it
        """Latent frames per token of the network (1: no temporal patch)."""
        return 1

    @property
    def _factors(self) -> tuple[int, int, tuple[int, int]]:
        return self.factors(self.network.config, None if self.vae is None else self.vae.config)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along each side (1 for a pixel-space model)."""
        return self._factors[1]

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (1 for a pixel-space model)."""
        return self._factors[0]

    def latent_geometry(self, shape: VideoShape) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width) of `shape` (see `latent_geometry`)."""
        return latent_geometry(shape, *self._factors, self.pipeline_class,
                               self.frame_patch(self.network.config))

    @classmethod
    def check_shape(cls, read_config, model_index: dict, video: dict | None, recorded: dict | None) -> VideoShape:
        """The geometry `from_pretrained` would use, checked from configs alone (no weights are loaded):
        `read_config(subfolder)` returns a component's config.json as a dict (None if absent)."""
        transformer, vae = read_config("transformer"), read_config("vae")
        temporal, spatial, patch = cls.factors(transformer, vae)
        shape = cls.family_shape_of(transformer, model_index, spatial).merged(recorded).merged(video)
        latent_geometry(shape, temporal, spatial, patch, model_index.get("_class_name", cls.__name__),
                        cls.frame_patch(transformer))
        return shape

    def set_shape(self, shape: VideoShape) -> None:
        """Generate videos of `shape` (frames, height, width, fps)."""
        self.latent_geometry(shape)
        self.shape = shape
        self.frames, self.fps = shape.frames, float(shape.fps)
        self.latent_shape = self.layout(*self.latent_geometry(shape))

    def layout(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        """The family's latent layout of one sample."""
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape.height, self.shape.width

    def decoder_spec(self):
        from ..spec import DecoderSpec

        return None if self.vae is None else DecoderSpec(class_name=type(self.vae).__name__)

    def set_decoder(self, vae: Model, source: str | None = None, field: str = "decoder") -> None:  # noqa: ARG002
        raise InputError(f"{field}: replacement decoders are for image models; a {self.pipeline_class} "
                         f"decodes with its own video VAE")

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | Path, model_index: dict, device="cpu", dtype=torch.float32,
                        video: dict | None = None):
        """Load the pipeline; the geometry is `video` (frames/height/width/fps, None entries unset) over
        what the directory records over the family default."""
        pipe = cls.load_pipeline(path, model_index, dtype)
        backbone = cls(pipe, cls.family_shape(pipe).merged(recorded_shape(path, model_index)).merged(video))
        return backbone.to(device)

    @classmethod
    def load_pipeline(cls, path: str | Path, model_index: dict, dtype):
        """The diffusers pipeline object of a directory."""
        import diffusers

        return getattr(diffusers, model_index["_class_name"]).from_pretrained(str(path), torch_dtype=dtype,
                                                                              use_safetensors=True)

    @classmethod
    def family_shape(cls, pipe) -> VideoShape:
        """The release geometry of the family, given its pipeline object."""
        vae = getattr(pipe, "vae", None)
        spatial = cls.factors(pipe.transformer.config, None if vae is None else vae.config)[1]
        return cls.family_shape_of(pipe.transformer.config, pipe.config, spatial)

    def default_shape(self) -> VideoShape:
        return self.family_shape(self.pipe)

    @property
    def stock_call_kwargs(self) -> dict:
        return {"num_frames": self.shape.frames, "height": self.shape.height, "width": self.shape.width,
                "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos (B, F, C, H, W) in [0, 1]."""
        if self.vae is None:  # pixel space (the toy): samples are (B, C, F, H, W) videos in [-1, 1]
            return ((self.to_bcfhw(latents).float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
        video = self.vae_decode(self.to_bcfhw(latents).to(self.vae.dtype))  # (B, C, F, H, W) in [-1, 1]
        return ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def to_bcfhw(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the VAE's (B, C, F, H, W) layout."""
        raise NotImplementedError

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F, H, W) -> pixels (B, C, F', H', W') in [-1, 1]."""
        raise NotImplementedError
