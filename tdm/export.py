"""The MLflow pyfunc model shared by registered teachers and students (the model contract).

    model = mlflow.pyfunc.load_model("models:/tdm-student@champion")
    pngs = model.predict(pd.DataFrame({"prompt": [...]}),
                         params={"num_inference_steps": 4, "guidance_scale": 2.0, "seed": 0})

returns one PNG (bytes) per prompt. Students default to their K and their distilled guidance;
teachers honour both parameters. Image i is seeded with seed + i: same seed, same images.

Load-time options go in MLflow's `model_config`:

    model = mlflow.pyfunc.load_model(uri, model_config={"decoder": "madebyollin/taesd"})

- `decoder`: an autoencoder (AutoencoderTiny or AutoencoderKL: a hub id, a local diffusers directory
  or an s3:// prefix) to decode with instead of the model's own VAE; default: the model's VAE.
"""
from __future__ import annotations

import mlflow.pyfunc

#: model_config keys load_context understands
MODEL_CONFIG_KEYS = ("decoder",)


class TDMPyfuncModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tdm.pipeline import TDMPipeline, inference_device

        config = dict(getattr(context, "model_config", None) or {})
        unknown = sorted(set(config) - set(MODEL_CONFIG_KEYS))
        if unknown:  # a misspelt option would otherwise be ignored silently
            raise ValueError(f"model_config: unknown option(s) {unknown}; allowed: {list(MODEL_CONFIG_KEYS)}")
        self.pipe = TDMPipeline.from_pretrained(context.artifacts["pipeline"], device=inference_device(),
                                                decoder=config.get("decoder"))

    def predict(self, context, model_input, params=None) -> list[bytes]:
        from tdm.pipeline import to_png_bytes

        params = params or {}
        if hasattr(model_input, "columns"):
            if "prompt" not in model_input.columns:
                raise ValueError("prompt: the input DataFrame needs a 'prompt' column")
            prompts = [str(p) for p in model_input["prompt"].tolist()]
        else:
            prompts = [str(p) for p in model_input]
        images = self.pipe(prompts, num_inference_steps=params.get("num_inference_steps"),
                           guidance_scale=params.get("guidance_scale"), seed=int(params.get("seed", 0) or 0))
        return to_png_bytes(images)
