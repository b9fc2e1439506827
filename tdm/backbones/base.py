"""The backbone adapter protocol that the teacher, the student and the fake score go through.

A backbone adapter knows one model family (SD-style UNets, PixArt/SD3 transformers, the toy): how
to load it, encode prompts, call the network, and decode latents. The trainer only sees:

- `Backbone.encode_prompts(prompts) -> Cond` and `Backbone.decode(latents) -> images`;
- `Backbone.latent_shape` and `Backbone.schedule` (a `tdm.schedules.NoiseSchedule`);
- `Denoiser` modules (one per role) mapping (x_t, t, cond[, num_steps]) to the raw network output,
  which `predict_x0_eps` turns into (x0, eps) with the schedule's parameterisation.

A new family is one adapter file that subclasses `Backbone`; nothing in the trainer changes.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..schedules import NoiseSchedule, to_x0_eps

#: Text conditioning of a batch: named tensors with the batch first (e.g. encoder_hidden_states).
Cond = dict[str, torch.Tensor]


def cond_index(cond: Cond, idx) -> Cond:
    """Select rows of every tensor in a condition."""
    return {k: v[idx] for k, v in cond.items()}


def cond_cat(*conds: Cond) -> Cond:
    """Concatenate conditions along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_to(cond: Cond, device, dtype=None) -> Cond:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype) for k, v in cond.items()}


class StepEmbedding(nn.Module):
    """TDM-unify conditioning on the sampling-step count K (tdm-method.md §1.6).

    A zero-initialised embedding row per supported K, added to the output of the network's timestep
    embedding through a forward hook; at initialisation the network is exactly the teacher.
    """

    def __init__(self, step_values: Sequence[int], dim: int):
        super().__init__()
        self.step_values = list(step_values)
        self.embedding = nn.Embedding(len(self.step_values), dim)
        nn.init.zeros_(self.embedding.weight)
        self._current: torch.Tensor | None = None

    def index(self, num_steps: torch.Tensor) -> torch.Tensor:
        """Row index of each K in `num_steps` (B,); raises for a K the student was not trained for."""
        table = torch.tensor(self.step_values, device=num_steps.device)
        match = num_steps.reshape(-1, 1) == table.reshape(1, -1)
        if not bool(match.any(1).all()):
            bad = sorted(set(num_steps[~match.any(1)].tolist()))
            raise ValueError(f"num_steps {bad} not supported; this model was trained for {self.step_values}")
        return match.float().argmax(1)

    def hook(self, module, inputs, output):
        if self._current is None:
            return output
        return output + self.embedding(self._current).to(output.dtype)


class Denoiser(nn.Module):
    """One role (teacher, student or fake score): raw network output for (x_t, t, cond[, num_steps]).

    `call(net, x, t, cond)` is the adapter's way of invoking the network; `time_embedding` the
    submodule whose output the StepEmbedding is added to (only when step_values is given).
    """

    def __init__(self, net: nn.Module, call, time_embedding_name: str | None = None,
                 time_embed_dim: int | None = None, step_values: Sequence[int] | None = None):
        super().__init__()
        self.net = net
        self._call = call
        self.step_embedding = None
        if step_values:
            self.step_embedding = StepEmbedding(step_values, time_embed_dim)
            net.get_submodule(time_embedding_name).register_forward_hook(self.step_embedding.hook)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, num_steps: torch.Tensor | None = None):
        if self.step_embedding is not None:
            if num_steps is None:
                raise ValueError("this model is conditioned on the step count: pass num_steps")
            self.step_embedding._current = self.step_embedding.index(num_steps.expand(x.shape[0]))
        try:
            return self._call(self.net, x, t, cond)
        finally:
            if self.step_embedding is not None:
                self.step_embedding._current = None


def predict_x0_eps(denoiser: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                   num_steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) predictions of a Denoiser (possibly DDP-wrapped) at timesteps t (B,), computed in float32."""
    out = denoiser(x, t, cond, num_steps) if num_steps is not None else denoiser(x, t, cond)
    a, s = schedule.alpha_sigma(t)
    return to_x0_eps(out.float(), x.float(), a, s, schedule.prediction_type)


class Backbone(ABC):
    """A loaded model family: frozen teacher network plus text encoding and decoding."""

    #: family name recorded in artifacts ("unet", ...)
    family: str
    schedule: NoiseSchedule
    #: (C, H, W) of the diffusion space (VAE latents, or pixels for the toy)
    latent_shape: tuple[int, int, int]
    #: the teacher network (frozen); student and fake score start as copies
    network: nn.Module
    #: submodule name whose output is the timestep embedding, and its width (for StepEmbedding)
    time_embedding_name: str
    time_embed_dim: int

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning for a list of prompts (no grad)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, C, H, W) float32, from samples in the diffusion space."""

    @staticmethod
    @abstractmethod
    def call_network(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Raw network output (eps, v or velocity) for a batch."""

    @abstractmethod
    def save_pretrained(self, path: str | Path, network: nn.Module | None = None) -> None:
        """Write a diffusers-layout pipeline directory, with `network` in place of the teacher's weights."""

    def to(self, device=None, dtype=None) -> "Backbone":
        """Move every component; returns self."""
        for m in self.modules().values():
            m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        return self

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """All torch components by name (network, text encoder, VAE, ...)."""

    def denoiser(self, network: nn.Module | None = None, step_values: Sequence[int] | None = None) -> Denoiser:
        """Wrap `network` (default: the teacher network) as a role, optionally conditioned on K."""
        return Denoiser(network if network is not None else self.network, self.call_network,
                        self.time_embedding_name, self.time_embed_dim, step_values)

    def trainable_copy(self, step_values: Sequence[int] | None = None) -> Denoiser:
        """A full copy of the teacher network in float32 with gradients on (student / fake score init)."""
        net = copy.deepcopy(self.network).float().requires_grad_(True).train()
        return self.denoiser(net, step_values)
