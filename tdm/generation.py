"""Generation from a teacher or a distilled student: `TDMPipeline` = a backbone + the network of one
role + its `ModelSpec`.

A model directory is a diffusers-layout pipeline plus `tdm_model.json` (the ModelSpec) and, for a
TDM-unify student, `step_embedding.safetensors`. `TDMPipeline.from_pretrained` loads one (written by
any tdm version); `save_pretrained` writes one through `tdm.export`. The MLflow pyfunc model
(`tdm.pyfunc`), the evaluation and the serving deployment all sample through this class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .backbones import Backbone, load_backbone, predict_x0_eps
from .backbones.base import guided_x0_eps
from .errors import InputError
from .sampler import sample, seeded_noise
from .spec import SPEC_FILE, STEP_EMBEDDING_FILE, GenerationParams, ModelSpec, ScheduleSpec


class TDMPipeline:
    """Backbone + the network of one role + its ModelSpec."""

    def __init__(self, backbone: Backbone, spec: ModelSpec, denoiser: torch.nn.Module | None = None):
        """`denoiser` defaults to the backbone's own network (wrapped with a step embedding when the
        spec is step-conditioned); pass a training role to sample it in place."""
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a tdm.spec.ModelSpec, got {type(spec).__name__}")
        if spec.schedule != ScheduleSpec.of(backbone.schedule):
            raise InputError(f"{SPEC_FILE}: schedule {spec.schedule} does not match the weights' scheduler "
                             f"{ScheduleSpec.of(backbone.schedule)}")
        self.backbone = backbone
        self.spec = spec
        self.denoiser = denoiser if denoiser is not None else backbone.denoiser(None, spec.supported_steps)

    @property
    def kind(self) -> str:
        return self.spec.kind

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_latents(self, prompts: Sequence[str], num_inference_steps: int | None = None,
                         guidance_scale: float | None = None, seeds: Sequence[int] | None = None,
                         seed: int = 0) -> torch.Tensor:
        """Samples (B, *latent_shape) in the diffusion space. Sample i uses noise seed seeds[i] (default
        seed + i), so a sample does not depend on the rest of its batch. Parameters are checked by the
        ModelSpec (ParamError naming the parameter)."""
        params = self.spec.check_generation(num_inference_steps, guidance_scale)
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
        return self.sample_latents(prompts, params, seeds)

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], params: GenerationParams, seeds: Sequence[int]) -> torch.Tensor:
        """`generate_latents` for parameters already checked by `spec.check_generation`."""
        if len(prompts) == 0:
            raise InputError("prompt: at least one prompt is required")
        if len(seeds) != len(prompts):
            raise InputError(f"seeds: one per prompt, got {len(seeds)} for {len(prompts)} prompts")
        device = next(self.denoiser.parameters()).device
        noise = seeded_noise(seeds, self.backbone.latent_shape, device=device)
        cond = self.backbone.with_guidance(self.backbone.encode_prompts(list(prompts)),
                                           self.spec.embedded_guidance(params))
        steps = torch.full((len(prompts),), params.steps, device=device) if self.spec.step_conditioned else None
        schedule = self.backbone.schedule
        if not params.cfg:
            def predict(x, t):
                return predict_x0_eps(self.denoiser, schedule, x, t, cond, steps)
        else:
            uncond = self.backbone.with_guidance(
                self.backbone.encode_prompts([self.spec.negative_prompt] * len(prompts)), 1.0)
            g = params.guidance_scale

            def predict(x, t):  # teacher CFG: cond and uncond in one batched call, guided as the family guides
                return guided_x0_eps(self.denoiser, schedule, x, t, cond, uncond, g, self.backbone.guide)
        return sample(predict, noise, list(params.timesteps), schedule)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], **kwargs) -> torch.Tensor:
        """Images in [0, 1], (B, C, H, W); keyword arguments as generate_latents."""
        return self.backbone.decode(self.generate_latents(prompts, **kwargs))

    @torch.no_grad()
    def render(self, prompts: Sequence[str], params: GenerationParams, seeds: Sequence[int]) -> torch.Tensor:
        """Images in [0, 1] for parameters already checked by `spec.check_generation`."""
        return self.backbone.decode(self.sample_latents(prompts, params, seeds))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> None:
        """A self-describing model directory that stock diffusers also loads (see tdm.export)."""
        from .export import save_model_dir

        save_model_dir(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32,
                        decoder: str | None = None) -> "TDMPipeline":
        """Load a model directory written by any tdm version. `decoder`: an autoencoder to decode with
        instead of the model's own VAE (a hub id such as madebyollin/taesd, a local diffusers directory or
        an s3:// prefix; see Backbone.use_decoder)."""
        from safetensors.torch import load_file

        path = Path(path)
        spec = ModelSpec.load(path)
        backbone = load_backbone(path, device=device, dtype=dtype)
        if spec.image_size is None:  # written before the spec recorded it
            spec = spec.model_copy(update={"image_size": backbone.image_size})
        if decoder:
            backbone.use_decoder(decoder)
            spec = spec.with_decoder(type(backbone.vae).__name__, str(decoder))
        pipe = cls(backbone, spec)
        if pipe.denoiser.step_embedding is not None:
            w = load_file(str(path / STEP_EMBEDDING_FILE))["weight"]
            pipe.denoiser.step_embedding.embedding.weight.data.copy_(w)
        pipe.denoiser.to(device).eval().requires_grad_(False)
        return pipe


def inference_device() -> str:
    """Where a loaded model runs: the GPU when this process can see one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
