"""Video families end to end: a tiny random-weight Wan or CogVideoX pipeline built from configs is distilled by
`pipelines/distill.py` (a subprocess joining the session's Ray cluster, 2 Ray Train workers, full or LoRA
students), evaluated per frame with a tiny CLIP, exported and registered. The registered version returns MP4
bytes through the pyfunc contract, and the export reloads in stock diffusers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = {"wan": ["--video.frames", "5", "--video.height", "32", "--video.width", "32", "--video.fps", "8"],
            "cogvideox": []}      # CogVideoX: the transformer's own training geometry (9 frames of 16x16)
FRAMES_SIZE = {"wan": (5, 32, 32), "cogvideox": (9, 16, 16)}


@pytest.fixture(scope="module")
def video_assets(tmp_path_factory):
    from tdm.testing import TINY_VIDEO_BUILDERS, build_tiny_clip

    root = tmp_path_factory.mktemp("vid")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\na small house\n")
    return {"dirs": {f: b(root / f) for f, b in TINY_VIDEO_BUILDERS.items()}, "clip": build_tiny_clip(root / "clip"),
            "prompts": prompts}


@pytest.mark.parametrize("family,finetune", [("wan", "lora"), ("wan", "full"), ("cogvideox", "full"),
                                             ("cogvideox", "lora")])
def test_video_family_distills_exports_and_serves_mp4(ray_cluster, tdm_home, video_assets, family, finetune):
    import diffusers
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from tdm.generation import TDMPipeline
    from tdm.sampler import seeded_noise
    from tdm.tracking import download_model, use_tracking_uri
    from tdm.video import mp4_frames

    name = f"tdm-{family}-{finetune}"
    args = ["--name", f"vid-{family}-{finetune}", "--teacher.uri", str(video_assets["dirs"][family]),
            *GEOMETRY[family], "--data.prompt_source", str(video_assets["prompts"]),
            "--student.finetune", finetune, "--student.lora_rank", "4",
            "--train.max_steps", "2", "--train.batch_size", "2", "--train.num_workers", "2",
            "--train.cpus_per_worker", "1", "--train.checkpoint_every", "2", "--train.sample_every", "2",
            "--train.gradient_checkpointing", "true",
            "--train.ray_address", ray_cluster.get_runtime_context().gcs_address,
            "--eval.clip_model", str(video_assets["clip"]), "--eval.num_samples", "10", "--eval.batch_size", "10",
            "--eval.teacher_steps", "4", "--eval.student_steps", "4", "--gate.max_clip_score_drop", "100",
            "--loss.guidance_scale", "3.0", "--registry.model_name", name]
    if family == "cogvideox":  # the authors' released CogVideoX grid
        args += ["--student.timesteps", "999,856,665,399"]
    env = dict(os.environ, TDM_HOME=str(tdm_home), RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "distill.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frame consistency" in proc.stdout

    use_tracking_uri()
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.tags["frames"] == str(FRAMES_SIZE[family][0]) and mv.tags["family"] == family
    run = client.get_run(mv.run_id)
    for key in ("eval/student_k4/clip_score", "eval/student_k4/fid_vs_teacher", "eval/student_k4/frame_consistency",
                "eval/teacher_k4/frame_consistency", "gate/clip_score_drop"):
        assert key in run.data.metrics, key
    logged = {a.path for a in client.list_artifacts(mv.run_id, "eval")}
    assert {"eval/student@4.gif", "eval/student@4.mp4", "eval/teacher@4.gif"} <= logged
    assert {a.path for a in client.list_artifacts(mv.run_id, "samples/K4")} >= {"samples/K4/step_0000002.gif"}

    # the pyfunc contract: one MP4 per prompt, with the model's frames and size
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    mp4s = model.predict(pd.DataFrame({"prompt": ["a red cat", "a blue dog"]}), params={"seed": 7})
    frames, h, w = FRAMES_SIZE[family]
    for data in mp4s:
        decoded, fps = mp4_frames(data)
        assert decoded.shape == (frames, h, w, 3)
    assert model.predict(pd.DataFrame({"prompt": ["a red cat", "a blue dog"]}), params={"seed": 7}) == mp4s

    # the export in stock diffusers
    export = download_model(mv)
    usage = json.loads((export / "tdm_model.json").read_text())["diffusers"]
    ours = TDMPipeline.from_pretrained(export)
    ref = ours(["a red cat", "a blue dog"], seeds=[7, 8])
    assert ref.shape == (2, frames, 3, h, w) and torch.isfinite(ref).all()
    stock = getattr(diffusers, usage["pipeline"]).from_pretrained(export)
    latents = seeded_noise([7, 8], ours.backbone.latent_shape)
    out = stock(["a red cat", "a blue dog"], latents=latents, output_type="pt", **usage["call"]).frames
    assert out.shape == ref.shape
    # CogVideoXPipeline takes the grid as timesteps; WanPipeline takes none, so a Wan student is trained on
    # the grid its exported Euler scheduler walks by itself (docs/method.md eq. 2.2): both exact
    assert "note" not in usage
    assert ("timesteps" in usage["call"]) == (family == "cogvideox") and "sigmas" not in usage["call"]
    assert (out - ref).abs().max().item() < 1e-4
    if finetune == "lora":      # the adapter alone, on the teacher
        assert "lora" in usage
        base = getattr(diffusers, usage["pipeline"]).from_pretrained(video_assets["dirs"][family])
        base.scheduler = type(stock.scheduler).from_config(stock.scheduler.config)
        base.load_lora_weights(export / "lora")
        again = base(["a red cat", "a blue dog"], latents=latents, output_type="pt", **usage["call"]).frames
        assert (again - ref).abs().max().item() < 1e-4
