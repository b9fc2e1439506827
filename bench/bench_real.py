"""Real-size backbones (random weights, nothing downloaded), measured side by side in one run.

1. memory: peak memory of one TDM iteration with the student and fake score as two LoRA adapters on one
   shared frozen base (`student.finetune=lora`) vs three full copies (`full`). Each setup runs in a fresh
   subprocess; weights, gradients and AdamW moments are bf16 in both (on CPU the three-copy fp32 set-up,
   ~31 GB for SD 1.5, does not fit a 24 GiB machine; fp32 master weights would only widen the gap), EMA
   off in both, K=4, batch 1. Peak RSS on CPU, peak CUDA allocation (torch.cuda.max_memory_allocated)
   on a GPU.
2. latency: end-to-end seconds per image (text encoding, sampling, VAE decoding) of the 4-step student
   vs the teacher at 25 steps with CFG (cond and uncond batched) on the same backbone, bf16, at the
   architecture's native resolution; also the denoiser-only ratio (excluding text encoding and VAE
   decoding), and end to end with a tiny decoder (AutoencoderTiny, the TAESD architecture, swapped in with
   `Backbone.set_decoder`: what tdm's `decoder` option does), since the full VAE decoder costs about two
   UNet evaluations and so caps the end-to-end ratio well below the denoiser-only one.

Architectures: sd15 (UNet 860M, VAE 84M, CLIP-L 123M; 512px) and sdxl (UNet 2.6B with text_time
conditioning, CLIP-L + OpenCLIP-bigG text encoders, VAE; 1024px).

    python bench/bench_real.py [memory|latency|all] [--arch sd15|sdxl] [--device cpu|cuda]
        [--latent 32] [--image-latent 64] [--gradient-checkpointing]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _vae(latent: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                         sample_size=latent * 8, scaling_factor=scaling_factor)


def _clip_text(tok, hidden: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def real_backbone(arch: str, latent: int, device: str = "cpu", dtype=torch.bfloat16):
    """SD 1.5 or SDXL at full size with random weights, built directly on `device` (initialising 2.6B
    parameters on a CPU takes minutes)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from tdm.backbones import UNetBackbone
    from tdm.backbones.stock import SDXLBackbone
    from tdm.testing import clip_tokenizer
    from tdm.toy.teacher import SCHEDULER_CONFIG  # SD 1.5's scaled-linear epsilon schedule

    torch.manual_seed(0)
    tok = clip_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    tok.model_max_length = 77
    with torch.device(device):
        if arch == "sd15":
            unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8)
            return UNetBackbone(unet, _clip_text(tok, 768, 12, 12), tok, SCHEDULER_CONFIG,
                                vae=_vae(latent, 0.18215)).to(dtype=dtype)
        # SDXL base 1.0's UNet config (diffusers stabilityai/stable-diffusion-xl-base-1.0/unet/config.json)
        unet = UNet2DConditionModel(
            sample_size=latent, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=_vae(latent, 0.13025), text_encoder=_clip_text(tok, 768, 12, 12),
                                         text_encoder_2=_clip_text(tok, 1280, 32, 20, projection=1280),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler)
    return SDXLBackbone(pipe.to(dtype=dtype))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_child(finetune: str, arch: str, latent: int, device: str, checkpointing: bool) -> dict:
    """One TDM iteration; returns peak memory (GiB: RSS on CPU, CUDA allocation on a GPU) and parameter counts."""
    from tdm.config import load_config
    from tdm.distiller import TDMDistiller
    from tdm.train import build_optimizer, make_role

    cfg = load_config({"student": {"finetune": finetune},
                       "train": {"ema_decay": None, "gradient_checkpointing": checkpointing}})
    b = real_backbone(arch, latent, device)
    roles = {}
    for name in ("student", "fake"):
        role = make_role(cfg, b, name)
        for p in role.trainable_parameters():
            p.data = p.data.to(torch.bfloat16)  # the same precision for both set-ups
        roles[name] = role
    teacher = b.denoiser()
    opts = {n: build_optimizer(r, 1e-5, cfg.optim) for n, r in roles.items()}
    d = TDMDistiller(cfg.student, cfg.loss, cfg.optim, b.schedule, b.latent_shape, teacher, roles["student"],
                     roles["fake"], opts["student"], opts["fake"])
    cond, uncond = b.encode_prompts(["a photo of a cat"]), b.encode_prompts([""])
    _sync(device)
    t0 = time.perf_counter()
    d.step([(cond, uncond)], 4, torch.Generator(device).manual_seed(0))
    _sync(device)
    base = sum(p.numel() for n, p in b.network.named_parameters() if "lora_" not in n)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"finetune": finetune, "peak_gib": peak / 2**30,
            "trainable_params_m": sum(p.numel() for r in roles.values() for p in r.trainable_parameters()) / 1e6,
            "base_params_m": base / 1e6, "iteration_s": time.perf_counter() - t0}


