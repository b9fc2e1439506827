"""The backbone adapter protocol that the teacher, the student and the fake score go through.

A backbone adapter knows one model family (SD-style UNets, PixArt/SD3 transformers, the toy): how
to load it, encode prompts, call the network, and decode latents. The trainer only sees:

- `Backbone.encode_prompts(prompts) -> Cond` and `Backbone.decode(latents) -> images or videos`;
- `Backbone.latent_shape` (any rank: a video family adds a frame axis) and `Backbone.schedule` (a
  `tdm.schedules.NoiseSchedule`);
- `Denoiser` modules (one per role) mapping (x_t, t, cond[, num_steps]) to the raw network output,
  which `predict_x0_eps` turns into (x0, eps) with the schedule's parameterisation.

A new family is one adapter file that subclasses `Backbone`; nothing in the trainer changes.
"""
from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
from torch import nn

from ..errors import ConfigError, first_line
from ..losses import classifier_free_guidance
from ..schedules import NoiseSchedule, to_x0_eps

#: Text conditioning of a batch: named tensors with the batch first (e.g. encoder_hidden_states).
Cond = dict[str, torch.Tensor]
#: A diffusers or transformers model: its config and submodules are attributes known only at run time.
Model = Any


def cond_index(cond: Cond, idx) -> Cond:
    """Select rows of every tensor in a condition."""
    return {k: v[idx] for k, v in cond.items()}


def cond_cat(*conds: Cond) -> Cond:
    """Concatenate conditions along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class StepEmbedding(nn.Module):
    """TDM-unify conditioning on the sampling-step count K (docs/method.md §5).

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

    def hook(self, _module, _inputs, output):
        if self._current is None:
            return output
        e = self.embedding(self._current).to(output.dtype)  # (B, dim)
        # a per-token timestep embedding (B, tokens, dim), e.g. Wan 2.2 TI2V, gets the same row on every token
        return output + e.reshape(e.shape[0], *([1] * (output.ndim - 2)), e.shape[-1])


class Denoiser(nn.Module):
    """One role (teacher, student or fake score): raw network output for (x_t, t, cond[, num_steps]).

    `call(net, x, t, cond)` is the adapter's way of invoking the network; `time_embedding` the
    submodule whose output the StepEmbedding is added to (only when step_values is given).

    Roles either own a full copy of the network, or share one frozen base carrying LoRA adapters
    (`adapter` = the role's adapter name; None on a base with adapters = the base alone, i.e. the
    teacher). Each call activates the role's adapter, so the three roles hold one copy of the base.
    """

    def __init__(self, net: Model, call, time_embedding_name: str | None = None,
                 time_embed_dim: int | None = None, step_values: Sequence[int] | None = None,
                 adapter: str | None = None):
        super().__init__()
        self.net = net
        self._call = call
        self.adapter = adapter
        self._lora_layers: list | None = None
        self.step_embedding = None
        if step_values:
            if time_embedding_name is None or time_embed_dim is None:
                raise ValueError("a step-conditioned role needs the network's time embedding name and width")
            self.step_embedding = StepEmbedding(step_values, time_embed_dim)
            net.get_submodule(time_embedding_name).register_forward_hook(self.step_embedding.hook)

    def _activate(self) -> None:
        """Point every LoRA layer of the shared base at this role (or disable them for the base).

        Sets peft's layer state directly: peft's own set_adapter also flips requires_grad of the other
        adapters, which would silently freeze the other role's parameters between its steps."""
        if self._lora_layers is None:  # found once: roles are built after the adapters are added
            from peft.tuners.tuners_utils import BaseTunerLayer
            self._lora_layers = [m for m in self.net.modules() if isinstance(m, BaseTunerLayer)]
        for m in self._lora_layers:
            m._disable_adapters = self.adapter is None
            if self.adapter is not None:
                m._active_adapter = [self.adapter]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters this role trains: its LoRA adapter (shared base) or every network parameter
        that requires grad (full copy), plus its step embedding."""
        if self.adapter is not None:
            # named from this role's own attributes: under FSDP the shared base also carries every role's
            # step embedding (tdm.sharding.shard_base), which must not be found a second time under `net.`
            tag = f".{self.adapter}."
            own = [(n, p) for n, p in self.net.named_parameters(prefix="net") if "lora_" in n and tag in n]
            if self.step_embedding is not None:
                own += list(self.step_embedding.named_parameters(prefix="step_embedding"))
            return own
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def role_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores for this role: the full network, or only the adapter (the base is
        the teacher, restored from the teacher itself)."""
        if self.adapter is None:
            return self.state_dict()
        return {n: p.detach() for n, p in self.named_trainable_parameters()}

    def load_role_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.adapter is None:
            self.load_state_dict(state)
            return
        own = dict(self.named_trainable_parameters())
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state))[:3], sorted(set(state) - set(own))[:3]
            raise ValueError(f"checkpoint does not match the {self.adapter!r} adapter (missing {missing}, "
                             f"unexpected {extra}): was it trained with another student.finetune / lora_rank?")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, num_steps: torch.Tensor | None = None):
        self._activate()
        if self.step_embedding is not None:
            if num_steps is None:
                raise ValueError("this model is conditioned on the step count: pass num_steps")
            self.step_embedding._current = self.step_embedding.index(num_steps.expand(x.shape[0]))
        try:
            return self._call(self.net, x, t, cond)
        finally:
            if self.step_embedding is not None:
                self.step_embedding._current = None


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """A role's trained parameters (see Denoiser.named_trainable_parameters); DDP-wrapped or not."""
    module = unwrap(module)
    if isinstance(module, Denoiser):
        return module.trainable_parameters()
    return [p for p in module.parameters() if p.requires_grad]


