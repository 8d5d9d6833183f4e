"""Wan on ComfyUI's own objects as an AnyV2V backbone: the MODEL (any weight format ComfyUI loads:
fp16, bf16, fp8, quantized by other packs, with its LoRAs and model patches), the VAE, and the
CONDITIONING / CLIP_VISION_OUTPUT the user's graph produced.

ComfyUI does the model work: `load_models_gpu` places and offloads the weights, the MODEL's own
sampling object gives the sigmas (its shift, as a ModelSamplingSD3 node patched it) and turns the
network output into the denoised latent (`apply_model`), its ops run the layers in their stored
format. The engine's loops (`anyv2v_core`) run unchanged on top: this adapter turns ComfyUI's
denoised predictions into velocities, builds the rows' conditioning the way the core
`WanImageToVideo` / `Wan22ImageToVideoLatent` nodes do, and names the native self-attention
projections (`blocks.N.self_attn.q` / `.k`) for the injection hooks. It imports ComfyUI and is only
imported while a node runs.

Latents here are in the model's space (`process_latent_in` of the VAE's latents).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

import comfy.model_management
import comfy.samplers
from anyv2v_core.backbones.base import Backbone, InjectionLayers, RowCondition
from anyv2v_core.backbones.wan import TEMPORAL_STRIDE, WAN_DEFAULTS, attention_block_indices, first_frame_then_grey
from anyv2v_core.errors import AnyV2VError
from anyv2v_core.flow_schedule import FlowMatchingSchedule, as_float32

SCHEDULER = "simple"  # ComfyUI's uniform grid, the Wan reference grid for step counts that divide 1000


@dataclass(frozen=True, kw_only=True)
class ComfyFlowSchedule(FlowMatchingSchedule):
    """The flow path with ComfyUI's sigmas for the MODEL (its model_sampling, patches included).
    `apply_model` takes sigmas, so the model time of a level is the sigma itself."""

    model_sampling: object = None

    def sigmas(self, steps: int) -> list[float]:
        return [as_float32(float(s)) for s in comfy.samplers.calculate_sigmas(self.model_sampling, SCHEDULER, steps)]

    def model_time(self, sigma: float) -> float:
        return sigma


@dataclass
class ComfyWanRow(RowCondition):
    """One row of Wan 2.1 I2V / 2.2 I2V A14B conditioning, as ComfyUI's WAN21 model takes it."""

    frame_fields: ClassVar[tuple[str, ...]] = ("c_concat",)
    c_crossattn: torch.Tensor  # [1, L, 4096] text
    c_concat: torch.Tensor  # [1, 4 + C, F', h, w]: first-frame mask and latents of [first frame, grey...]
    clip_fea: torch.Tensor | None = None  # [1, 257, 1280] CLIP vision penultimate states (Wan 2.1)


@dataclass
class ComfyWanTI2VRow(RowCondition):
    """One row of Wan 2.2 TI2V conditioning: text, and the clean first latent frame."""

    c_crossattn: torch.Tensor  # [1, L, 4096]
    first_frame_latents: torch.Tensor  # [1, C, 1, h, w], model space


def model_kind(model) -> str:
    """Which Wan image-to-video layout a ComfyUI MODEL holds; AnyV2VError naming the input otherwise."""
    base = model.model
    kind = type(base).__name__
    if kind not in ("WAN21", "WAN22"):
        raise AnyV2VError(f"model: this MODEL is a {kind}, not a Wan image-to-video model; load Wan 2.1 I2V, Wan 2.2 "
                          "I2V A14B or Wan 2.2 TI2V 5B with Load Diffusion Model (UNETLoader)")
    network = base.diffusion_model
    in_channels, out_channels = network.patch_embedding.weight.shape[1], network.head.head.weight.shape[0] // 4
    if kind == "WAN22" and in_channels == out_channels:
        return "wan2.2-ti2v"
    if in_channels == out_channels + out_channels + TEMPORAL_STRIDE:
        return "wan2.1-i2v" if network.model_type == "i2v" else "wan2.2-i2v-a14b"
    raise AnyV2VError(f"model: this Wan MODEL takes {in_channels} input channels for {out_channels} output channels: a "
                      "text-to-video (or other) Wan model; AnyV2V needs an image-to-video one (Wan 2.1 I2V, Wan 2.2 "
                      "I2V A14B, Wan 2.2 TI2V 5B)")


