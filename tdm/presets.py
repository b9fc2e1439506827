"""Named partial configs for published settings (`--preset NAME` on the command line, applied before
--config and flags, which override it). Each value's source is in SOURCES; README "Video" lists them.
"""
from __future__ import annotations

from .errors import ConfigError

PRESETS: dict[str, dict] = {
    # CogVideoX-2B, as the authors' released TDM LoRA (docs/method.md §6)
    "cogvideox-2b-tdm": {
        "teacher": {"uri": "THUDM/CogVideoX-2b"},
        "video": {"frames": 49, "height": 480, "width": 720, "fps": 8},
        "student": {"num_steps": 4, "timesteps": [999, 856, 665, 399], "finetune": "lora", "lora_rank": 64},
        "loss": {"guidance_scale": 6.0},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"use_gpu": True, "mixed_precision": "bf16", "gradient_checkpointing": True, "batch_size": 8,
                  "max_steps": 500},
        "eval": {"teacher_steps": 50, "clip_model": "openai/clip-vit-large-patch14", "num_samples": 200,
                 "batch_size": 4},
        "registry": {"model_name": "tdm-cogvideox-2b"},
    },
    # Wan 2.1 T2V 1.3B at its 480p release geometry
    "wan2.1-t2v-1.3b-tdm": {
        "teacher": {"uri": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"},
        "video": {"frames": 81, "height": 480, "width": 832, "fps": 16},
        "student": {"num_steps": 4, "finetune": "lora", "lora_rank": 64},
        "loss": {"guidance_scale": 5.0},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"use_gpu": True, "mixed_precision": "bf16", "gradient_checkpointing": True, "batch_size": 8,
                  "max_steps": 500},
        "eval": {"teacher_steps": 50, "clip_model": "openai/clip-vit-large-patch14", "num_samples": 200,
                 "batch_size": 4},
        "registry": {"model_name": "tdm-wan2.1-t2v-1.3b"},
    },
    # Wan 2.1 T2V 14B: the 1.3B recipe under FSDP2 over 8 GPUs (docs/scaling.md)
    "wan2.1-t2v-14b-tdm": {
        "teacher": {"uri": "Wan-AI/Wan2.1-T2V-14B-Diffusers"},
        "video": {"frames": 81, "height": 480, "width": 832, "fps": 16},
        "student": {"num_steps": 4, "finetune": "lora", "lora_rank": 64},
        "loss": {"guidance_scale": 5.0},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"use_gpu": True, "mixed_precision": "bf16", "gradient_checkpointing": True, "batch_size": 8,
                  "max_steps": 500, "strategy": "fsdp", "num_workers": 8},
        "eval": {"teacher_steps": 50, "clip_model": "openai/clip-vit-large-patch14", "num_samples": 200,
                 "batch_size": 2},
        "registry": {"model_name": "tdm-wan2.1-t2v-14b"},
    },
    # FLUX.1-dev: guidance-distilled, so the teacher's target is one pass with the scale embedded
    "flux1-dev-tdm": {
        "teacher": {"uri": "black-forest-labs/FLUX.1-dev"},
        "student": {"num_steps": 4, "finetune": "lora", "lora_rank": 64},
        "loss": {"guidance_scale": 3.5, "teacher_guidance": "embedded"},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"use_gpu": True, "mixed_precision": "bf16", "gradient_checkpointing": True, "batch_size": 8,
                  "max_steps": 500, "strategy": "fsdp", "num_workers": 8},
        "eval": {"teacher_steps": 28, "clip_model": "openai/clip-vit-large-patch14", "num_samples": 200,
                 "batch_size": 4},
        "registry": {"model_name": "tdm-flux1-dev"},
    },
    # Qwen-Image (20B MMDiT): true CFG, two teacher branches
    "qwen-image-tdm": {
        "teacher": {"uri": "Qwen/Qwen-Image"},
        "student": {"num_steps": 4, "finetune": "lora", "lora_rank": 64},
        "loss": {"guidance_scale": 4.0, "teacher_guidance": "cfg"},
        "optim": {"lr_student": 2e-6, "lr_fake": 2e-5},
        "train": {"use_gpu": True, "mixed_precision": "bf16", "gradient_checkpointing": True, "batch_size": 8,
                  "max_steps": 500, "strategy": "fsdp", "num_workers": 8},
        "eval": {"teacher_steps": 50, "clip_model": "openai/clip-vit-large-patch14", "num_samples": 200,
                 "batch_size": 2},
        "registry": {"model_name": "tdm-qwen-image"},
    },
}

