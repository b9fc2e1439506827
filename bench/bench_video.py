"""Video latency, measured side by side in one run: end-to-end seconds per video (text encoding, sampling,
VAE decoding) of a 4-step student vs the teacher at 50 steps with CFG (cond and uncond batched: 100 NFE),
on a Wan 2.1 1.3B-shaped pipeline with random weights (nothing downloaded); also the denoiser-only ratio.

What is real size and what is reduced (the CPU here has 2 cores and 24 GiB):
- transformer: Wan 2.1 1.3B's width (12 heads x 128 = 1536, FFN 8960, text_dim 4096, patch 1x2x2) with
  `--layers` of its 30 blocks (default 30 on a GPU, 2 on a CPU: the per-step cost scales with depth,
  so the denoiser-only ratio does not depend on it, while the end-to-end ratio is pessimistic at
  reduced depth: text encoding and VAE decoding keep their full cost against a smaller denoiser);
- VAE: Wan's AutoencoderKLWan at full size (base_dim 96, z_dim 16);
- text encoder: UMT5-XXL's width (d_model 4096, FFN 10240, 64 heads) with `--text-layers` of its 24
  blocks and a 32k vocabulary instead of 256k (the embedding lookup costs the same);
- geometry: `--frames` x `--height` x `--width` (default 81 x 480 x 832 on a GPU, 9 x 64 x 64 on a CPU);
- precision: `--dtype` bf16 (Wan's release precision) or fp32; by default bf16 on a GPU and on a CPU
  with bf16 kernels, fp32 on a CPU without them (e.g. AVX2 only: no avx512_bf16, no AMX), where bf16
  convolutions are so slow that the Wan VAE's decode stalls. The result line names the precision and the
  CPU's capability.

    python bench/bench_video.py [--device cpu|cuda] [--dtype auto|bf16|fp32] [--layers N] [--text-layers N]
        [--frames F] [--height H] [--width W] [--repeats R]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 natively here (avx512_bf16 or AMX); False where torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())   # private, hence the fallback
    except (AttributeError, RuntimeError):
        return False


def wan_shaped(layers: int, text_layers: int, device: str, dtype):
    """A WanPipeline with Wan 2.1 1.3B's transformer width, its VAE and UMT5-XXL's width (random weights)."""
    import tempfile

    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from tdm.testing import clip_tokenizer

    tok = clip_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    tok.model_max_length = 512
    before = torch.get_default_dtype()
    # built in the run's precision: UMT5-XXL's full width (24 blocks) in fp32 would not fit a 24 GiB machine
    torch.set_default_dtype(dtype)
    with torch.device(device):
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                            in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                                            ffn_dim=8960, num_layers=layers, cross_attn_norm=True,
                                            qk_norm="rms_norm_across_heads", eps=1e-6)
        vae = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True])
        text = UMT5EncoderModel(UMT5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=text_layers,
                                           num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=1,
                                           eos_token_id=1, decoder_start_token_id=0))
    torch.set_default_dtype(before)
    pipe = WanPipeline(tokenizer=tok, text_encoder=text, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe.to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks [30 on cuda, 2 on cpu]")
    p.add_argument("--text-layers", type=int, default=None, help="UMT5 blocks [24 on cuda, 2 on cpu]")
    p.add_argument("--frames", type=int, default=None, help="frames [81 on cuda, 9 on cpu]")
    p.add_argument("--height", type=int, default=None, help="height [480 on cuda, 64 on cpu]")
    p.add_argument("--width", type=int, default=None, help="width [832 on cuda, 64 on cpu]")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="precision of every module [auto: bf16, or fp32 on a CPU without bf16 kernels]")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row (the median is reported)")
    a = p.parse_args()
    gpu = a.device == "cuda"
    layers = a.layers or (30 if gpu else 2)
    text_layers = a.text_layers or (24 if gpu else 2)
    frames, height, width = a.frames or (81 if gpu else 9), a.height or (480 if gpu else 64), \
        a.width or (832 if gpu else 64)

    from tdm.backbones import WanBackbone
    from tdm.backbones.video import VideoShape
    from tdm.generation import TDMPipeline
    from tdm.grids import default_grid
    from tdm.spec import model_spec, teacher_spec

    if a.dtype == "auto":
        a.dtype = "bf16" if gpu or cpu_has_bf16_kernels() else "fp32"
    dtype = DTYPES[a.dtype]
    b = WanBackbone(wan_shaped(layers, text_layers, a.device, dtype), VideoShape(frames, height, width, 16.0))
    grid = default_grid(4, b.schedule.max_timestep, b.grid_rule, b.schedule.num_train_timesteps, b.schedule.shift)
    student = TDMPipeline(b, model_spec(b, "student", 4, 5.0, grids={4: grid}))
    teacher = TDMPipeline(b, teacher_spec(b, num_steps=50, guidance_scale=5.0))

    spent, starts = {"s": 0.0}, []

    def pre(_module, _args):
        _sync(a.device)
        starts.append(time.perf_counter())

    def post(_module, _args, _out):
        _sync(a.device)
        spent["s"] += time.perf_counter() - starts.pop()

    b.network.register_forward_pre_hook(pre)
    b.network.register_forward_hook(post)

    def run(pipe) -> tuple[float, float]:
        spent["s"] = 0.0
        _sync(a.device)
        t0 = time.perf_counter()
        pipe(["a corgi running on a beach at sunset"], seeds=[0])
        _sync(a.device)
        return time.perf_counter() - t0, spent["s"]

    run(student)  # warm-up: allocator, kernel selection (the teacher's first steps warm it likewise)
    runs = {"student@4": [], "teacher@50+CFG": []}
    for _ in range(a.repeats):  # interleaved, so drift hits both alike
        for name, pipe in (("student@4", student), ("teacher@50+CFG", teacher)):
            runs[name].append(run(pipe))
            t, n = runs[name][-1]
            print(f"{name:>15}: {t:9.2f} s/video end to end, {n:9.2f} s/video in the denoiser", flush=True)
    (s_total, s_net), (t_total, t_net) = ((statistics.median(r[0] for r in runs[k]),
                                           statistics.median(r[1] for r in runs[k])) for k in runs)
    threads = f", {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}" \
        if a.device == "cpu" else ""
    tag = (f"wan2.1-1.3B-shaped ({layers}/30 blocks, UMT5 {text_layers}/24 blocks), {a.device}, {frames}x{height}x"
           f"{width}, latents {tuple(b.latent_shape)}, {a.dtype}{threads}")
    print(f"[{tag}] teacher@50+CFG (100 NFE) / student@4: {t_total / s_total:.2f}x end to end (target >= 15x), "
          f"{t_net / s_net:.2f}x denoiser only; other work per video {s_total - s_net:.2f} s (text + VAE)",
          flush=True)


if __name__ == "__main__":
    main()
