"""The `decoder` option: an AutoencoderTiny (TAESD architecture) or AutoencoderKL replacing the model's
VAE in `decode`, loaded from a local directory or S3, checked against the model's latents, and
identical to stock diffusers with the same autoencoder as `pipe.vae`; wired into the pyfunc model and
the Serve deployment. Tiny random weights built from configs; nothing is downloaded."""
import io
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tdm.backbones import load_backbone, load_decoder
from tdm.errors import InputError
from tdm.generation import TDMPipeline
from tdm.grids import uniform_grid
from tdm.sampler import seeded_noise
from tdm.spec import model_spec

PROMPTS, SEEDS = ["a cat", "a red dog"], [3, 4]
#: max abs difference allowed between tdm and stock diffusers images in [0, 1] (float32 on CPU; the
#: same tolerance as the export tests)
STOCK_ATOL = 1e-4


def tiny_taesd(path, latent_channels=4, decoder_blocks=(1, 1), seed=0, **config):
    """A TAESD-architecture AutoencoderTiny at minimum width, saved with save_pretrained. Two decoder
    blocks upsample 2x, as the tiny pipelines' two-block AutoencoderKL does."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8,) * len(decoder_blocks),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=decoder_blocks, latent_channels=latent_channels,
                    **config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    return tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


def _student_export(teacher_dir, path):
    """The teacher network saved as a 4-step student pipeline (tdm_model.json with its stock diffusers call)."""
    b = load_backbone(teacher_dir)
    spec = model_spec(b, "student", 4, 1.0, grids={4: uniform_grid(4, b.schedule.max_timestep)})
    TDMPipeline(b, spec).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd15_export(tiny_sd_dir, tmp_path_factory):
    return _student_export(tiny_sd_dir, tmp_path_factory.mktemp("sd15_student") / "export")


# ------------------------------------------------------------------------------------ the library

def test_local_decoder_replaces_the_vae(tiny_sd_dir, taesd_dir):
    from diffusers import AutoencoderKL, AutoencoderTiny

    vae = load_decoder(str(taesd_dir))
    assert isinstance(vae, AutoencoderTiny) and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())

    b = load_backbone(tiny_sd_dir)
    latents = torch.randn(2, *b.latent_shape, generator=torch.Generator().manual_seed(0))
    own = b.decode(latents)
    assert isinstance(b.vae, AutoencoderKL) and b.decoder_source is None
    b.use_decoder(str(taesd_dir))
    assert isinstance(b.vae, AutoencoderTiny) and b.decoder_source == str(taesd_dir)
    images = b.decode(latents)
    assert images.shape == own.shape == (2, 3, 16, 16)       # 8x8 latents, 2x upsampling, as the model's VAE
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert (images - own).abs().max() > 1e-2                 # the other decoder is really used
    # what stock diffusers computes with this autoencoder (scaling_factor 1.0: latents pass unscaled)
    assert vae.config.scaling_factor == 1.0
    expected = ((vae.decode(latents / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert torch.equal(images, expected)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_same_images_as_stock_diffusers_with_the_decoder_swapped_in(family, tiny_sd_dir, tmp_path):
    """End to end (text encoding, 4 steps, decoding) against the stock pipeline with `pipe.vae` replaced:
    sd15 through UNetBackbone, sd3 through StockPipelineBackbone (SDXL and PixArt decode the same way),
    with a decoder carrying a scaling and a shift factor (as TAESD3 does) that both sides must apply."""
    import diffusers

    from tdm.testing import TINY_BUILDERS

    teacher = tiny_sd_dir if family == "sd15" else TINY_BUILDERS[family](tmp_path / "teacher")
    export = _student_export(teacher, tmp_path / "export")
    factors = {"scaling_factor": 1.5035, "shift_factor": 0.0609} if family == "sd3" else {}
    decoder = tiny_taesd(tmp_path / "taesd", **factors)

    ours = TDMPipeline.from_pretrained(export, decoder=str(decoder))
    images = ours(PROMPTS, seeds=SEEDS)
    assert images.shape == (2, 3, 16, 16)

    usage = json.loads((export / "tdm_model.json").read_text())["diffusers"]
    stock = getattr(diffusers, usage["pipeline"]).from_pretrained(export)
    stock.vae = diffusers.AutoencoderTiny.from_pretrained(decoder)
    out = stock(PROMPTS, latents=seeded_noise(SEEDS, ours.backbone.latent_shape), output_type="pt",
                **usage["call"]).images
    assert (out - images).abs().max().item() < STOCK_ATOL
    # and the decoder matters: the model's own VAE gives other images
    assert (TDMPipeline.from_pretrained(export)(PROMPTS, seeds=SEEDS) - images).abs().max() > 1e-2


def test_decoder_from_s3(tiny_sd_dir, taesd_dir, s3_server, tdm_home):
    import boto3

    s3 = boto3.client("s3")
    for f in taesd_dir.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "tdm-test", f"decoders/taesd/{f.relative_to(taesd_dir)}")
    b = load_backbone(tiny_sd_dir)
    b.use_decoder("s3://tdm-test/decoders/taesd/")
    latents = torch.randn(1, *b.latent_shape)
    local = load_backbone(tiny_sd_dir)
    local.use_decoder(str(taesd_dir))
    assert torch.equal(b.decode(latents), local.decode(latents))
    assert b.decoder_source == "s3://tdm-test/decoders/taesd/"
    with pytest.raises(InputError, match="^decoder: no objects under s3://tdm-test/decoders/missing"):
        load_decoder("s3://tdm-test/decoders/missing")


# ------------------------------------------------------------------------------------ errors

def test_other_classes_are_rejected(tiny_sd_dir, tmp_path):
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(InputError, match=r"^decoder: .*vq holds a 'VQModel'; allowed: AutoencoderKL, "
                                          r"AutoencoderTiny$"):
        load_decoder(str(tmp_path / "vq"))
    # a whole pipeline is not an autoencoder (no config.json at its root)
    with pytest.raises(InputError, match=r"^decoder: no diffusers autoencoder \(config.json\) at "):
        load_decoder(str(tiny_sd_dir))
    with pytest.raises(InputError, match="^decoder: models:/taesd@champion is a registered model"):
        load_decoder("models:/taesd@champion")
    with pytest.raises(InputError, match="^decoder: the Linear given is a Linear; allowed: AutoencoderKL, "):
        load_backbone(tiny_sd_dir).set_decoder(torch.nn.Linear(4, 4))


def test_latent_channels_and_upsampling_must_match(tiny_sd_dir, tmp_path):
    b = load_backbone(tiny_sd_dir)
    sd3_like = tiny_taesd(tmp_path / "taesd3", latent_channels=16)
    with pytest.raises(InputError, match=r"^decoder: .*taesd3 decodes 16-channel latents but this model's "
                                          r"latents have 4 channels"):
        b.use_decoder(str(sd3_like))
    four_x = tiny_taesd(tmp_path / "taesd_4x", decoder_blocks=(1, 1, 1))
    with pytest.raises(InputError, match=r"^decoder: .*taesd_4x upsamples latents 4x but this model's VAE "
                                          r"upsamples 2x"):
        b.use_decoder(str(four_x))
    # the rejected decoders left the model's own VAE in place
    assert type(b.vae).__name__ == "AutoencoderKL" and b.decoder_source is None


def test_pixel_space_toy_rejects_the_option(tiny_toy_dir):
    b = load_backbone(tiny_toy_dir)
    # fails before resolving the location: nothing is downloaded for a model that cannot use it
    with pytest.raises(InputError, match=r"^decoder: this model \(TDMToyDigitsPipeline\) generates pixels "
                                          r"directly \(no VAE\).*leave decoder unset"):
        b.use_decoder("s3://no-such-bucket/taesd")


def test_export_is_refused_after_a_swap(tiny_sd_dir, taesd_dir, tmp_path):
    b = load_backbone(tiny_sd_dir)
    b.use_decoder(str(taesd_dir))
    with pytest.raises(ValueError, match="^save_pretrained: this backbone decodes with a replacement decoder"):
        b.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ pyfunc and serving

def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_pyfunc_model_config_decoder(sd15_export, taesd_dir):
    from tdm.pyfunc import TDMPyfuncModel

    model = TDMPyfuncModel()
    model.load_context(SimpleNamespace(artifacts={"pipeline": str(sd15_export)},
                                       model_config={"decoder": str(taesd_dir)}))
    assert model.pipe.backbone.decoder_source == str(taesd_dir)
    assert type(model.pipe.backbone.vae).__name__ == "AutoencoderTiny"
    pngs = model.predict(None, PROMPTS, params={"seed": 3})
    assert [_png_size(p) for p in pngs] == [(16, 16)] * 2
    # checked before anything loads: a misspelt option must not silently fall back to the model's VAE
    with pytest.raises(ValueError, match=r"^model_config: unknown option\(s\) \['decodr'\]; allowed: \['decoder'\]"):
        TDMPyfuncModel().load_context(SimpleNamespace(artifacts={"pipeline": str(sd15_export)},
                                                      model_config={"decodr": str(taesd_dir)}))


class _Remote:
    """Stands in for a deployment handle method: `handle.method.remote()` gives an awaitable that can be
    cancelled."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self):
        import asyncio

        async def call():
            return self.fn()
        return asyncio.ensure_future(call())