def memory(arch: str, latent: int, device: str, checkpointing: bool) -> None:
    results = {}
    what = "peak CUDA allocation" if device == "cuda" else "peak RSS"
    for finetune in ("lora", "full"):
        cmd = [sys.executable, __file__, "_memory_child", finetune, "--arch", arch, "--latent", str(latent),
               "--device", device] + (["--gradient-checkpointing"] if checkpointing else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{finetune} child failed:\n{out.stderr[-3000:]}")
        results[finetune] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[finetune]
        print(f"{finetune:>5}: {what} {r['peak_gib']:.2f} GiB, trainable {r['trainable_params_m']:.1f}M "
              f"params over a {r['base_params_m']:.0f}M base, iteration {r['iteration_s']:.2f} s", flush=True)
    print(f"[{arch}, {device}, {latent * 8}px, gradient checkpointing {'on' if checkpointing else 'off'}] "
          f"shared-base LoRA / three full copies: {results['lora']['peak_gib'] / results['full']['peak_gib']:.3f}x "
          f"{what} (target <= 0.45x)", flush=True)


def latency(arch: str, latent: int, device: str, repeats: int, batches: list[int]) -> None:
    from diffusers import AutoencoderTiny

    from tdm.generation import TDMPipeline
    from tdm.grids import uniform_grid
    from tdm.spec import model_spec, teacher_spec

    b = real_backbone(arch, latent, device)
    student = TDMPipeline(b, model_spec(b, "student", 4, 7.5, grids={4: uniform_grid(4, b.schedule.max_timestep)}))
    teacher = TDMPipeline(b, teacher_spec(b, num_steps=25, guidance_scale=7.5))
    full_vae = b.vae
    with torch.device(device):
        tiny_vae = AutoencoderTiny()  # TAESD's architecture (madebyollin/taesd), random weights

    # denoiser-only cost: network seconds counted by hooks (synchronised on a GPU so they measure the work)
    spent, starts = {"s": 0.0}, []

    def pre(_module, _args):
        _sync(device)
        starts.append(time.perf_counter())

    def post(_module, _args, _out):
        _sync(device)
        spent["s"] += time.perf_counter() - starts.pop()

    b.network.register_forward_pre_hook(pre)
    b.network.register_forward_hook(post)

    def run(pipe, batch: int) -> tuple[float, float]:
        spent["s"] = 0.0
        _sync(device)
        t0 = time.perf_counter()
        pipe(["a photo of a cat"] * batch, seeds=list(range(batch)))
        _sync(device)
        return (time.perf_counter() - t0) / batch, spent["s"] / batch

    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    tag = f"{arch}, {device}, {latent * 8}px, bf16{threads}"
    for batch in batches:
        res = {}
        for decoder, vae in (("VAE", full_vae), ("tiny decoder", tiny_vae)):
            b.set_decoder(vae, source=decoder)  # the library's decoder option (checks channels and size)
            run(student, batch), run(teacher, batch)  # warm-up: allocator, kernel selection
            runs = {"student@4": [], "teacher@25+CFG": []}
            for _ in range(repeats):  # interleaved, so drift (clocks, other load) hits both alike
                for name, pipe in (("student@4", student), ("teacher@25+CFG", teacher)):
                    runs[name].append(run(pipe, batch))
            for name, rs in runs.items():
                res[name, decoder] = (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
                t, n = res[name, decoder]
                print(f"batch {batch:>2} {name:>15} ({decoder:>12}): {t * 1000:9.1f} ms/image end to end, "
                      f"{n * 1000:9.1f} ms/image in the denoiser (median of {repeats})", flush=True)
        for decoder in ("VAE", "tiny decoder"):
            (s_total, s_net), (t_total, t_net) = res["student@4", decoder], res["teacher@25+CFG", decoder]
            print(f"[{tag}, batch {batch}, {decoder}] teacher@25+CFG / student@4: {t_total / s_total:.2f}x end to "
                  f"end (target >= 10x), {t_net / s_net:.2f}x denoiser only", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["memory", "latency", "all", "_memory_child"])
    p.add_argument("finetune", nargs="?")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="backbone architecture [sd15]")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run [cpu]")
    p.add_argument("--latent", type=int, default=32, help="latent size of the memory benchmark [32]")
    p.add_argument("--image-latent", type=int, default=None,
                   help="latent size of the latency benchmark [the architecture's native: 64 = 512px for sd15, "
                        "128 = 1024px for sdxl]")
    p.add_argument("--gradient-checkpointing", action="store_true", help="memory benchmark with it on, in both")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per latency row (the median is reported)")
    p.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="images per call in the latency benchmark; per-image times are reported [1]")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    image_latent = args.image_latent or {"sd15": 64, "sdxl": 128}[args.arch]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tdm.console import quiet_libraries
    quiet_libraries()
    if args.what == "_memory_child":
        print(json.dumps(memory_child(args.finetune, args.arch, args.latent, args.device,
                                      args.gradient_checkpointing)))
        return
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"{os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}", flush=True)
    if args.what in ("memory", "all"):
        memory(args.arch, args.latent, args.device, args.gradient_checkpointing)
    if args.what in ("latency", "all"):
        latency(args.arch, image_latent, args.device, args.repeats, args.batch)


if __name__ == "__main__":
    main()
