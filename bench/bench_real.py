"""Real-size backbones (random weights, nothing downloaded), measured side by side in one run.

1. memory: peak RSS of one TDM iteration with the student and fake score as two LoRA adapters on one
   shared frozen base (`student.finetune=lora`) vs three full copies (`full`), on an SD-1.5-size UNet
   (860M parameters). Each setup runs in a fresh subprocess; weights, gradients and AdamW moments are
   bf16 in both (the three-copy fp32 set-up, ~31 GB, does not fit this 24 GiB machine; fp32 master
   weights would only widen the gap), EMA off in both, K=4, batch 1, 32x32 latents.
2. latency: end-to-end seconds per image (text encoding, sampling, VAE decoding) of the 4-step student
   vs the teacher at 25 steps with CFG (cond and uncond batched) on the same SD-1.5-size backbone, bf16,
   512x512; also the denoiser-only ratio (excluding text encoding and VAE decoding).

    python bench/bench_real.py [memory|latency|all] [--latent 32] [--image-latent 64]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sd15_backbone(latent: int, dtype=torch.bfloat16):
    """SD 1.5 architecture at full size with random weights: UNet (860M), VAE (84M), CLIP-L text (123M)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tdm.backbones import UNetBackbone
    from tdm.testing import clip_tokenizer
    from tdm.toy.teacher import SCHEDULER_CONFIG  # SD 1.5's scaled-linear epsilon schedule

    torch.manual_seed(0)
    tok = clip_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    tok.model_max_length = 77
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=latent * 8, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    b = UNetBackbone(unet, text, tok, SCHEDULER_CONFIG, vae=vae)
    return b.to(dtype=dtype)


def memory_child(finetune: str, latent: int) -> dict:
    """One TDM iteration; returns peak RSS (GiB) and parameter counts."""
    from tdm.config import load_config
    from tdm.distiller import TDMDistiller
    from tdm.train import build_optimizer, make_role

    cfg = load_config({"student": {"finetune": finetune}, "train": {"ema_decay": None}})
    b = sd15_backbone(latent)
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
    t0 = time.perf_counter()
    d.step([(cond, uncond)], 4, torch.Generator().manual_seed(0))
    base = sum(p.numel() for n, p in b.network.named_parameters() if "lora_" not in n)
    return {"finetune": finetune, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trainable_params_m": sum(p.numel() for r in roles.values() for p in r.trainable_parameters()) / 1e6,
            "base_params_m": base / 1e6, "iteration_s": time.perf_counter() - t0}


def memory(latent: int) -> None:
    results = {}
    for finetune in ("lora", "full"):
        out = subprocess.run([sys.executable, __file__, "_memory_child", finetune, "--latent", str(latent)],
                             capture_output=True, text=True, check=True)
        results[finetune] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[finetune]
        print(f"{finetune:>5}: peak RSS {r['peak_rss_gib']:.2f} GiB, trainable {r['trainable_params_m']:.1f}M "
              f"params over a {r['base_params_m']:.0f}M base, iteration {r['iteration_s']:.1f} s", flush=True)
    print(f"shared-base LoRA / three full copies: {results['lora']['peak_rss_gib'] / results['full']['peak_rss_gib']:.3f}x "
          f"peak memory (target <= 0.45x)")


def latency(latent: int) -> None:
    from tdm.pipeline import TDMPipeline, teacher_spec

    b = sd15_backbone(latent)
    student = TDMPipeline(b, {"kind": "student", "num_steps": 4, "guidance_scale": 7.5, "t_start": 999})
    teacher = TDMPipeline(b, teacher_spec(b, num_steps=25, guidance_scale=7.5))
    prompts = ["a photo of a cat"]

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # denoiser-only cost: count network seconds with a hook
    spent = {"s": 0.0}
    starts = []
    b.network.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
    b.network.register_forward_hook(lambda m, a, o: spent.__setitem__("s", spent["s"] + time.perf_counter() - starts.pop()))
    student(prompts, seeds=[0])  # warm-up
    res = {}
    for name, pipe in (("student@4", student), ("teacher@25+CFG", teacher), ("student@4 (again)", student)):
        spent["s"] = 0.0
        res[name] = (timed(lambda: pipe(prompts, seeds=[0])), spent["s"])
        print(f"{name:>18}: {res[name][0]:.1f} s end to end, {res[name][1]:.1f} s in the UNet", flush=True)
    s_total = min(res["student@4"][0], res["student@4 (again)"][0])
    s_net = min(res["student@4"][1], res["student@4 (again)"][1])
    t_total, t_net = res["teacher@25+CFG"]
    print(f"teacher@25+CFG / student@4: {t_total / s_total:.2f}x end to end (target >= 10x), "
          f"{t_net / s_net:.2f}x denoiser only; {latent * 8}px, bf16, {torch.get_num_threads()} threads")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["memory", "latency", "all", "_memory_child"])
    p.add_argument("finetune", nargs="?")
    p.add_argument("--latent", type=int, default=32, help="latent size of the memory benchmark")
    p.add_argument("--image-latent", type=int, default=64, help="latent size of the latency benchmark (64 = 512px)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tdm.progress import quiet_libraries
    quiet_libraries()
    if args.what == "_memory_child":
        print(json.dumps(memory_child(args.finetune, args.latent)))
        return
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    if args.what in ("memory", "all"):
        memory(args.latent)
    if args.what in ("latency", "all"):
        latency(args.image_latent)


if __name__ == "__main__":
    main()