def test_serve_generator_loads_reports_and_swaps_the_decoder(sd15_export, taesd_dir):
    """The generator replica and the ingress' /v1/models, run as plain objects (no Ray cluster)."""
    import asyncio

    from tdm.serve import ServeConfig
    from tdm.serve.generator import TDMGenerator
    from tdm.serve.ingress import TDMIngress

    generator_cls, ingress_cls = TDMGenerator.func_or_class, TDMIngress.func_or_class
    config = {"model_uri": str(sd15_export), "poll_interval_s": 0, "decoder": str(taesd_dir)}
    generator = generator_cls(config)
    info = generator.info()
    assert (info.decoder, info.decoder_class, info.native_size) == (str(taesd_dir), "AutoencoderTiny", [16, 16])
    import json

    from starlette.requests import Request

    handle = SimpleNamespace(info=_Remote(generator.info), status=_Remote(generator.status))
    # the class as written (serve.ingress wraps it in an ASGI replica class with an async __init__)
    ingress = ingress_cls.__new__(ingress_cls)
    ingress_cls.__mro__[1].__init__(ingress, handle, ServeConfig().model_dump())
    response = asyncio.run(ingress.models(Request({"type": "http", "method": "GET", "path": "/v1/models",
                                                   "headers": []})))
    (listed,) = json.loads(response.body)["data"]
    assert (listed["decoder"], listed["decoder_class"]) == (str(taesd_dir), "AutoencoderTiny")
    # a user_config without the decoder reloads the model with its own VAE
    generator.reconfigure({**config, "decoder": ""})
    assert (generator.info().decoder, generator.info().decoder_class) == (None, "AutoencoderKL")


def test_serve_rejects_the_decoder_for_a_pixel_space_model(tiny_toy_dir, taesd_dir, tmp_path):
    from tdm.serve.generator import load_served_model

    b = load_backbone(tiny_toy_dir)
    toy = TDMPipeline(b, model_spec(b, "student", 1, 1.0, grids={1: [999]}))
    toy.save_pretrained(tmp_path / "toy")
    with pytest.raises(InputError, match=r"^decoder: this model \(TDMToyDigitsPipeline\) generates pixels"):
        load_served_model(str(tmp_path / "toy"), None, str(taesd_dir))
    assert load_served_model(str(tmp_path / "toy"), None)[1].decoder_class is None


def test_serve_config_and_cli_take_the_decoder(capsys):
    import importlib.util
    from pathlib import Path

    from tdm.serve import ServeConfig

    assert ServeConfig().decoder is None and ServeConfig(decoder=" ").decoder is None
    spec = importlib.util.spec_from_file_location("serve_cli", Path(__file__).parents[1] / "pipelines" / "serve.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--print-config", "--decoder", "madebyollin/taesd"]) == 0
    (app,) = json.loads(capsys.readouterr().out)["applications"]
    assert app["args"]["decoder"] == "madebyollin/taesd"
