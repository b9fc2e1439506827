"""Backbone adapters, picked from a pipeline's `model_index.json` `_class_name`."""
from __future__ import annotations

from pathlib import Path

import torch

from ..console import quiet_libraries
from ..errors import InputError
from .base import Backbone, Cond, Denoiser, StepEmbedding, cond_cat, cond_index, predict_x0_eps
from .cogvideox import CogVideoXBackbone
from .decoders import DECODER_CLASSES, load_decoder
from .flux import FluxBackbone
from .qwenimage import QwenImageBackbone
from .stock import PixArtBackbone, SD3Backbone, SDXLBackbone
from .unet import UNetBackbone
from .video import VideoBackbone, VideoShape
from .wan import TOY_PIPELINE_CLASS as TOY_VIDEO_PIPELINE_CLASS
from .wan import WanBackbone
from .zimage import ZImageBackbone

#: pipeline class name -> adapter. A new family registers its pipeline classes here.
ADAPTERS: dict[str, type[Backbone]] = {
    "StableDiffusionPipeline": UNetBackbone,
    "TDMToyDigitsPipeline": UNetBackbone,
    "StableDiffusionXLPipeline": SDXLBackbone,
    "PixArtAlphaPipeline": PixArtBackbone,
    "PixArtSigmaPipeline": PixArtBackbone,
    "StableDiffusion3Pipeline": SD3Backbone,
    "FluxPipeline": FluxBackbone,
    "WanPipeline": WanBackbone,
    TOY_VIDEO_PIPELINE_CLASS: WanBackbone,
    "CogVideoXPipeline": CogVideoXBackbone,
    "QwenImagePipeline": QwenImageBackbone,
    "ZImagePipeline": ZImageBackbone,
}


def read_model_index(path_or_id: str | Path) -> dict:
    """The pipeline's model_index.json (a local directory, or a hub id resolved through the HF cache)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(str(path_or_id))


def load_backbone(path_or_id: str | Path, device="cpu", dtype=torch.float32, video: dict | None = None) -> Backbone:
    """Load a teacher pipeline (diffusers layout) through its family's adapter. `video`: the geometry of a
    video model (frames, height, width, fps; None entries: what the directory records, else the family's
    release geometry); an image model refuses it."""
    quiet_libraries()
    index = read_model_index(path_or_id)
    adapter = adapter_for(index)
    if issubclass(adapter, VideoBackbone):
        return adapter.from_pretrained(path_or_id, index, device=device, dtype=dtype, video=video)
    given = sorted(k for k, v in (video or {}).items() if v is not None)
    if given:
        raise InputError(f"video.{given[0]}: the teacher ({index.get('_class_name')}) is an image model; leave "
                         f"video.* unset")
    return adapter.from_pretrained(path_or_id, index, device=device, dtype=dtype)


def adapter_for(model_index: dict) -> type[Backbone]:
    """The adapter of a pipeline's model_index.json; InputError for an unsupported pipeline class."""
    cls_name = model_index.get("_class_name", "")
    if cls_name not in ADAPTERS:
        raise InputError(f"teacher.uri: pipeline class {cls_name!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[cls_name]


__all__ = ["ADAPTERS", "Backbone", "CogVideoXBackbone", "Cond", "DECODER_CLASSES", "Denoiser", "FluxBackbone",
           "PixArtBackbone", "QwenImageBackbone", "SD3Backbone", "SDXLBackbone", "StepEmbedding",
           "TOY_VIDEO_PIPELINE_CLASS", "UNetBackbone", "VideoBackbone", "VideoShape", "WanBackbone", "ZImageBackbone",
           "adapter_for", "cond_cat", "cond_index", "load_backbone", "load_decoder", "predict_x0_eps",
           "read_model_index"]
