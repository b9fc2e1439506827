"""Every teacher family end to end: a tiny random-weight pipeline built from configs and saved with
save_pretrained is distilled by `pipelines/distill.py` (a subprocess joining the session's Ray cluster,
2 Ray Train workers), evaluated with a tiny CLIP, exported, registered; the registered version honours
the pyfunc contract and its pipeline reloads in stock diffusers, giving the same images."""
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

#: family -> how its students are trained here (both LoRA and full fine-tuning go through Ray Train)
CASES = {"sd15": "lora", "sdxl": "full", "pixart": "lora", "sd3": "lora"}
#: the family whose job runs in a terminal (under `script`); the others' output goes to a pipe
IN_A_TERMINAL = "sdxl"
PROGRESS = re.compile(r"\[tdm\] (?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) \(\d+%\)")
SUMMARY_HEAD = re.compile(r"^sampler +NFE", re.M)


def check_terminal_output(text: str, stderr: str | None) -> None:
    """The job's output (docs/architecture.md, "Terminal output"): progress as lines that reach their total,
    at most about one per tenth of a loop; the summary last, with nothing drawn after it; and, off a terminal
    (`stderr` given: the two streams were pipes), no control sequence at all."""
    if stderr is None:   # the terminal's own line ends; colours (Ray's prefixes, a reset at exit) draw nothing
        text = re.sub(r"\x1b\[[0-9;]*m", "", text.replace("\r\n", "\n"))
    else:
        noisy = [ln for ln in (text + stderr).splitlines(keepends=True) if "\x1b" in ln or "\r" in ln]
        assert not noisy, noisy[:3]
    head = SUMMARY_HEAD.search(text)
    assert head, text[-2000:]
    summary = text[head.start():]
    assert "\x1b" not in summary and "\r" not in summary, summary     # nothing redrawn over or after it
    lines = summary.strip().splitlines()
    assert re.match(r"run fam-\w+ \(MLflow run \w+\): registered version \d+, gate passed$", lines[-2]), lines
    assert lines[-1].startswith("MLflow: mlflow ui --backend-store-uri "), lines
    loops: dict[str, list[tuple[int, int]]] = {}
    for m in PROGRESS.finditer(text):
        loops.setdefault(m["desc"], []).append((int(m["n"]), int(m["total"])))
    assert any(d.startswith("distill fam-") for d in loops) and "student@4" in loops, loops
    for desc, seen in loops.items():
        assert seen[-1][0] == seen[-1][1], (desc, seen)        # every loop reports its end ...
        assert len(seen) <= 12 and len(set(seen)) == len(seen), (desc, seen)   # ... in few lines, none twice


@pytest.fixture(scope="module")
def family_assets(tmp_path_factory, s3_server):
    import boto3

    from tdm.testing import TINY_BUILDERS, build_tiny_clip

    root = tmp_path_factory.mktemp("fam")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"caption": p}) for p in
                                 ["a red cat", "a blue dog", "a green tree", "a small house"]))
    dirs = {f: TINY_BUILDERS[f](root / f) for f in CASES}
    # the SD 1.5 teacher is read from the S3-compatible server, like a teacher kept in a bucket
    s3 = boto3.client("s3")
    for f in dirs["sd15"].rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "tdm-test", f"teachers/sd15/{f.relative_to(dirs['sd15'])}")
    uris = {f: str(d) for f, d in dirs.items()} | {"sd15": "s3://tdm-test/teachers/sd15"}
    return {"dirs": dirs, "uris": uris, "clip": build_tiny_clip(root / "clip"), "prompts": prompts}


@pytest.mark.parametrize("family", list(CASES))
def test_family_distills_exports_and_reloads_in_stock_diffusers(ray_cluster, tdm_home, s3_server, family_assets,
                                                                 family):
    import diffusers
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from tdm.generation import TDMPipeline
    from tdm.sampler import seeded_noise
    from tdm.tracking import download_model, use_tracking_uri

    name = f"tdm-{family}"
    args = ["--name", f"fam-{family}", "--teacher.uri", family_assets["uris"][family],
            "--data.prompt_source", str(family_assets["prompts"]), "--data.prompt_column", "caption",
            "--student.finetune", CASES[family], "--student.lora_rank", "4",
            "--train.max_steps", "3", "--train.batch_size", "4", "--train.num_workers", "2",
            "--train.cpus_per_worker", "1", "--train.checkpoint_every", "3", "--train.sample_every", "3",
            "--train.ray_address", ray_cluster.get_runtime_context().gcs_address,
            "--eval.clip_model", str(family_assets["clip"]), "--eval.num_samples", "10", "--eval.batch_size", "10",
            "--eval.teacher_steps", "4", "--eval.student_steps", "4", "--gate.max_clip_score_drop", "100",
            "--loss.guidance_scale", "3.0", "--registry.model_name", name]
    env = dict(os.environ, TDM_HOME=str(tdm_home), RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, str(ROOT / "pipelines" / "distill.py"), *args]
    tty = family == IN_A_TERMINAL
    if tty:  # a pseudo-terminal for stdout and stderr together, as an operator's shell gives
        cmd = ["script", "-qefc", shlex.join(cmd), "/dev/null"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "CLIP score" in proc.stdout
    check_terminal_output(proc.stdout, None if tty else proc.stderr)

    use_tracking_uri()
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, "champion")
    run = client.get_run(mv.run_id)
    for key in ("eval/student_k4/clip_score", "eval/student_k4/fid_vs_teacher", "eval/teacher_k4/clip_score",
                "gate/clip_score_drop"):
        assert key in run.data.metrics, key

    # the pyfunc contract
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    pngs = model.predict(pd.DataFrame({"prompt": ["a red cat", "a blue dog"]}), params={"seed": 7})
    assert len(pngs) == 2 and all(Image.open(io.BytesIO(b)).size == (16, 16) for b in pngs)
    again = model.predict(pd.DataFrame({"prompt": ["a red cat", "a blue dog"]}), params={"seed": 7})
    assert again == pngs

    # the exported pipeline in stock diffusers: same images as tdm's sampler
    export = download_model(mv)
    usage = json.loads((export / "tdm_model.json").read_text())["diffusers"]
    ours = TDMPipeline.from_pretrained(export)
    ref = ours(["a red cat", "a blue dog"], seeds=[7, 8])
    stock = getattr(diffusers, usage["pipeline"]).from_pretrained(export)
    out = stock(["a red cat", "a blue dog"], latents=seeded_noise([7, 8], ours.backbone.latent_shape),
                output_type="pt", **usage["call"]).images
    assert (out - ref).abs().max().item() < 1e-4
    assert ("lora" in usage) == (CASES[family] == "lora" and family != "pixart")
    if "lora" in usage:  # the adapter alone on the teacher
        base = getattr(diffusers, usage["pipeline"]).from_pretrained(family_assets["dirs"][family])
        base.scheduler = type(stock.scheduler).from_config(stock.scheduler.config)
        base.load_lora_weights(export / "lora")
        out = base(["a red cat", "a blue dog"], latents=seeded_noise([7, 8], ours.backbone.latent_shape),
                   output_type="pt", **usage["call"]).images
        assert (out - ref).abs().max().item() < 1e-4
    assert torch.isfinite(ref).all()
