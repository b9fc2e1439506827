"""Self-describing generation pipelines for teachers and distilled students.

A pipeline directory is a diffusers-layout pipeline plus `tdm_model.json`, which records how to
sample it: the kind (teacher or student), default steps, guidance (baked into a student), the grid
of every supported step count, the teacher it was distilled from, and the step embedding of a
TDM-unify student (`step_embedding.safetensors`). `TDMPipeline` is what the MLflow pyfunc model,
the evaluation and the serving deployment call.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .backbones import Backbone, load_backbone, predict_x0_eps
from .backbones.base import cond_cat
from .losses import classifier_free_guidance
from .sampler import sample, seeded_noise, uniform_grid

SPEC_FILE = "tdm_model.json"
STEP_EMBEDDING_FILE = "step_embedding.safetensors"
LORA_DIR = "lora"                           # the LoRA student's adapter, diffusers format
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class TDMPipeline:
    """Backbone + the network of one role + its sampling spec."""

    def __init__(self, backbone: Backbone, spec: dict, denoiser: torch.nn.Module | None = None):
        """`denoiser` defaults to the backbone's own network (wrapped with a step embedding when the
        spec is step-conditioned); pass a training role to sample it in place."""
        self.backbone = backbone
        self.spec = dict(spec)
        if denoiser is None:
            denoiser = backbone.denoiser(None, spec.get("step_values") if spec.get("step_conditioned") else None)
        self.denoiser = denoiser

    # ------------------------------------------------------------------ spec
    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def default_steps(self) -> int:
        return int(self.spec["num_steps"])

    @property
    def guidance_scale(self) -> float:
        return float(self.spec["guidance_scale"])

    def grid(self, num_steps: int) -> list[int]:
        """Timesteps for `num_steps`: the trained grid if there is one, else uniform from t_start."""
        grids = self.spec.get("timesteps") or {}
        if str(num_steps) in grids:
            return list(grids[str(num_steps)])
        return uniform_grid(num_steps, int(self.spec["t_start"]))

    def check_params(self, num_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """Resolve and validate generation parameters; errors name the parameter."""
        n = self.default_steps if num_steps is None else int(num_steps)
        max_steps = int(self.spec["t_start"])
        if not 1 <= n <= max_steps:
            raise ValueError(f"num_inference_steps must be in [1, {max_steps}], got {n}")
        if self.spec.get("step_conditioned") and n not in self.spec["step_values"]:
            raise ValueError(f"num_inference_steps must be one of {self.spec['step_values']} for this TDM-unify "
                             f"student, got {n}")
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if self.kind == "student" and abs(g - self.guidance_scale) > 1e-6:
            raise ValueError(f"guidance_scale: this student has guidance {self.guidance_scale} distilled in and "
                             f"samples without CFG; got {g}")
        if g < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (diffusers convention), got {g}")
        return n, g

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_latents(self, prompts: Sequence[str], num_inference_steps: int | None = None,
                         guidance_scale: float | None = None, seeds: Sequence[int] | None = None,
                         seed: int = 0) -> torch.Tensor:
        """Samples (B, C, H, W) in the diffusion space. Sample i uses noise seed seeds[i] (default seed + i),
        so an image does not depend on the rest of its batch."""
        if len(prompts) == 0:
            raise ValueError("prompt: at least one prompt is required")
        n, g = self.check_params(num_inference_steps, guidance_scale)
        device = next(self.denoiser.parameters()).device
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
        noise = seeded_noise(seeds, self.backbone.latent_shape, device=device)
        cond = self.backbone.encode_prompts(list(prompts))
        steps = torch.full((len(prompts),), n, device=device) if self.spec.get("step_conditioned") else None
        schedule = self.backbone.schedule
        if self.kind == "student" or g == 1.0:
            def predict(x, t):
                return predict_x0_eps(self.denoiser, schedule, x, t, cond, steps)
        else:
            uncond = self.backbone.encode_prompts([self.spec.get("negative_prompt", "")] * len(prompts))
            both = cond_cat(cond, uncond)

            def predict(x, t):  # teacher CFG: cond and uncond in one batched call
                x0, eps = predict_x0_eps(self.denoiser, schedule, torch.cat([x, x]), torch.cat([t, t]), both)
                (x0c, x0u), (ec, eu) = x0.chunk(2), eps.chunk(2)
                return classifier_free_guidance(x0c, x0u, g), classifier_free_guidance(ec, eu, g)
        return sample(predict, noise, self.grid(n), schedule)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], **kwargs) -> torch.Tensor:
        """Images in [0, 1], (B, C, H, W)."""
        return self.backbone.decode(self.generate_latents(prompts, **kwargs))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> None:
        """A diffusers-layout pipeline that stock diffusers loads (full weights; a LoRA student is merged,
        and its adapter is also written to lora/ in diffusers format), with a scheduler configured to
        reproduce this sampler, plus tdm_model.json."""
        from safetensors.torch import save_file

        path = Path(path)
        net, spec = self.denoiser.net, dict(self.spec)
        if self.denoiser.adapter is not None:
            net = merged_network(net, self.denoiser.adapter)
        scheduler = None
        if self.kind == "student":
            scheduler = stock_scheduler_config(self.backbone.scheduler_config, self.backbone.schedule)
            spec["diffusers"] = diffusers_usage(self.backbone, spec, scheduler)
        self.backbone.save_pretrained(path, net, scheduler_config=scheduler)
        if self.denoiser.adapter is not None and self.backbone.save_lora(path / LORA_DIR, self.denoiser.net,
                                                                          self.denoiser.adapter):
            spec["diffusers"]["lora"] = f"{LORA_DIR}/{LORA_WEIGHTS}"
        write_spec(path, spec, self.backbone.family)
        if self.denoiser.step_embedding is not None:
            save_file({"weight": self.denoiser.step_embedding.embedding.weight.detach().cpu().contiguous()},
                      str(path / STEP_EMBEDDING_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32,
                        decoder: str | None = None) -> "TDMPipeline":
        """`decoder`: an autoencoder to decode with instead of the model's own VAE (a hub id such as
        madebyollin/taesd, a local diffusers directory or an s3:// prefix; see Backbone.use_decoder)."""
        from safetensors.torch import load_file

        path = Path(path)
        spec_path = path / SPEC_FILE
        if not spec_path.is_file():
            raise FileNotFoundError(f"{path} is not a tdm pipeline (no {SPEC_FILE})")
        spec = json.loads(spec_path.read_text())
        backbone = load_backbone(path, device=device, dtype=dtype)
        if decoder:
            backbone.use_decoder(decoder)
        pipe = cls(backbone, spec)
        if pipe.denoiser.step_embedding is not None:
            w = load_file(str(path / STEP_EMBEDDING_FILE))["weight"]
            pipe.denoiser.step_embedding.embedding.weight.data.copy_(w)
        pipe.denoiser.to(device).eval().requires_grad_(False)
        return pipe


