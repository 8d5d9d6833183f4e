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

Each node's model work follows ComfyUI's own sampler (comfy/samplers.py CFGGuider): `running` sizes
`load_models_gpu` for the phase's rows (inversion: one row; sampling: three, or one at a time), the
MODEL's wrappers and callbacks are merged into the run's options, and the predictions run between
the patcher's `pre_run` and `cleanup`, for each expert in turn. Latents are in the model's space
(`process_latent_in` of the VAE's latents) and on the MODEL's load device, as the engine's are on
a backbone's device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
from anyv2v_core.backbones.base import Backbone, InjectionLayers, RowCondition
from anyv2v_core.backbones.wan import (TEMPORAL_STRIDE, WAN_DEFAULTS, WanBackbone, attention_block_indices,
                                        first_frame_then_grey)
from anyv2v_core.errors import AnyV2VError
from anyv2v_core.flow_schedule import FlowMatchingSchedule, as_float32

SCHEDULER = "simple"  # ComfyUI's uniform grid, the Wan reference grid for step counts that divide 1000
# ComfyUI's `cond_or_uncond` labels of a batch row (comfy/samplers.py: the index in [cond, uncond]).
# The source row is labelled COND: it is the conditional prediction of the inversion (ComfyUI runs
# such a cfg-1 pass as one COND row), and keeps that label in sampling, so that a patch keyed on the
# label treats the source branch as it did while inverting it.
COND, UNCOND = 0, 1
VAE_FILES = {16: "wan_2.1_vae.safetensors", 48: "wan2.2_vae.safetensors"}  # by latent channels
# model_options entries that change how ComfyUI's sampler combines the rows; AnyV2V's loop does
# classifier-free guidance itself, so it cannot honour them
GUIDANCE_PATCHES = ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function",
                    "sampler_calc_cond_batch_function")
TORCH_COMPILE_WRAPPER = "torch.compile"  # the key of TorchCompileModel's APPLY_MODEL wrapper (comfy_api.torch_helpers)


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
    cond_or_uncond: int = COND


@dataclass
class ComfyWanTI2VRow(RowCondition):
    """One row of Wan 2.2 TI2V conditioning: text, and the clean first latent frame, which goes in front
    of the first temporal window only (a later window starts mid-video)."""

    frame_fields: ClassVar[tuple[str, ...]] = ("follows_first_frame",)
    c_crossattn: torch.Tensor  # [1, L, 4096]
    first_frame_latents: torch.Tensor  # [1, C, 1, h, w], model space, on the CPU
    # [1, 1, F'-1, 1, 1] bool over the generated latent frames: True on the one right after the first frame
    follows_first_frame: torch.Tensor
    cond_or_uncond: int = COND


def latent_channels(model) -> int:
    """The latent channels a Wan MODEL denoises (its output; the 1x2x2 patch makes 4 per channel)."""
    return model.model.diffusion_model.head.head.weight.shape[0] // 4


def model_kind(model) -> str:
    """Which Wan image-to-video layout a ComfyUI MODEL holds; AnyV2VError naming the input otherwise."""
    base = model.model
    kind = type(base).__name__
    if kind not in ("WAN21", "WAN22"):
        raise AnyV2VError(f"model: this MODEL is a {kind}, not a Wan image-to-video model; load Wan 2.1 I2V, Wan 2.2 "
                          "I2V A14B or Wan 2.2 TI2V 5B with Load Diffusion Model (UNETLoader)")
    network = base.diffusion_model
    in_channels, out_channels = network.patch_embedding.weight.shape[1], latent_channels(model)
    if kind == "WAN22" and in_channels == out_channels:
        return "wan2.2-ti2v"
    if in_channels == out_channels + out_channels + TEMPORAL_STRIDE:
        # Wan 2.1 I2V has the CLIP image projection (ComfyUI's model_type "i2v"); Wan 2.2 A14B's experts do not
        return "wan2.1-i2v" if network.model_type == "i2v" else "wan2.2-i2v-a14b"
    raise AnyV2VError(f"model: this Wan MODEL takes {in_channels} input channels for {out_channels} output channels: a "
                      "text-to-video (or other) Wan model; AnyV2V needs an image-to-video one (Wan 2.1 I2V, Wan 2.2 "
                      "I2V A14B, Wan 2.2 TI2V 5B)")


