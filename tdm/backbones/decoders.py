"""Replacement decoders: an autoencoder that `Backbone.decode` uses instead of the model's own VAE.

The usual one is TAESD (`AutoencoderTiny`, e.g. madebyollin/taesd for SD 1.x/2.x and SDXL latents,
madebyollin/taesd3 for SD3): a few percent of the full VAE decoder's cost, which otherwise caps the
end-to-end speed-up of a few-step student. A decoder is given by location, like a teacher:

    vae = load_decoder("madebyollin/taesd")        # or a local diffusers directory, or s3://bucket/prefix
    backbone.set_decoder(vae, source="madebyollin/taesd")
    backbone.use_decoder("madebyollin/taesd")      # the same in one call

Only `AutoencoderKL` and `AutoencoderTiny` are accepted; a decoder must read the model's latents
(same channel count) and upsample them by the same factor as the model's VAE. Every error is a
tdm.errors.InputError naming the option (`field`, "decoder" by default).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InputError, first_line

#: a diffusers autoencoder (AutoencoderKL, AutoencoderTiny): its config is known only at run time
Model = Any

#: Accepted decoder classes -> how far each upsamples latents, from its config (in the class's own terms:
#: AutoencoderKL doubles per block after the first; AutoencoderTiny's decoder scales by
#: upsampling_scaling_factor after every block but the last).
DECODER_CLASSES: dict[str, Callable[[dict], int]] = {
    "AutoencoderKL": lambda c: 2 ** (len(c["block_out_channels"]) - 1),
    "AutoencoderTiny": lambda c: c["upsampling_scaling_factor"] ** (len(c["num_decoder_blocks"]) - 1),
}


def _allowed() -> str:
    return ", ".join(sorted(DECODER_CLASSES))


def upsampling(vae: Model) -> int:
    """How many pixels per latent (along each side) `vae` decodes to."""
    return DECODER_CLASSES[type(vae).__name__](vae.config)


def check_decoder(vae: Model, own: Model, latent_channels: int, label: str,
                  field: str = "decoder") -> None:
    """Raise an InputError unless `vae` can stand in for the model's VAE `own` (latents with
    `latent_channels` channels); `label` names the decoder in messages."""
    name = type(vae).__name__
    if name not in DECODER_CLASSES:
        raise InputError(f"{field}: {label} is a {name}; allowed: {_allowed()}")
    channels = vae.config["latent_channels"]
    if channels != latent_channels:
        raise InputError(f"{field}: {label} decodes {channels}-channel latents but this model's latents have "
                          f"{latent_channels} channels (SD3 needs a 16-channel decoder such as TAESD3; SD 1.x/2.x "
                          f"and SDXL a 4-channel one such as TAESD)")
    ours, theirs = upsampling(own), upsampling(vae)
    if ours != theirs:
        raise InputError(f"{field}: {label} upsamples latents {theirs}x but this model's VAE upsamples {ours}x; "
                          f"images would come out at another size")


def load_decoder(location: str | Path, device="cpu", dtype=torch.float32, field: str = "decoder") -> nn.Module:
    """The autoencoder at `location` (a hub id, a local diffusers directory or an s3:// prefix holding
    one), as the class its config.json `_class_name` names; frozen, in eval mode."""
    import diffusers

    from ..console import quiet_libraries
    from ..sources import local_copy

    location = str(location)
    if location.startswith("models:/"):  # the registry holds tdm pipelines, not standalone autoencoders
        raise InputError(f"{field}: {location} is a registered model; a decoder is a hub id, a local "
                          f"diffusers directory or an s3:// prefix holding an {_allowed()}")
    quiet_libraries()
    path = local_copy(location, field)  # s3:// -> a cached local copy; the rest as given
    try:
        config = diffusers.AutoencoderKL.load_config(path)  # ConfigMixin: reads any class's config.json
    except (OSError, ValueError) as e:
        raise InputError(f"{field}: no diffusers autoencoder (config.json) at {location}: {first_line(e)}") from None
    name = config.get("_class_name")
    if name not in DECODER_CLASSES:
        raise InputError(f"{field}: {location} holds a {name!r}; allowed: {_allowed()}")
    vae = getattr(diffusers, name).from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    return vae.to(device).eval().requires_grad_(False)