def merged_network(net: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """A plain copy of a LoRA-carrying network with `adapter` merged into its weights (W + s*B@A) and
    every adapter removed; `net` itself is untouched."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    with_lora = copy.deepcopy(net)
    for m in with_lora.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=[adapter])
    # the merged weights sit in `<layer>.base_layer.*`; drop the adapters and load into a plain model
    state = {k.replace(".base_layer.", "."): v for k, v in with_lora.state_dict().items() if "lora_" not in k}
    plain = type(net).from_config(net.config).to(device=next(net.parameters()).device,
                                                   dtype=next(iter(state.values())).dtype)
    plain.load_state_dict(state)
    return plain.eval().requires_grad_(False)


def stock_scheduler_config(teacher_config: dict, schedule) -> dict:
    """A stock diffusers scheduler config that reproduces tdm's deterministic sampler on the teacher's
    noise schedule: first-order DPM-Solver++ is exactly DDIM with eta = 0 (Lu et al. 2022, eq. 9 with
    k = 1), and accepts the student's explicit timesteps; flow-matching Euler is the same step for
    rectified flow. The last step lands on sigma = 0, i.e. returns the x0 prediction as tdm does."""
    import diffusers

    if schedule.kind == "flow":
        return dict(diffusers.FlowMatchEulerDiscreteScheduler.from_config(teacher_config).config)
    return dict(diffusers.DPMSolverMultistepScheduler.from_config(
        teacher_config, solver_order=1, algorithm_type="dpmsolver++", final_sigmas_type="zero",
        use_karras_sigmas=False, thresholding=False, timestep_spacing="trailing").config)


def diffusers_usage(backbone: Backbone, spec: dict, scheduler: dict) -> dict:
    """How to sample the exported student with stock diffusers (recorded in tdm_model.json)."""
    steps = int(spec["num_steps"])
    grid = list((spec.get("timesteps") or {}).get(str(steps)) or uniform_grid(steps, int(spec["t_start"])))
    call: dict = {"num_inference_steps": steps, "guidance_scale": 1.0, **backbone.stock_call_kwargs}
    if backbone.schedule.kind == "flow":  # the scheduler shifts the sigmas it is given, as tdm's schedule does
        call["sigmas"] = [t / backbone.schedule.num_train_timesteps for t in grid]
    else:
        call["timesteps"] = grid
    return {"pipeline": backbone.pipeline_class, "scheduler": scheduler["_class_name"], "call": call,
            "step_conditioned": bool(spec.get("step_conditioned"))}


def write_spec(path: str | Path, spec: dict, family: str) -> None:
    """Write tdm_model.json next to a diffusers-layout pipeline."""
    (Path(path) / SPEC_FILE).write_text(json.dumps(dict(spec, tdm_version=__version__, family=family), indent=2))


def teacher_spec(backbone: Backbone, num_steps: int = 50, guidance_scale: float = 1.0,
                 negative_prompt: str = "", **extra) -> dict:
    """Spec of a teacher pipeline: multi-step DDIM with CFG, both overridable per call."""
    return {"kind": "teacher", "num_steps": num_steps, "guidance_scale": guidance_scale,
            "t_start": backbone.schedule.max_timestep, "negative_prompt": negative_prompt,
            "prediction_type": backbone.schedule.prediction_type, "schedule": backbone.schedule.to_dict(), **extra}


def inference_device() -> str:
    """Where a loaded model runs: the GPU when this process can see one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_png_bytes(images: torch.Tensor) -> list[bytes]:
    """PNG encodings of images (B, C, H, W) in [0, 1]; 1-channel images become grayscale PNGs."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1):
    """A PIL image tiling (B, C, H, W) images in [0, 1], nrow per row, upscaled `scale` x (nearest)."""
    from PIL import Image

    x = images.clamp(0, 1).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    B, C, H, W = x.shape
    ncol = -(-B // nrow)
    grid = torch.ones(C, ncol * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
