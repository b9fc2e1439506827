"""The MLflow pyfunc model shared by registered teachers and students (the model contract).

    model = mlflow.pyfunc.load_model("models:/tdm-student@champion")
    pngs = model.predict(pd.DataFrame({"prompt": [...]}),
                         params={"num_inference_steps": 4, "guidance_scale": 2.0, "seed": 0})

returns one PNG (bytes) per prompt; a video model (its ModelSpec has `frames`) returns one H.264 MP4
(bytes) per prompt instead, of the model's frames, size and fps. Students default to their K and their
distilled guidance; teachers honour both parameters. Sample i is seeded with seed + i: same seed, same
images or videos.

Load-time options go in MLflow's `model_config`:

    model = mlflow.pyfunc.load_model(uri, model_config={"decoder": "madebyollin/taesd"})

- `decoder`: an autoencoder (AutoencoderTiny or AutoencoderKL: a hub id, a local diffusers directory
  or an s3:// prefix) to decode with instead of the model's own VAE; default: the model's VAE.

MLflow loads the model "from code": it runs `tdm/pyfunc_entry.py`, which sets `TDMPyfuncModel`.
"""
from __future__ import annotations

import warnings

import mlflow.pyfunc

#: model_config keys load_context understands
MODEL_CONFIG_KEYS = ("decoder",)

# This model is logged with an explicit signature (pyfunc_signature), so MLflow's advice to add type hints or an
# input example for inferring one does not apply; it would print in every job that registers a model.
warnings.filterwarnings("ignore", message=r".*(Add type hints to the `predict` method|An input example was not "
                        r"provided when logging the model)", category=UserWarning, module="mlflow")


class TDMPyfuncModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tdm.generation import TDMPipeline, inference_device

        config = dict(getattr(context, "model_config", None) or {})
        unknown = sorted(set(config) - set(MODEL_CONFIG_KEYS))
        if unknown:  # a misspelt option would otherwise be ignored silently
            raise ValueError(f"model_config: unknown option(s) {unknown}; allowed: {list(MODEL_CONFIG_KEYS)}")
        self.pipe = TDMPipeline.from_pretrained(context.artifacts["pipeline"], device=inference_device(),
                                                decoder=config.get("decoder"))

    def predict(self, context, model_input, params=None) -> list[bytes]:  # noqa: ARG002 - MLflow's signature
        from tdm.images import to_png_bytes
        from tdm.video import to_mp4_bytes

        params = params or {}
        if hasattr(model_input, "columns"):
            if "prompt" not in model_input.columns:
                raise ValueError("prompt: the input DataFrame needs a 'prompt' column")
            prompts = [str(p) for p in model_input["prompt"].tolist()]
        else:
            prompts = [str(p) for p in model_input]
        images = self.pipe(prompts, num_inference_steps=params.get("num_inference_steps"),
                           guidance_scale=params.get("guidance_scale"), seed=int(params.get("seed", 0) or 0))
        if images.ndim == 5:  # videos (B, F, C, H, W)
            return [to_mp4_bytes(v, self.pipe.spec.fps or 8.0) for v in images]
        return to_png_bytes(images)


def pyfunc_signature(spec):
    """predict(DataFrame{prompt}, params{num_inference_steps, guidance_scale, seed}) -> list of PNG (images)
    or MP4 (videos) bytes, defaulting to the model's steps and guidance (spec: tdm.spec.ModelSpec)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), params=ParamSchema([
        ParamSpec("num_inference_steps", "long", int(spec.default_steps)),
        ParamSpec("guidance_scale", "double", float(spec.guidance_scale)),
        ParamSpec("seed", "long", 0)]))
