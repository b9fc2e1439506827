"""The on-disk text-embedding cache and gradient checkpointing of the trainable roles."""
import pytest
import torch

from tdm.backbones import load_backbone
from tdm.config import load_config
from tdm.teacher import resolve_teacher
from tdm.train import build_roles, encode_prompt_set


def test_prompt_embeddings_are_cached_per_teacher_and_prompt_set(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TDM_HOME", str(tmp_path))
    b = load_backbone(tiny_sd_dir)
    prompts = [f"a cat number {i}" for i in range(5)]
    teacher = resolve_teacher(str(tiny_sd_dir))
    first = encode_prompt_set(b, prompts, teacher, batch_size=2)   # 3 batches
    direct = b.encode_prompts(prompts)
    assert torch.allclose(first["encoder_hidden_states"], direct["encoder_hidden_states"], atol=1e-6)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 1

    def no_encoder(_):
        raise AssertionError("the text encoder ran although the embeddings are cached")

    monkeypatch.setattr(b, "encode_prompts", no_encoder)
    again = encode_prompt_set(b, prompts, teacher)
    assert torch.equal(again["encoder_hidden_states"], first["encoder_hidden_states"])
    with pytest.raises(AssertionError, match="text encoder ran"):   # another prompt set is another key
        encode_prompt_set(b, prompts[:4], teacher)
    with pytest.raises(AssertionError, match="text encoder ran"):   # caching off
        encode_prompt_set(b, prompts, teacher, use_cache=False)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_is_switchable(tiny_sd_dir, finetune):
    b = load_backbone(tiny_sd_dir)
    cfg = load_config({"student": {"finetune": finetune, "lora_rank": 4}, "train": {"gradient_checkpointing": True}})
    teacher, st = build_roles(cfg, b)
    assert st.student.net.is_gradient_checkpointing and st.fake.net.is_gradient_checkpointing
    x = torch.randn(2, *b.latent_shape, requires_grad=False)
    cond = b.encode_prompts(["a cat", "a dog"])
    st.student.net.train()
    out = st.student(x, torch.tensor([999, 500]), cond)
    out.square().mean().backward()
    assert all(p.grad is not None for p in st.student.trainable_parameters())
    off = build_roles(load_config({"student": {"finetune": "full"}}), load_backbone(tiny_sd_dir))[1]
    assert not off.student.net.is_gradient_checkpointing
