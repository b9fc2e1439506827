"""CLIP-space evaluation on a tiny random CLIP built from a config (no downloads)."""
import math

import pytest
import torch

from tdm.evaluation.clip import ClipEvaluator, clip_score_from_features, evaluate_against_teacher

MEAN = [0.5, 0.4, 0.3]
STD = [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from tdm.testing import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def evaluator(tiny_clip_dir):
    return ClipEvaluator(str(tiny_clip_dir))


def test_loads_preprocessor_numbers(evaluator):
    assert evaluator.crop_size == 32 and evaluator.resize_size == 32
    assert evaluator.mean.flatten().tolist() == pytest.approx(MEAN)
    assert evaluator.std.flatten().tolist() == pytest.approx(STD)


def test_fallback_without_preprocessor_config(tiny_clip_dir, tmp_path):
    import shutil

    from tdm.evaluation.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    bare = tmp_path / "bare"
    shutil.copytree(tiny_clip_dir, bare, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    ev = ClipEvaluator(bare)
    assert ev.crop_size == ev.resize_size == 32  # vision_config.image_size
    assert ev.mean.flatten().tolist() == pytest.approx(OPENAI_CLIP_MEAN)
    assert ev.std.flatten().tolist() == pytest.approx(OPENAI_CLIP_STD)


def test_preprocess_constant_image_is_exact(evaluator):
    # Non-square, larger, 1-channel: shorter side 48 -> 32, longer 80 -> 53, center crop 32x32.
    x = torch.full((2, 1, 48, 80), 0.7)
    y = evaluator.preprocess(x)
    assert y.shape == (2, 3, 32, 32)
    expected = (0.7 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(y, expected.view(1, 3, 1, 1).expand_as(y), atol=1e-5)


def test_preprocess_clamps_and_crops(evaluator):
    # A 64x64 image already clamps to [0, 1]: out-of-range values must not leak through the bicubic overshoot.
    x = torch.zeros(1, 3, 64, 64)
    x[..., :, 32:] = 1.0
    y = evaluator.preprocess(x) * evaluator.std + evaluator.mean
    assert y.shape == (1, 3, 32, 32)
    assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6
    assert torch.allclose(y[..., :, :8], torch.zeros(1, 3, 32, 8), atol=1e-5)
    assert torch.allclose(y[..., :, -8:], torch.ones(1, 3, 32, 8), atol=1e-5)
    # Already at the crop size: passed through untouched (up to normalisation).
    z = torch.rand(1, 3, 32, 32)
    assert torch.allclose(evaluator.preprocess(z) * evaluator.std + evaluator.mean, z, atol=1e-6)


def test_features_are_unit_norm(evaluator):
    torch.manual_seed(1)
    img = evaluator.image_features(torch.rand(5, 3, 40, 40), batch_size=2)
    txt = evaluator.text_features(["a cat", "two dogs", "x", "a photo of 3 birds", "zz"], batch_size=2)
    assert img.shape == (5, 16) and txt.shape == (5, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(5), atol=1e-5)
    # batching does not change results
    assert torch.allclose(txt, evaluator.text_features(["a cat", "two dogs", "x", "a photo of 3 birds", "zz"]),
                          atol=1e-5)


def test_clip_score_deterministic_and_bounded(evaluator):
    torch.manual_seed(2)
    images, prompts = torch.rand(4, 3, 32, 32), ["a cat", "a dog", "a red car", "a tree"]
    s1, s2 = evaluator.clip_score(images, prompts), evaluator.clip_score(images, prompts)
    assert s1 == s2
    assert 0.0 <= s1 <= 100.0
    with pytest.raises(ValueError):
        evaluator.clip_score(images, prompts[:3])


def test_clip_score_from_features_hand_checked():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [4.0, 3.0]])
    # cosines: 1, -1 (clipped to 0), 1/sqrt(2), 24/25
    expected = 100 * (1 + 0 + 1 / math.sqrt(2) + 24 / 25) / 4
    assert clip_score_from_features(img, txt) == pytest.approx(expected, rel=1e-12)
    assert clip_score_from_features(img[1:2], txt[1:2]) == 0.0
    with pytest.raises(ValueError):
        clip_score_from_features(img, txt[:3])


def test_fid(evaluator):
    torch.manual_seed(3)
    a = torch.rand(12, 3, 32, 32)
    b = (torch.rand(12, 3, 32, 32) * 0.3 + 0.7).clamp(0, 1)
    assert abs(evaluator.fid(a, a)) < 1e-4
    assert evaluator.fid(a, b) > 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        evaluator.fid(a[:1], b)
    with pytest.raises(ValueError, match="at least 2"):
        evaluator.fid(a, b[:1])


def test_evaluate_against_teacher(evaluator):
    torch.manual_seed(4)
    s, t = torch.rand(4, 3, 32, 32), torch.rand(4, 1, 32, 32)
    prompts = ["a", "b", "c", "d"]
    out = evaluate_against_teacher(s, t, prompts, evaluator)
    assert set(out) == {"fid_vs_teacher", "clip_score_student", "clip_score_teacher"}
    assert out["fid_vs_teacher"] > 0
    assert out["clip_score_student"] == evaluator.clip_score(s, prompts)
    assert all(0 <= out[k] <= 100 for k in ("clip_score_student", "clip_score_teacher"))


def test_bad_model_path(tmp_path, tiny_sd_dir):
    with pytest.raises(ValueError, match=r"^eval\.clip_model: cannot load .*does-not-exist"):
        ClipEvaluator(str(tmp_path / "does-not-exist"))
    # A real model directory that is not CLIP (the tiny SD pipeline's text encoder is CLIPTextModel only).
    with pytest.raises(ValueError, match=r"^eval\.clip_model: cannot load .*text_encoder.*not 'clip'"):
        ClipEvaluator(str(tiny_sd_dir / "text_encoder"))
    with pytest.raises(ValueError, match=r"^eval\.clip_model: cannot load"):
        ClipEvaluator(str(tiny_sd_dir / "unet"))