def predict_x0_eps(denoiser: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                   num_steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) predictions of a Denoiser (possibly DDP-wrapped) at timesteps t (B,), computed in float32."""
    out = denoiser(x, t, cond, num_steps) if num_steps is not None else denoiser(x, t, cond)
    a, s = schedule.alpha_sigma(t)
    return to_x0_eps(out.float(), x.float(), a, s, schedule.prediction_type)


def guided_x0_eps(denoiser: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                  uncond: Cond, scale: float, guide=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) of a guided prediction at x_t (docs/method.md §9): both branches in one batched call, guided
    on the raw network output as the stock pipelines guide, by `guide(out_cond, out_uncond, scale)`
    (default: linear CFG; a family's Backbone.guide), computed in float32."""
    out = denoiser(torch.cat([x, x]), torch.cat([t, t]), cond_cat(cond, uncond)).float()
    out_cond, out_uncond = out.chunk(2)
    guided = (guide or classifier_free_guidance)(out_cond, out_uncond, scale)
    a, s = schedule.alpha_sigma(t)
    return to_x0_eps(guided, x.float(), a, s, schedule.prediction_type)


def stock_call_parameters(pipeline_class: str) -> set[str] | None:
    """The keyword arguments of a diffusers pipeline class's __call__; None for a tdm-only class (the toys)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    return set(inspect.signature(cls.__call__).parameters) if cls is not None else None


def grid_rule(pipeline_class: str, schedule_kind: str) -> str:
    """tdm.sampler.GridRule of a pipeline class on a schedule kind (see Backbone.grid_rule)."""
    accepts = stock_call_parameters(pipeline_class)
    if schedule_kind == "flow" and accepts is not None and not {"sigmas", "timesteps"} & accepts:
        return "flow_match"
    return "uniform"


B = TypeVar("B", bound="Backbone")


class Backbone(ABC):
    """A loaded model family: frozen teacher network plus text encoding and decoding."""

    #: family name recorded in artifacts ("unet", ...)
    family: str
    schedule: NoiseSchedule
    #: shape of one sample in the diffusion space (VAE latents, or pixels for the toys): (C, H, W) for images;
    #: a video family's own layout, e.g. (C, F, H, W) for Wan and (F, C, H, W) for CogVideoX
    latent_shape: tuple[int, ...]
    #: frames per decoded sample and their rate; None for an image model
    frames: int | None = None
    fps: float | None = None
    #: the teacher network (frozen); student and fake score start as copies. A diffusers model: its
    #: config and submodules are attributes only known at run time, hence Any
    network: Any
    #: the adapter's diffusers scheduler config (the noise schedule; export derives the student's from it)
    scheduler_config: dict
    #: submodule name whose output is the timestep embedding, and its width (for StepEmbedding)
    time_embedding_name: str
    time_embed_dim: int

    #: the autoencoder `decode` goes through (a diffusers model, hence Any); None for a pixel-space model (the toy)
    vae: Any
    #: where the decoder came from once `set_decoder` replaced the model's own VAE; None until then
    decoder_source: str | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of decoded images: the latent size times the VAE's upsampling."""
        from .decoders import upsampling

        h, w = self.latent_shape[-2:]
        f = 1 if self.vae is None else upsampling(self.vae)
        return h * f, w * f

    def prompt_tokenizer(self) -> tuple[Any, int] | None:
        """(tokenizer, limit in tokens) of the text encoder that reads the most of a prompt; None when the
        family has no tokenizer limit. Default: the pipeline's `tokenizer`, bounded by the adapter's
        `max_sequence_length` when it sets one, else by the tokenizer's own model_max_length."""
        tok = getattr(self, "tokenizer", None) or getattr(getattr(self, "pipe", None), "tokenizer", None)
        if tok is None:
            return None
        limit = getattr(self, "max_sequence_length", None) or getattr(tok, "model_max_length", None)
        return (tok, int(limit)) if isinstance(limit, int) and 0 < limit < 100_000 else None

    def readable_prompt(self, prompt: str) -> str:
        """The part of `prompt` the model reads: all of it, or, past the text encoder's token limit
        (prompt_tokenizer), its first tokens decoded back to text. Encoders truncate; serving reports
        this as `revised_prompt` (README, "Serving: limits")."""
        found = self.prompt_tokenizer()
        if found is None:
            return prompt
        tok, limit = found
        budget = limit - len(tok("", add_special_tokens=True)["input_ids"])  # BOS/EOS take their places
        # truncate at budget + 1: enough to tell "too long", without the tokenizer's over-length warning
        ids = tok(prompt, add_special_tokens=False, truncation=True, max_length=budget + 1)["input_ids"]
        if len(ids) <= budget:
            return prompt
        return tok.decode(ids[:budget], skip_special_tokens=True).strip()

    def decoder_spec(self):
        """The tdm.spec.DecoderSpec of what `decode` uses (None for a pixel-space model)."""
        from ..spec import DecoderSpec

        if self.vae is None:
            return None
        return DecoderSpec(class_name=type(self.vae).__name__, source=self.decoder_source)

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, model_index: dict, device="cpu", dtype=torch.float32) -> "Backbone":
        """Load the family's pipeline from a diffusers-layout directory or hub id (`model_index`: its
        model_index.json), frozen, on `device` in `dtype`."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning for a list of prompts (no grad)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) or, for a video model, videos (B, F, C, H, W), float32 in [0, 1], from samples
        in the diffusion space."""

    @abstractmethod
    def call_network(self, net: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Raw network output (eps, v or velocity) for a batch."""

    @abstractmethod
    def save_pretrained(self, path: str | Path, network: Model | None = None,
                        scheduler_config: dict | None = None) -> None:
        """Write a diffusers-layout pipeline directory, with `network` in place of the teacher's weights
        (and `scheduler_config` in place of the teacher's scheduler)."""

    #: diffusers pipeline class written to model_index.json; its LoRA loader's component prefix
    pipeline_class: str
    lora_prefix: str = "unet"

    @property
    def grid_rule(self) -> str:
        """How the student's default grids are laid out (tdm.sampler.GridRule): "flow_match" when the
        stock pipeline's __call__ takes neither timesteps nor sigmas (Wan), so only its scheduler's own
        grid can be reproduced by stock diffusers; else "uniform"."""
        return grid_rule(self.pipeline_class, self.schedule.kind)

    @property
    def stock_call_kwargs(self) -> dict:
        """Extra keyword arguments the stock pipeline's __call__ needs to compute what the adapter computes."""
        return {}

    def guide(self, out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided raw network output of the two CFG branches (B, *latent_shape): diffusers' linear CFG
        (docs/method.md §9); a family whose stock pipeline guides otherwise (Qwen-Image) overrides it."""
        return classifier_free_guidance(out_cond, out_uncond, scale)

    def stock_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The `latents=` argument of the stock pipeline's __call__ that starts from `noise` (B, *latent_shape):
        the noise itself, or the family's packed layout (FLUX.1, Qwen-Image pack 2x2 latent patches)."""
        return noise

    #: whether the network embeds a guidance scale (a guidance-distilled teacher, e.g. FLUX.1-dev: one pass,
    #: no unconditional branch; loss.teacher_guidance "embedded")
    embeds_guidance: bool = False

    def with_guidance(self, cond: Cond, scale: float) -> Cond:
        """`cond` carrying the scale the network embeds, as a (B,) float32 tensor "guidance" (docs/method.md
        §9); `cond` unchanged for a network that embeds none."""
        if not self.embeds_guidance:
            return cond
        first = next(iter(cond.values()))
        return {**cond, "guidance": torch.full((first.shape[0],), float(scale), device=first.device)}

    def save_lora(self, path: str | Path, network: Model, adapter: str) -> bool:
        """Write `adapter` of `network` as diffusers LoRA weights (`pipe.load_lora_weights(path)`).
        Returns False when the family's diffusers pipeline has no LoRA loader (e.g. PixArt-alpha)."""
        import diffusers
        from peft.utils import get_peft_model_state_dict

        cls = getattr(diffusers, self.pipeline_class, None)
        if cls is None or not hasattr(cls, "save_lora_weights"):
            return False
        layers = get_peft_model_state_dict(network, adapter_name=adapter)
        meta = network.peft_config[adapter].to_dict()
        meta["target_modules"] = sorted(meta["target_modules"])  # a set in peft; JSON needs a list
        cls.save_lora_weights(str(path), **{f"{self.lora_prefix}_lora_layers": layers,
                                            f"{self.lora_prefix}_lora_adapter_metadata": meta})
        return True

    def set_decoder(self, vae: Model, source: str | None = None, field: str = "decoder") -> None:
        """Decode with the autoencoder `vae` (AutoencoderKL or AutoencoderTiny, e.g. TAESD) instead of
        the current VAE; it is moved to the current VAE's device and dtype. `source` says where it came
        from (reported by serving); `field` names the option in errors. The replaced VAE is dropped:
        a decoder is an inference option, so `save_pretrained` refuses afterwards rather than ship it."""
        from .decoders import check_decoder

        own = self._require_vae(field)
        label = source or f"the {type(vae).__name__} given"
        check_decoder(vae, own, self.latent_shape[0], label, field)
        p = next(own.parameters())
        vae = vae.to(p.device)
        if vae.dtype != p.dtype:  # cast only when needed: diffusers warns on every dtype cast of a model
            vae = vae.to(dtype=p.dtype)
        self.vae = vae.eval().requires_grad_(False)
        self.decoder_source = source or f"{type(vae).__name__} module"

    def use_decoder(self, location: str | Path, field: str = "decoder") -> None:
        """Decode with the autoencoder at `location`: a hub id, a local diffusers directory or an s3://
        prefix (see tdm.backbones.decoders.load_decoder)."""
        from .decoders import load_decoder

        p = next(self._require_vae(field).parameters())  # a pixel-space model fails before any download
        self.set_decoder(load_decoder(location, p.device, p.dtype, field), source=str(location), field=field)

    def _require_vae(self, field: str) -> Model:
        if self.vae is None:
            from ..errors import InputError

            raise InputError(f"{field}: this model ({self.pipeline_class}) generates pixels directly (no VAE), "
                              f"so there is no decoder to replace; leave {field} unset")
        return self.vae

    def _require_own_vae(self) -> None:
        """save_pretrained writes the model's VAE; after set_decoder that would be the replacement."""
        if self.decoder_source is not None:
            raise ValueError(f"save_pretrained: this backbone decodes with a replacement decoder "
                             f"({self.decoder_source}), which an export would ship as the model's VAE; save from "
                             f"a backbone loaded without a decoder")

    def to(self: B, device=None, dtype=None) -> B:
        """Move every component; returns self."""
        for m in self.modules().values():
            m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        return self

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """All torch components by name (network, text encoder, VAE, ...)."""

    def denoiser(self, network: Model | None = None, step_values: Sequence[int] | None = None,
                 adapter: str | None = None) -> Denoiser:
        """Wrap `network` (default: the teacher network) as a role, optionally conditioned on K."""
        return Denoiser(network if network is not None else self.network, self.call_network,
                        self.time_embedding_name, self.time_embed_dim, step_values, adapter)

    def trainable_copy(self, step_values: Sequence[int] | None = None,
                       gradient_checkpointing: bool = False) -> Denoiser:
        """A full copy of the teacher network in float32 with gradients on (student / fake score init)."""
        net = copy.deepcopy(self.network).float().requires_grad_(True).train()
        if gradient_checkpointing:
            net.enable_gradient_checkpointing()
        return self.denoiser(net, step_values)

    #: default LoRA target modules of the family (peft `target_modules`)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def lora_role(self, name: str, rank: int, alpha: float, targets: Sequence[str] | None = None,
                  step_values: Sequence[int] | None = None, gradient_checkpointing: bool = False) -> Denoiser:
        """A role as a LoRA adapter `name` on the shared teacher network (the base stays frozen).

        LoRA B starts at zero, so the role starts exactly at the teacher. The adapter's weights are
        float32 whatever the base dtype (a bf16 base is the usual GPU set-up)."""
        from peft import LoraConfig

        # peft annotates lora_alpha as int; the scale alpha / r is a float either way
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets or self.lora_targets),  # type: ignore[arg-type]
                            init_lora_weights=True)
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
                warnings.simplefilter("ignore", UserWarning)
                if hasattr(self.network, "add_adapter"):  # diffusers' PeftAdapterMixin (records peft_config)
                    self.network.add_adapter(config, adapter_name=name)
                else:                                       # e.g. PixArtTransformer2DModel
                    from peft import inject_adapter_in_model
                    inject_adapter_in_model(config, self.network, adapter_name=name)
        except ValueError as e:  # e.g. no module matches the targets
            raise ConfigError(f"student.lora_targets: {first_line(e)}") from None
        role = self.denoiser(self.network, step_values, adapter=name)
        for _, p in role.named_trainable_parameters():
            p.data = p.data.float()
        for n, p in self.network.named_parameters():  # add_adapter froze the previously added adapters
            if "lora_" in n:
                p.requires_grad_(True)
        if gradient_checkpointing:  # only acts under grad: the teacher's no-grad calls are unaffected
            self.network.enable_gradient_checkpointing()
        self.network.eval()  # dropout-free as the teacher; LoRA dropout is 0
        return role