#: other names of presets (the issue tracker's spelling)
ALIASES: dict[str, str] = {"wan21-14b-tdm": "wan2.1-t2v-14b-tdm"}

#: where each preset value comes from (docs/method.md §6 has the paper's and the demo's settings)
SOURCES: dict[str, dict[str, str]] = {
    "cogvideox-2b-tdm": {
        "teacher.uri": "the paper's video teacher (Table 4: CogVideoX-2B)",
        "video": "CogVideoX-2B's training geometry (transformer config: 49 frames, 60x90 latents) at 8 fps, "
                 "as diffusers' CogVideoX examples export it",
        "student.timesteps": "the released TDM LoRA was 'trained on timesteps [999, 856, 665, 399]' (TDM README)",
        "student.finetune": "the released model is a LoRA; its rank is not published: 64 as the BLADE configs",
        "loss.guidance_scale": "not stated by the paper for video: CogVideoXPipeline's default, 6",
        "optim": "the paper's PixArt/SD1.5 rates (2e-6 student, 2e-5 fake score)",
        "train": "bf16 with gradient checkpointing (the demo uses mixed precision and checkpointing); 500 "
                 "iterations as the paper's PixArt run",
        "eval.teacher_steps": "the README's 100-NFE teacher: 50 steps with CFG",
    },
    "wan2.1-t2v-1.3b-tdm": {
        "teacher.uri": "Wan 2.1 T2V 1.3B in diffusers layout",
        "video": "Wan 2.1's 480p release geometry: 81 frames of 480x832 at 16 fps (its model card)",
        "student": "4 steps on the uniform grid, which the teacher's flow shift (3) warps as TDM's flow "
                   "students do; LoRA rank 64 as the BLADE configs",
        "loss.guidance_scale": "5.0: WanPipeline's default and the BLADE Wan TDM config",
        "optim": "the paper's PixArt/SD1.5 rates (2e-6 student, 2e-5 fake score)",
        "train": "bf16 with gradient checkpointing; 500 iterations as the paper's PixArt run",
        "eval.teacher_steps": "50 steps with CFG (100 NFE), as the CogVideoX comparison",
    },
    "wan2.1-t2v-14b-tdm": {
        "teacher.uri": "Wan 2.1 T2V 14B in diffusers layout",
        "video": "the 480p geometry of the 1.3B preset (the 14B also has a 720p release)",
        "student, loss, optim": "as wan2.1-t2v-1.3b-tdm: the authors publish no Wan 14B TDM settings",
        "train.strategy": "fsdp over 8 workers: the 14B base in bf16 is 28 GB, which DDP would hold whole on "
                          "every GPU next to the activations of 81 frames; --plan prints the estimate",
    },
    "flux1-dev-tdm": {
        "teacher.uri": "FLUX.1-dev in diffusers layout (guidance-distilled: guidance_embeds)",
        "student": "4 steps as the paper's image students; the authors publish no FLUX settings: LoRA rank 64 as "
                   "the video presets",
        "loss": "3.5: FluxPipeline's default guidance_scale, embedded (docs/method.md §9): FLUX.1-dev has no "
                "unconditional branch to run CFG with",
        "optim": "the paper's PixArt/SD1.5 rates (2e-6 student, 2e-5 fake score)",
        "train": "bf16 with gradient checkpointing at 1024px; fsdp over 8 workers: the 12B base is 24 GB in bf16 "
                 "and T5-XXL adds 9.5 GB on every worker; --plan prints the estimate",
        "eval.teacher_steps": "28: FluxPipeline's default step count",
    },
    "qwen-image-tdm": {
        "teacher.uri": "Qwen-Image in diffusers layout",
        "student": "4 steps; LoRA rank 64 as the video presets (the Lightning LoRAs publish no training settings)",
        "loss": "4.0: QwenImagePipeline's default true_cfg_scale, with two CFG branches (its network embeds no "
                "guidance)",
        "optim": "the paper's PixArt/SD1.5 rates (2e-6 student, 2e-5 fake score)",
        "train": "bf16 with gradient checkpointing; fsdp over 8 workers: the 20B base is 41 GB in bf16",
        "eval.teacher_steps": "50: QwenImagePipeline's default step count",
    },
}


def preset(name: str) -> dict:
    """A copy of the named preset's partial config; ConfigError naming --preset for an unknown name."""
    import copy

    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