def check_patches(name: str, model) -> None:
    """Refuse MODEL patches the AnyV2V loop cannot honour, naming them and what to do."""
    options = model.model_options
    guidance = [key for key in GUIDANCE_PATCHES if options.get(key)]
    if guidance:
        raise AnyV2VError(f"{name}: this MODEL carries {', '.join(guidance)} (a guidance patch such as RescaleCFG, "
                          "CFGZeroStar, CFGNorm, APG or Skip Layer Guidance); AnyV2V combines the rows with its own "
                          "classifier-free guidance and cannot apply it: connect the MODEL from before that node")
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TORCH_COMPILE_WRAPPER):
        raise AnyV2VError(f"{name}: this MODEL went through TorchCompileModel; a compiled model ignores the hooks that "
                          "inject the source's attention, so the edit would silently lose the source's motion: "
                          "connect the MODEL from before TorchCompileModel")


def check_vae(kind: str, model, vae) -> None:
    """Refuse a VAE whose latents are not the MODEL's (Wan 2.1's VAE with TI2V 5B, Wan 2.2's with a 14B model)."""
    wanted = latent_channels(model)
    found = (getattr(vae, "latent_channels", None), vae.temporal_compression_decode())
    if found != (wanted, TEMPORAL_STRIDE):
        raise AnyV2VError(f"vae: this VAE makes {found[0]}-channel latents ({found[1]} frames per latent frame); "
                          f"{kind} works on Wan's {wanted}-channel ones ({TEMPORAL_STRIDE} frames per latent frame): "
                          f"load {VAE_FILES.get(wanted, 'the VAE of this model')} with Load VAE")


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
        self.latent_channels = latent_channels(model)
        self.vae_scale_factor = vae.spacial_compression_encode()
        self.temporal_stride = vae.temporal_compression_decode()
        self.dtype = model.model.get_dtype()
        # the phase running (`running`): the batch shape its memory is sized for, and the expert
        # loaded for it with that expert's run options (its model_options, wrappers and callbacks merged)
        self.phase_shape: list[int] | None = None
        self.active_expert = None
        self.run_options: dict | None = None

    @property
    def device(self) -> torch.device:
        """The MODEL's load device, where ComfyUI's model management places it while a phase runs
        (ComfyUI owns it: this backbone takes no offload policy)."""
        return self.experts["transformer"].load_device

    @property
    def denoiser(self) -> torch.nn.Module:
        return torch.nn.ModuleDict({name: patcher.model.diffusion_model for name, patcher in self.experts.items()})

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: patcher.model for name, patcher in self.experts.items()}

    def set_offload(self, policy: str, device=None) -> None:
        raise AnyV2VError("a ComfyUI MODEL is placed by ComfyUI's model management; it takes no AnyV2V offload policy")

    def row_blocks(self) -> list[torch.nn.Module]:
        return [block for patcher in self.experts.values() for block in patcher.model.diffusion_model.blocks]

    # video-frame windows as latent-frame windows: the VAE's (checked) temporal stride is Wan's
    latent_windows = WanBackbone.latent_windows

    def expert_for(self, sigma: float):
        if self.boundary is None or sigma >= self.boundary:
            return self.experts["transformer"]
        return self.experts["transformer_2"]

    # ------------------------------------------------------------------------------------------ ComfyUI's protocol

    @contextmanager
    def running(self, *, rows: int, frames: int, size_wh: tuple[int, int]) -> Iterator["ComfyWanBackbone"]:
        """One node's model work on `rows` batch rows of `frames` video frames (per model call) at
        `size_wh`. Each expert is loaded when it first predicts (after the node's VAE work), sized
        for this phase's rows, and runs between its `pre_run` and `cleanup`; the last one is
        cleaned up when the block ends, also on an error or a cancel."""
        width, height = size_wh
        rows_at_once = 1 if self.one_row_at_a_time else rows
        self.phase_shape = [rows_at_once, self.latent_channels, (frames - 1) // self.temporal_stride + 1,
                            height // self.vae_scale_factor, width // self.vae_scale_factor]
        try:
            yield self
        finally:
            self.phase_shape = None
            self.leave_expert()

    def use_expert(self, patcher) -> None:
        """Make `patcher` the running expert, as ComfyUI's sampler starts a run: its options with its
        wrappers and callbacks, `load_models_gpu` for the phase's batch, then `pre_run`."""
        if patcher is self.active_expert:
            return
        if self.phase_shape is None:
            raise AnyV2VError("the native Wan backbone predicts inside `running(...)`, which loads its MODEL")
        self.leave_expert()
        options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
        comfy.sampler_helpers.prepare_model_patcher(patcher, {}, options)
        memory = patcher.model.memory_required(self.phase_shape)
        comfy.model_management.load_models_gpu([patcher], memory_required=memory, minimum_memory_required=memory)
        patcher.pre_run()
        self.active_expert, self.run_options = patcher, options

    def leave_expert(self) -> None:
        if self.active_expert is not None:
            patcher, self.active_expert, self.run_options = self.active_expert, None, None
            patcher.cleanup()

    # ------------------------------------------------------------------------------------------ conditioning

    def condition(self, first_frame, prompt, *, num_frames, fps, unconditional=False):
        raise AnyV2VError("the native Wan backbone is conditioned with ComfyUI CONDITIONING (rows_for), not prompt text")

    def rows_for(self, first_frame: torch.Tensor, positive: list, negative: list | None = None, *, num_frames: int,
                 clip_vision_output=None) -> list[ComfyWanRow]:
        """[positive row], or [negative row, positive row], all with the first frame [1, H, W, 3] as
        their image condition (and `clip_vision_output` for Wan 2.1), through the MODEL's own
        `extra_conds`."""
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
        return [ComfyWanRow(**self.model_conds(conditioning, values, noise), cond_or_uncond=label)
                for conditioning, label in labelled(positive, negative)]

    def model_conds(self, conditioning: list, values: dict, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors ComfyUI's sampler would pass to `apply_model` for this CONDITIONING (first entry)."""
        text, options = first_entry(conditioning)
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
        return self.experts["transformer"].model.process_latent_in(latents).to(self.device, torch.float32)

    def predict(self, latents: torch.Tensor, timestep: float, rows: Sequence[ComfyWanRow]) -> torch.Tensor:
        """Velocity [B, C, F', h, w] at sigma `timestep`, from the MODEL's denoised prediction."""
        conds = {key: torch.cat([pad_tokens(getattr(row, key), rows, key) for row in rows])
                 for key in ("c_crossattn", "c_concat", "clip_fea") if getattr(rows[0], key, None) is not None}
        return self.velocity(latents, timestep, conds, [row.cond_or_uncond for row in rows])

    def velocity(self, x: torch.Tensor, sigma: float, conds: dict[str, torch.Tensor], labels: list[int]) -> torch.Tensor:
        """(x - denoised) / sigma on the MODEL's device, as ComfyUI's Euler sampler derives its step;
        at sigma 0 (the first inversion step) the denoised latent is x itself, so the network's raw
        velocity is read. `labels`: each row's `cond_or_uncond`."""
        patcher = self.expert_for(sigma)
        self.use_expert(patcher)
        base, device, options = patcher.model, patcher.load_device, self.run_options
        x = x.to(device)
        sigmas = torch.full((x.shape[0],), sigma, device=device)
        transformer_options = {**options["transformer_options"], "sigmas": sigmas, "cond_or_uncond": labels}
        conds = {key: value.to(device) for key, value in conds.items()}
        raw = []
        handle = base.diffusion_model.register_forward_hook(lambda module, args, output: raw.append(output))
        try:
            if "model_function_wrapper" in options:
                denoised = options["model_function_wrapper"](base.apply_model, {
                    "input": x, "timestep": sigmas, "c": {**conds, "transformer_options": transformer_options},
                    "cond_or_uncond": labels})
            else:
                denoised = base.apply_model(x, sigmas, transformer_options=transformer_options, **conds)
        finally:
            handle.remove()
        if sigma == 0:
            return raw[-1].to(torch.float32)
        return ((x - denoised) / sigma).to(torch.float32)

    def decode(self, latents: torch.Tensor, chunk_size: int = 1, progress=None) -> torch.Tensor:
        samples = self.experts["transformer"].model.process_latent_out(latents)
        frames = self.vae.decode(samples)
        if progress is not None:
            progress(frames.shape[-4], frames.shape[-4])
        return frames.reshape(-1, *frames.shape[-3:]).to("cpu", torch.float32)

    def latent_output(self, latents: torch.Tensor) -> dict:
        """A LATENT for core nodes (VAEDecode): the VAE's latent space, where ComfyUI's samplers leave theirs."""
        samples = self.experts["transformer"].model.process_latent_out(latents)
        return {"samples": samples.to(comfy.model_management.intermediate_device())}


class ComfyWanTI2VBackbone(ComfyWanBackbone):
    """Wan 2.2 TI2V 5B: the first frame's latent rides along clean as latent frame 0 (timestep 0)."""

    conditioning_frames = 1

    def rows_for(self, first_frame: torch.Tensor, positive: list, negative: list | None = None, *, num_frames: int,
                 clip_vision_output=None) -> list[ComfyWanTI2VRow]:
        first = self.encode_video(first_frame).cpu()  # rows are kept with the inversion: off the device
        follows_first_frame = torch.zeros(1, 1, (num_frames - 1) // self.temporal_stride, 1, 1, dtype=torch.bool)
        follows_first_frame[:, :, 0] = True
        return [ComfyWanTI2VRow(c_crossattn=first_entry(conditioning)[0].to(torch.float32), first_frame_latents=first,
                                follows_first_frame=follows_first_frame, cond_or_uncond=label)
                for conditioning, label in labelled(positive, negative)]

    def predict(self, latents: torch.Tensor, timestep: float, rows: Sequence[ComfyWanTI2VRow]) -> torch.Tensor:
        """Velocity of generated latent frames [B, C, W, h, w] (all, or one temporal window); the clean
        first frame goes in front of the window that starts the video."""
        clean_frames = 1 if bool(rows[0].follows_first_frame[0, 0, 0]) else 0
        x = latents
        if clean_frames:
            x = torch.cat([torch.cat([row.first_frame_latents for row in rows]).to(latents), latents], dim=2)
        denoise_mask = torch.ones(x.shape[0], 1, *x.shape[2:])
        denoise_mask[:, :, :clean_frames] = 0  # the known first frame: per-frame timestep 0 (WAN22.process_timestep)
        conds = {"c_crossattn": torch.cat([pad_tokens(row.c_crossattn, rows, "c_crossattn") for row in rows]),
                 "denoise_mask": denoise_mask}
        return self.velocity(x, timestep, conds, [row.cond_or_uncond for row in rows])[:, :, clean_frames:]

    def video_latents(self, latents: torch.Tensor, row: ComfyWanTI2VRow) -> torch.Tensor:
        return torch.cat([row.first_frame_latents.to(latents), latents], dim=2)


def native_wan_backbone(model, vae, *, model_low_noise=None, boundary: float = 0.9,
                        attention_blocks: str = "all") -> ComfyWanBackbone:
    """The backbone for a Wan MODEL (+ the low-noise expert of Wan 2.2 A14B) and its VAE; every
    refusal comes here, before any encoding."""
    kind = model_kind(model)
    if kind == "wan2.2-i2v-a14b" and model_low_noise is None:
        raise AnyV2VError("model_low_noise: this is Wan 2.2 I2V A14B, which denoises with two experts; connect its "
                          "low-noise model (wan2.2_i2v_low_noise_14B_*.safetensors, Load Diffusion Model) to "
                          "model_low_noise, and the high-noise one to model")
    if model_low_noise is not None and kind != "wan2.2-i2v-a14b":
        raise AnyV2VError(f"model_low_noise: only Wan 2.2 I2V A14B has a low-noise expert; this model is {kind}: "
                          "disconnect model_low_noise")
    if model_low_noise is not None and model_kind(model_low_noise) != kind:
        raise AnyV2VError("model_low_noise: the two experts must be the same kind of Wan model (Wan 2.2 I2V A14B's "
                          "high-noise and low-noise files)")
    check_patches("model", model)
    if model_low_noise is not None:
        check_patches("model_low_noise", model_low_noise)
    check_vae(kind, model, vae)
    backbone_class = ComfyWanTI2VBackbone if kind == "wan2.2-ti2v" else ComfyWanBackbone
    return backbone_class(kind, model, vae, model_low_noise=model_low_noise, boundary=boundary,
                          attention_blocks=attention_blocks)


def labelled(positive: list, negative: list | None) -> list[tuple[list, int]]:
    """(CONDITIONING, cond_or_uncond label) per row: the negative row first, as the engine batches them."""
    return ([(negative, UNCOND)] if negative is not None else []) + [(positive, COND)]


def first_entry(conditioning: list) -> tuple[torch.Tensor, dict]:
    if not conditioning:
        raise AnyV2VError("conditioning is empty; connect the output of CLIPTextEncode")
    return conditioning[0]


def pad_tokens(tensor: torch.Tensor, rows: Sequence, key: str) -> torch.Tensor:
    """Text embeddings zero-padded to the longest row's token count, so rows batch (Wan's text
    encoder already zeroes the tokens after a prompt's own, up to its 512)."""
    if key != "c_crossattn":
        return tensor
    longest = max(getattr(row, key).shape[1] for row in rows)
    return torch.nn.functional.pad(tensor, (0, 0, 0, longest - tensor.shape[1]))
