"""Backbone adapters, picked from a pipeline's `model_index.json` `_class_name`."""
from __future__ import annotations

from pathlib import Path

import torch

from .base import Backbone, Cond, Denoiser, StepEmbedding, cond_cat, cond_index, cond_to, predict_x0_eps
from .decoders import DECODER_CLASSES, load_decoder
from .stock import PixArtBackbone, SD3Backbone, SDXLBackbone
from .unet import UNetBackbone

#: pipeline class name -> adapter. A new family registers its pipeline classes here.
ADAPTERS: dict[str, type[Backbone]] = {
    "StableDiffusionPipeline": UNetBackbone,
    "TDMToyDigitsPipeline": UNetBackbone,
    "StableDiffusionXLPipeline": SDXLBackbone,
    "PixArtAlphaPipeline": PixArtBackbone,
    "PixArtSigmaPipeline": PixArtBackbone,
    "StableDiffusion3Pipeline": SD3Backbone,
}


def read_model_index(path_or_id: str | Path) -> dict:
    """The pipeline's model_index.json (a local directory, or a hub id resolved through the HF cache)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(str(path_or_id))


def load_backbone(path_or_id: str | Path, device="cpu", dtype=torch.float32) -> Backbone:
    """Load a teacher pipeline (diffusers layout) through its family's adapter."""
    from ..progress import quiet_libraries

    quiet_libraries()
    index = read_model_index(path_or_id)
    cls_name = index.get("_class_name", "")
    if cls_name not in ADAPTERS:
        raise ValueError(f"teacher pipeline class {cls_name!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[cls_name].from_pretrained(path_or_id, index, device=device, dtype=dtype)


__all__ = ["ADAPTERS", "Backbone", "Cond", "DECODER_CLASSES", "Denoiser", "PixArtBackbone", "SD3Backbone",
           "SDXLBackbone", "StepEmbedding", "UNetBackbone", "cond_cat", "cond_index",
           "cond_to", "load_backbone", "load_decoder", "predict_x0_eps", "read_model_index"]
