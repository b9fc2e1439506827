"""Screenshot of the playground page (GET /) after a generation, for the docs.

    python bench/screenshot_playground.py [--model-uri DIR_OR_MODELS_URI] [--out docs/images/playground.png]

Without --model-uri it serves a tiny random-weight toy student from a temporary directory (its images are
noise: the page is the subject). Drives headless chromium with tests/test_playground.py's helpers.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def tiny_student(out: Path) -> str:
    """A random-weight tiny toy student (steps 1, 2, 4) saved as a local tdm pipeline directory."""
    from tdm.backbones import load_backbone
    from tdm.generation import TDMPipeline
    from tdm.spec import model_spec
    from tdm.testing import build_tiny_toy

    b = load_backbone(build_tiny_toy(out / "toy"))
    spec = model_spec(b, "student", 4, 2.0, grids={1: [999], 2: [999, 500], 4: [999, 749, 500, 250]},
                      step_conditioned=True)
    TDMPipeline(b, spec, denoiser=b.trainable_copy([1, 2, 4])).save_pretrained(out / "tdm-toy-student")
    return str(out / "tdm-toy-student")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri")
    p.add_argument("--out", default=str(ROOT / "docs/images/playground.png"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, str(ROOT / "tests"))
    import ray
    from ray import serve
    from test_playground import chrome, fill, free_port, open_page, wait_for_images

    from tdm.serve import build_app

    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model_uri or tiny_student(Path(tmp))
        ray.init(num_cpus=2, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model_uri": uri, "poll_interval_s": 0, "upscale_factors": [1, 4]}),
                  name="playground", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        while requests.get(f"{url}/healthz", timeout=30).status_code != 200:
            time.sleep(1)
        model_id = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        driver = chrome(900, 720)
        try:
            open_page(driver, url, model_id)
            fill(driver, "a handwritten digit 7", steps=4, seed=42, n=4, size="32x32")
            driver.find_element("id", "generate").click()
            wait_for_images(driver, 4)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
            serve.shutdown()
            ray.shutdown()
    print(args.out)


if __name__ == "__main__":
    main()
