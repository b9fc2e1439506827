"""The backbone adapter protocol, shown with the toy and with an SD-1.5-shaped pipeline built from configs."""
import pytest
import torch

from tdm.backbones import StepEmbedding, cond_cat, cond_index, load_backbone, predict_x0_eps
from tdm.generation import TDMPipeline
from tdm.spec import teacher_spec


@pytest.fixture(params=["toy", "sd15"])
def backbone(request, tiny_toy_dir, tiny_sd_dir):
    return load_backbone(tiny_toy_dir if request.param == "toy" else tiny_sd_dir)


def test_adapter_contract(backbone):
    cond = backbone.encode_prompts(["a handwritten digit 3", ""])
    assert cond["encoder_hidden_states"].shape[0] == 2
    assert torch.equal(cond_index(cond_cat(cond, cond), [2])["encoder_hidden_states"][0],
                       cond["encoder_hidden_states"][0])
    x = torch.randn(2, *backbone.latent_shape)
    t = torch.tensor([999, 10])
    x0, eps = predict_x0_eps(backbone.denoiser(), backbone.schedule, x, t, cond)
    a, s = backbone.schedule.alpha_sigma(t)
    # (x0, eps) reconstruct x_t exactly: the conversion is the schedule's parameterisation
    assert torch.allclose(a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps, x, atol=1e-4)
    images = backbone.decode(x0.clamp(-1, 1))
    assert images.min() >= 0 and images.max() <= 1 and images.shape[0] == 2


def test_sd15_shapes(tiny_sd_dir):
    b = load_backbone(tiny_sd_dir)
    assert b.vae is not None and b.latent_shape == (4, 8, 8)
    assert b.schedule.prediction_type == "epsilon"
    img = b.decode(torch.zeros(1, 4, 8, 8))
    assert img.shape == (1, 3, 16, 16)  # VAE upsamples by 2 per extra level


def test_step_embedding_is_zero_initialised_and_selective(tiny_toy_dir):
    b = load_backbone(tiny_toy_dir)
    student = b.trainable_copy(step_values=[1, 2, 4])
    cond = b.encode_prompts(["a handwritten digit 1"] * 2)
    x, t = torch.randn(2, *b.latent_shape), torch.tensor([500, 500])
    with torch.no_grad():
        ref = b.denoiser()(x, t, cond)
        assert torch.allclose(student(x, t, cond, torch.tensor([4, 1])), ref, atol=1e-6)
        student.step_embedding.embedding.weight[2].fill_(1.0)   # row of K = 4
        out = student(x, t, cond, torch.tensor([4, 1]))
    assert not torch.allclose(out[0], ref[0]) and torch.allclose(out[1], ref[1], atol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        student(x, t, cond, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="pass num_steps"):
        student(x, t, cond)
    assert torch.equal(StepEmbedding([1, 2, 4], 8).index(torch.tensor([4, 1, 2])), torch.tensor([2, 0, 1]))


def test_pipeline_round_trip_and_seeding(tiny_sd_dir, tmp_path):
    b = load_backbone(tiny_sd_dir)
    spec = teacher_spec(b, num_steps=3, guidance_scale=2.0)
    pipe = TDMPipeline(b, spec)
    a = pipe(["cat", "dog"], seed=7)
    assert a.shape == (2, 3, 16, 16)
    pipe.save_pretrained(tmp_path / "p")
    again = TDMPipeline.from_pretrained(tmp_path / "p")
    assert torch.allclose(again(["cat", "dog"], seed=7), a, atol=1e-5)
    # image i depends only on (prompt i, seed + i), not on its batch
    assert torch.allclose(pipe(["dog"], seeds=[8]), a[1:], atol=1e-5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(["cat"], num_inference_steps=0)
    with pytest.raises(ValueError, match="prompt"):
        pipe([])