class ComfyWanBackbone(Backbone):
    """A Wan MODEL (and a second, low-noise MODEL for Wan 2.2 A14B) plus a VAE, from ComfyUI."""

    sampler = None
    inversion_order = 2

    def __init__(self, kind: str, model, vae, *, model_low_noise=None, boundary: float = 0.9,
                 attention_blocks: str = "all") -> None:
        self.kind, self.name = kind, f"comfyui-{kind}"
        self.defaults = WAN_DEFAULTS[kind]
        self.experts = {"transformer": model} | ({"transformer_2": model_low_noise} if model_low_noise else {})
        self.boundary = boundary if model_low_noise is not None else None
        self.vae = vae
        self.schedule = ComfyFlowSchedule(shift=float(getattr(model.get_model_object("model_sampling"), "shift", 1.0)),
                                          model_sampling=model.get_model_object("model_sampling"))
        network = model.model.diffusion_model
        blocks = attention_block_indices(attention_blocks, len(network.blocks))
        self.injection_layers = InjectionLayers(
            attention=tuple(f"{expert}.blocks.{i}.self_attn" for expert in self.experts for i in blocks),
            query_key=("q", "k"))
        self.vae_scale_factor = 16 if kind == "wan2.2-ti2v" else 8
        self.device = comfy.model_management.get_torch_device()
        self.dtype = model.model.get_dtype()

    @property
    def denoiser(self) -> torch.nn.Module:
        return torch.nn.ModuleDict({name: patcher.model.diffusion_model for name, patcher in self.experts.items()})

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: patcher.model for name, patcher in self.experts.items()}

    def set_offload(self, policy: str, device=None) -> None:
        raise AnyV2VError("a ComfyUI MODEL is placed by ComfyUI's model management; it takes no AnyV2V offload policy")

    def row_blocks(self) -> list[torch.nn.Module]:
        return [block for patcher in self.experts.values() for block in patcher.model.diffusion_model.blocks]

    def expert_for(self, sigma: float):
        if self.boundary is None or sigma >= self.boundary:
            return self.experts["transformer"]
        return self.experts["transformer_2"]

    # ------------------------------------------------------------------------------------------ conditioning

    def condition(self, first_frame, prompt, *, num_frames, fps, unconditional=False):
        raise AnyV2VError("the native Wan backbone is conditioned with ComfyUI CONDITIONING (rows_for), not prompt text")

    def rows_for(self, first_frame: torch.Tensor, conditionings: Sequence[list], *, num_frames: int,
                 clip_vision_output=None) -> list[ComfyWanRow]:
        """One row per CONDITIONING, all with the first frame [1, H, W, 3] as their image condition
        (and `clip_vision_output` for Wan 2.1), through the MODEL's own `extra_conds`."""
        if self.kind == "wan2.1-i2v" and clip_vision_output is None:
            raise AnyV2VError("clip_vision_output: Wan 2.1 I2V needs the CLIP vision output of the first frame; connect "
                              "CLIPVisionEncode (clip_vision_h, crop none) of that frame")
        image_latents = self.vae.encode(first_frame_then_grey(first_frame, num_frames))  # as WanImageToVideo does
        mask = torch.ones(1, 1, *image_latents.shape[2:])
        mask[:, :, 0] = 0  # ComfyUI's mask: 0 where the frame is known
        values = {"concat_latent_image": image_latents, "concat_mask": mask}
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        noise = torch.zeros(1, image_latents.shape[1], *image_latents.shape[2:])
        return [ComfyWanRow(**self.model_conds(conditioning, values, noise)) for conditioning in conditionings]

    def model_conds(self, conditioning: list, values: dict, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors ComfyUI's sampler would pass to `apply_model` for this CONDITIONING (first entry)."""
        if not conditioning:
            raise AnyV2VError("conditioning is empty; connect the output of CLIPTextEncode")
        text, options = conditioning[0]
        base = self.experts["transformer"].model
        extra = base.extra_conds(**{**options, **values, "cross_attn": text, "device": torch.device("cpu"),
                                    "noise": noise})
        wanted = {field.name for field in dataclasses.fields(ComfyWanRow)}
        return {key: cond.process_cond(batch_size=1, device=torch.device("cpu"), area=None).cond.to(torch.float32)
                for key, cond in extra.items() if key in wanted}

    # ------------------------------------------------------------------------------------------ networks

    def encode_video(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:
            raise AnyV2VError("ComfyUI's VAE encodes to the posterior mean; posterior sampling is not available here")
        latents = self.vae.encode(frames[..., :3])
        return self.experts["transformer"].model.process_latent_in(latents).to("cpu", torch.float32)

    def predict(self, latents: torch.Tensor, timestep: float, rows: Sequence[ComfyWanRow]) -> torch.Tensor:
        """Velocity [B, C, F', h, w] at sigma `timestep`, from the MODEL's denoised prediction."""
        conds = {key: torch.cat([pad_tokens(getattr(row, key), rows, key) for row in rows])
                 for key in ("c_crossattn", "c_concat", "clip_fea") if getattr(rows[0], key, None) is not None}
        return self.velocity(latents, timestep, conds)

    def velocity(self, x: torch.Tensor, sigma: float, conds: dict[str, torch.Tensor]) -> torch.Tensor:
        """(x - denoised) / sigma, as ComfyUI's Euler sampler derives its step; at sigma 0 (the first
        inversion step) the denoised latent is x itself, so the network's raw velocity is read."""
        patcher = self.expert_for(sigma)
        base = patcher.model
        if patcher not in comfy.model_management.loaded_models():  # first call, an expert switch, or unloaded since
            rows_at_once = 1 if self.one_row_at_a_time else x.shape[0]
            comfy.model_management.load_models_gpu([patcher],
                                                   memory_required=base.memory_required([rows_at_once, *x.shape[1:]]))
        device = patcher.load_device
        x = x.to(device)
        sigmas = torch.full((x.shape[0],), sigma, device=device)
        options = patcher.model_options
        transformer_options = {**options.get("transformer_options", {}), "sigmas": sigmas,
                               "cond_or_uncond": list(range(x.shape[0]))}
        conds = {key: value.to(device) for key, value in conds.items()}
        raw = []
        handle = base.diffusion_model.register_forward_hook(lambda module, args, output: raw.append(output))
        try:
            if "model_function_wrapper" in options:
                denoised = options["model_function_wrapper"](base.apply_model, {
                    "input": x, "timestep": sigmas, "c": {**conds, "transformer_options": transformer_options},
                    "cond_or_uncond": transformer_options["cond_or_uncond"]})
            else:
                denoised = base.apply_model(x, sigmas, transformer_options=transformer_options, **conds)
        finally:
            handle.remove()
        if sigma == 0:
            return raw[-1].to("cpu", torch.float32)
        return ((x - denoised) / sigma).to("cpu", torch.float32)

    def decode(self, latents: torch.Tensor, chunk_size: int = 1, progress=None) -> torch.Tensor:
        samples = self.experts["transformer"].model.process_latent_out(latents)
        frames = self.vae.decode(samples)
        if progress is not None:
            progress(frames.shape[-4], frames.shape[-4])
        return frames.reshape(-1, *frames.shape[-3:]).to("cpu", torch.float32)

    def latent_output(self, latents: torch.Tensor) -> dict:
        """A LATENT for core nodes (VAEDecode): the VAE's latent space."""
        return {"samples": self.experts["transformer"].model.process_latent_out(latents)}


class ComfyWanTI2VBackbone(ComfyWanBackbone):
    """Wan 2.2 TI2V 5B: the first frame's latent rides along clean as latent frame 0 (timestep 0)."""

    conditioning_frames = 1

    def rows_for(self, first_frame: torch.Tensor, conditionings: Sequence[list], *, num_frames: int,
                 clip_vision_output=None) -> list[ComfyWanTI2VRow]:
        first = self.encode_video(first_frame)
        rows = []
        for conditioning in conditionings:
            if not conditioning:
                raise AnyV2VError("conditioning is empty; connect the output of CLIPTextEncode")
            rows.append(ComfyWanTI2VRow(c_crossattn=conditioning[0][0].to(torch.float32), first_frame_latents=first))
        return rows

    def predict(self, latents: torch.Tensor, timestep: float, rows: Sequence[ComfyWanTI2VRow]) -> torch.Tensor:
        first = torch.cat([row.first_frame_latents for row in rows]).to(latents)
        x = torch.cat([first, latents], dim=2)
        denoise_mask = torch.ones(x.shape[0], 1, *x.shape[2:])
        denoise_mask[:, :, 0] = 0  # the known first frame: per-frame timestep 0 (WAN22.process_timestep)
        conds = {"c_crossattn": torch.cat([pad_tokens(row.c_crossattn, rows, "c_crossattn") for row in rows]),
                 "denoise_mask": denoise_mask}
        return self.velocity(x, timestep, conds)[:, :, 1:]

    def video_latents(self, latents: torch.Tensor, row: ComfyWanTI2VRow) -> torch.Tensor:
        return torch.cat([row.first_frame_latents.to(latents), latents], dim=2)


def native_wan_backbone(model, vae, *, model_low_noise=None, boundary: float = 0.9,
                        attention_blocks: str = "all") -> ComfyWanBackbone:
    """The backbone for a Wan MODEL (+ the low-noise expert of Wan 2.2 A14B) and its VAE."""
    kind = model_kind(model)
    if model_low_noise is not None and model_kind(model_low_noise) != kind:
        raise AnyV2VError("model_low_noise: the two experts must be the same kind of Wan model (Wan 2.2 I2V A14B's "
                          "high-noise and low-noise files)")
    backbone_class = ComfyWanTI2VBackbone if kind == "wan2.2-ti2v" else ComfyWanBackbone
    return backbone_class(kind, model, vae, model_low_noise=model_low_noise, boundary=boundary,
                          attention_blocks=attention_blocks)


def pad_tokens(tensor: torch.Tensor, rows: Sequence, key: str) -> torch.Tensor:
    """Text embeddings zero-padded to the longest row's token count, so rows batch (Wan's text
    encoder already zeroes the tokens after a prompt's own, up to its 512)."""
    if key != "c_crossattn":
        return tensor
    longest = max(getattr(row, key).shape[1] for row in rows)
    return torch.nn.functional.pad(tensor, (0, 0, 0, longest - tensor.shape[1]))
