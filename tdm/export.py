"""Writing a model directory: a diffusers-layout pipeline that stock diffusers loads and samples like
tdm does, plus the self-description (tdm_model.json, the ModelSpec).

- A LoRA student is merged into full weights; its adapter is also written to `lora/` in diffusers format
  (`pipe.load_lora_weights`) where the family's pipeline has a LoRA loader.
- A student's scheduler is configured to reproduce tdm's sampler, and `ModelSpec.diffusers` records the
  call (timesteps or sigmas) that does it (README, "Export that stock diffusers loads").
- A TDM-unify student's step embedding goes to `step_embedding.safetensors` (no diffusers equivalent).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .backbones.base import stock_call_parameters
from .config import embedded_scale
from .grids import uniform_grid
from .schedules import flow_sigma
from .spec import STEP_EMBEDDING_FILE, DiffusersUsage, ModelSpec

LORA_DIR = "lora"                           # the LoRA student's adapter, diffusers format
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_model_dir(pipe, path: str | Path) -> None:
    """Write `pipe` (a tdm.generation.TDMPipeline) as a model directory at `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    backbone, denoiser, spec = pipe.backbone, pipe.denoiser, pipe.spec
    net = denoiser.net
    if denoiser.adapter is not None:
        net = merged_network(net, denoiser.adapter)
    scheduler = None
    usage = None
    if spec.kind == "student":
        scheduler = stock_scheduler_config(backbone.scheduler_config, backbone.schedule, backbone.grid_rule,
                                           spec.grid(spec.default_steps))
        usage = diffusers_usage(backbone, spec, scheduler)
    backbone.save_pretrained(path, net, scheduler_config=scheduler)
    if denoiser.adapter is not None and backbone.save_lora(path / LORA_DIR, denoiser.net, denoiser.adapter):
        usage = usage.model_copy(update={"lora": f"{LORA_DIR}/{LORA_WEIGHTS}"})
    spec.model_copy(update={"diffusers": usage}).save(path)
    if denoiser.step_embedding is not None:
        save_file({"weight": denoiser.step_embedding.embedding.weight.detach().cpu().contiguous()},
                  str(path / STEP_EMBEDDING_FILE))


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


def stock_scheduler_config(teacher_config: dict, schedule, rule: str = "uniform", grid: list | None = None) -> dict:
    """A stock diffusers scheduler config that reproduces tdm's deterministic sampler on the teacher's
    noise schedule: first-order DPM-Solver++ is exactly DDIM with eta = 0 (Lu et al. 2022, eq. 9 with
    k = 1), and accepts the student's explicit timesteps; flow-matching Euler is the same step for
    rectified flow. The last step lands on sigma = 0, i.e. returns the x0 prediction as tdm does.

    With grid rule "flow_match" (a pipeline that takes no sigmas, e.g. Wan) the Euler scheduler's own
    K-step grid must be the student's `grid` (docs/method.md eq. 2.2): its shift_terminal is set to the
    grid's last level."""
    import diffusers

    first_order = dict(solver_order=1, algorithm_type="dpmsolver++", final_sigmas_type="zero",
                       use_karras_sigmas=False, thresholding=False, timestep_spacing="trailing")
    if schedule.kind == "flow":
        euler = diffusers.FlowMatchEulerDiscreteScheduler
        if "FlowMatch" in teacher_config.get("_class_name", ""):
            config = dict(euler.from_config(teacher_config).config)
        else:  # Wan's hub configs are UniPC with flow sigmas (flow_shift): Euler on the same shifted schedule
            config = dict(euler(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift).config)
        extra = {}
        if rule == "flow_match" and grid is not None and len(grid) > 1:
            extra["shift_terminal"] = float(flow_sigma(torch.tensor(float(grid[-1])), schedule.num_train_timesteps,
                                                       schedule.shift))
        return _with_class(euler.from_config(config, **extra))  # keyword overrides survive _use_default_values
    extra = {}
    if teacher_config.get("snr_shift_scale") is not None or teacher_config.get("rescale_betas_zero_snr"):
        # CogVideoX's schedule (docs/method.md eqs. 1.7-1.8) in a form DPM-Solver reads: its betas
        abar = schedule.alphas_cumprod.double()
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        extra = dict(trained_betas=(1 - abar / prev).tolist(), rescale_betas_zero_snr=False)
    config = _with_class(diffusers.DPMSolverMultistepScheduler.from_config(teacher_config, **first_order, **extra))
    if extra:  # the betas already carry the shift: a reader must not apply it twice
        config.pop("snr_shift_scale", None)
    return config


def _with_class(scheduler) -> dict:
    return {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}


def diffusers_usage(backbone, spec: ModelSpec, scheduler: dict) -> DiffusersUsage:
    """How to sample the exported student with stock diffusers, at its default step count."""
    steps = spec.default_steps
    grid = spec.grids.get(steps) or uniform_grid(steps, spec.max_timestep)
    # guidance_scale 1: no CFG; a guidance-embedding network (FLUX.1-dev) is fed its distilled scale
    g = embedded_scale(spec.guidance_mode, spec.guidance_scale)
    call: dict = {"num_inference_steps": steps, "guidance_scale": g, **backbone.stock_call_kwargs}
    accepts = stock_call_parameters(backbone.pipeline_class)  # None: a tdm-only class (the toys)
    note = None
    if backbone.schedule.kind == "flow" and (accepts is None or "sigmas" in accepts):
        # the scheduler shifts the sigmas it is given, as tdm's schedule does
        call["sigmas"] = [t / backbone.schedule.num_train_timesteps for t in grid]
    elif backbone.schedule.kind != "flow" and (accepts is None or "timesteps" in accepts):
        call["timesteps"] = list(grid)
    elif not _walks(scheduler, steps, grid, backbone.schedule):
        note = (f"{backbone.pipeline_class}.__call__ takes no timesteps or sigmas and the scheduler's own "
                f"{steps}-step grid is not the student's {list(grid)} (an explicit student.timesteps): stock "
                f"diffusers samples it only approximately (README, Video)")
    return DiffusersUsage(pipeline=backbone.pipeline_class, scheduler=scheduler["_class_name"], call=call,
                          step_conditioned=spec.step_conditioned, note=note)


def _walks(scheduler_config: dict, steps: int, grid: list, schedule) -> bool:
    """Whether the stock scheduler's own `steps`-step sigmas are the grid's (to 1e-6)."""
    import diffusers

    if schedule.kind != "flow":
        return False
    sched = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    sched.set_timesteps(steps)
    ours = flow_sigma(torch.tensor([float(t) for t in grid], dtype=torch.float64), schedule.num_train_timesteps,
                      schedule.shift)
    theirs = sched.sigmas[:len(grid)].double()
    return len(sched.sigmas) == len(grid) + 1 and bool((ours - theirs).abs().max() < 1e-6)
