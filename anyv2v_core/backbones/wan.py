"""Wan image-to-video models (Wan 2.1 I2V 14B, Wan 2.2 I2V A14B, Wan 2.2 TI2V 5B) as AnyV2V backbones.

Rectified-flow diffusion transformers (`flow_schedule.py`), run through diffusers'
`WanTransformer3DModel`, `AutoencoderKLWan` and transformers' UMT5 / CLIP vision models; the
conditioning is reproduced here, as diffusers' `WanImageToVideoPipeline` builds it:
- text: UMT5 `last_hidden_state` of the cleaned prompt, 512 tokens, zero after the prompt's own;
- Wan 2.1 I2V: the first frame's CLIP ViT-H penultimate hidden states (257 tokens), and the
  "image condition" concatenated to the noisy latents on the channel axis: a 4-channel mask
  (1 on the first frame) and the VAE latents of [first frame, grey frames...] (36 channels in all);
- Wan 2.2 I2V A14B: the same concatenation, no CLIP; two experts of one shape, `transformer`
  for the noisiest steps (model time >= boundary_ratio * 1000) and `transformer_2` below, in
  inversion and sampling alike;
- Wan 2.2 TI2V 5B: no concatenation; the first frame's latent stays clean as latent frame 0 and
  its tokens get timestep 0 (`expand_timesteps`). That frame is conditioning, not state
  (`conditioning_frames = 1`), as ConsistI2V's first frame is.

Latents are the VAE's normalised latents ((z - mean) / std per channel), [B, C, F', h, w] with
F' = (F - 1) / 4 + 1 latent frames for F = 4k + 1 video frames.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import AnyV2VError, ModelLoadError
from ..flow_schedule import FlowMatchingSchedule, SigmaSpacing
from ..memory import ActivationProfile
from ..windows import ContextWindows
from .base import Backbone, BackboneDefaults, InjectionLayers, RowCondition
from .folders import read_model_index
from .vae_frames import FirstFrameLatent

TEXT_TOKENS = 512  # Wan's text context; its image cross-attention takes every token before the last 512
TEMPORAL_STRIDE = 4  # video frames per latent frame (after the first) of every Wan VAE: the frame rule before loading

# Official settings (Wan-Video repositories' generate.py and configs: size, frames, fps, guidance,
# shift; see the README's Wan section), except the step counts: the official samplers take 40-50
# steps of one model call; AnyV2V inverts and samples with the second-order solver at half that
# many steps, so each phase costs the model calls of one plain generation and the edit twice that
# (benchmarks/flow_round_trip.py: at equal calls order 2 reconstructs several times more exactly).
# The official negative prompt is a long Chinese list; the default here is diffusers' (empty).
def _wan_defaults(size_wh: tuple[int, int], num_frames: int, fps: int, steps: int, cfg: float, shift: float,
                  size_multiple: int) -> BackboneDefaults:
    return BackboneDefaults(size_wh=size_wh, num_frames=num_frames, fps=fps, inversion_steps=steps,
                            sampling_steps=steps, cfg=cfg, start_index=0, negative_prompt="", spacing=SigmaSpacing(),
                            samplers=(), inversion_order=2, shift=shift, size_multiple=size_multiple,
                            frame_stride=TEMPORAL_STRIDE)


WAN21_I2V_DEFAULTS = _wan_defaults((832, 480), 81, 16, steps=20, cfg=5.0, shift=3.0, size_multiple=16)
WAN22_I2V_DEFAULTS = _wan_defaults((1280, 720), 81, 16, steps=20, cfg=3.5, shift=5.0, size_multiple=16)
WAN22_TI2V_DEFAULTS = _wan_defaults((1280, 704), 121, 24, steps=25, cfg=5.0, shift=5.0, size_multiple=32)
# The toy Wan 2.2 TI2V of `anyv2v_core/toy/wan_weights` (its model_index.json says "anyv2v_toy"): its
# world's clips (32x32, 9 frames), the shift it was trained for, no guidance (it was trained on the
# empty prompt alone); the steps are chosen by benchmarks/toy_wan_eval.py (docs/wan.md).
WAN_TOY_DEFAULTS = _wan_defaults((32, 32), 9, 8, steps=10, cfg=1.0, shift=1.0, size_multiple=8)

# Which transformer blocks have their self-attention Q/K injected: all of them by default (a DiT has
# no encoder/decoder hierarchy to pick the UNets' decoder half from; see docs/wan.md for the
# measurements), "early" / "late" the first / second half, or explicit indices.


def attention_block_indices(blocks: str, num_blocks: int) -> tuple[int, ...]:
    """Block indices from "all" / "early" / "late" or a list like "0-9,20,30-39"."""
    text = blocks.strip().lower()
    if text == "all":
        return tuple(range(num_blocks))
    if text == "early":
        return tuple(range(num_blocks // 2))
    if text == "late":
        return tuple(range(num_blocks // 2, num_blocks))
    indices: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            indices.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise AnyV2VError(f"attention blocks {blocks!r} must be all, early, late or indices like 0-9,20") from None
    out_of_range = sorted(i for i in indices if not 0 <= i < num_blocks)
    if not indices or out_of_range:
        raise AnyV2VError(f"attention blocks {blocks!r} must name blocks in 0..{num_blocks - 1} (this model has "
                          f"{num_blocks}); e.g. all, late or 10-29")
    return tuple(sorted(indices))


def injection_layers_for(experts: Sequence[str], blocks: Sequence[int]) -> InjectionLayers:
    """The self-attention modules (`attn1`, with `to_q`/`to_k`) of `blocks` in every expert."""
    return InjectionLayers(attention=tuple(f"{expert}.blocks.{i}.attn1" for expert in experts for i in blocks))


def first_frame_then_grey(first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The video [F, H, W, 3] Wan's image-to-video models encode as their first-frame condition: the
    frame [1, H, W, 3], then mid-grey frames (0 in the VAE's [-1, 1])."""
    video = torch.full((num_frames, *first_frame.shape[1:]), 0.5)
    video[0] = first_frame[0]
    return video


def clean_prompt(prompt: str) -> str:
    """The prompt as Wan's text encoder was trained on it: mojibake fixed (ftfy), HTML entities
    unescaped twice, whitespace collapsed."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class WanRow(RowCondition):
    """Wan 2.1 I2V / 2.2 I2V A14B conditioning of one row."""

    frame_fields: ClassVar[tuple[str, ...]] = ("image_condition",)
    text_embeddings: torch.Tensor  # [1, 512, D] float32, CPU
    image_condition: torch.Tensor  # [1, 4 + C, F', h, w]: first-frame mask, latents of [first frame, grey...]
    image_embeddings: torch.Tensor | None = None  # [1, 257, 1280] CLIP hidden states (Wan 2.1 only)


@dataclass
class WanTI2VRow(RowCondition):
    """Wan 2.2 TI2V conditioning of one row: the first frame rides along as a clean latent frame in
    front of the generated ones, in the first temporal window only (a later window starts mid-video)."""

    frame_fields: ClassVar[tuple[str, ...]] = ("follows_first_frame",)
    text_embeddings: torch.Tensor  # [1, 512, D] float32, CPU
    first_frame_latents: torch.Tensor  # [1, C, 1, h, w] float32, CPU
    # [1, 1, F'-1, 1, 1] bool over the generated latent frames: True on the one right after the first
    # frame; a window whose first frame has it is the video's first window
    follows_first_frame: torch.Tensor


class WanBackbone(Backbone):
    """Wan 2.1 I2V 14B and Wan 2.2 I2V A14B (and, through `WanTI2VBackbone`, TI2V 5B)."""

    sampler = None  # the flow solver of the inversion order
    inversion_order = 2
    half_dtypes = (torch.bfloat16, torch.float16)  # trained in bf16: dtype "auto" takes it where the GPU runs it
    # measured on Wan 2.1 I2V 14B (benchmarks/memory_table.py --wan, docs/memory.md); the A14B experts share
    # its architecture; TI2V 5B's narrower transformer needs less per token (an overestimate there)
    activation_profile = ActivationProfile(unet=14425, vae=3461, held_source_row=2560)

    def __init__(self, *, name: str, defaults: BackboneDefaults, schedule: FlowMatchingSchedule,
                 transformers: dict[str, torch.nn.Module], vae, text_encoder, tokenizer, image_encoder=None,
                 image_processor=None, boundary_ratio: float | None = None,
                 attention_blocks: Sequence[int] | None = None, device: torch.device, dtype: torch.dtype) -> None:
        self.name, self.defaults = name, defaults
        self.transformers = torch.nn.ModuleDict(transformers)  # "transformer" (+ "transformer_2", low noise)
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.image_encoder, self.image_processor = image_encoder, image_processor
        self.schedule = schedule
        self.boundary_time = None if boundary_ratio is None else boundary_ratio * self.schedule.num_train_timesteps
        first = transformers["transformer"].config
        self.patch_hw = tuple(first.patch_size[1:])
        # the VAE's own compression (its diffusers config), checked against the model's rules before any encoding
        self.vae_scale_factor = int(vae.config.scale_factor_spatial)
        self.temporal_stride = int(vae.config.scale_factor_temporal)
        latent_channels = int(vae.config.z_dim)
        if (self.temporal_stride != defaults.frame_stride or latent_channels != first.out_channels
                or self.vae_scale_factor * self.patch_hw[0] != defaults.size_multiple):
            raise ModelLoadError(
                f"this VAE ({latent_channels} latent channels, {self.temporal_stride} frames and {self.vae_scale_factor}x"
                f"{self.vae_scale_factor} pixels per latent) does not fit {name}, which takes {first.out_channels} "
                f"channels, {defaults.frame_stride} frames and {defaults.size_multiple // self.patch_hw[0]}x pixels: "
                "use the VAE of the model's own repository (Wan 2.1's for Wan 2.1 and Wan 2.2 A14B, Wan 2.2's for TI2V 5B)")
        self.latents_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        blocks = range(int(first.num_layers)) if attention_blocks is None else attention_blocks
        self.injection_layers = injection_layers_for(list(transformers), blocks)
        self.initial_device, self.dtype = torch.device(device), dtype
        self._text_cache: dict[str, torch.Tensor] = {}
        # the negative and positive rows share the edited frame: its VAE and CLIP encodings run once
        self._first_frame_latents, self._first_frame_tokens = FirstFrameLatent(), FirstFrameLatent()

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformers

    def modules(self) -> dict[str, torch.nn.Module]:
        components = {**self.transformers, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.image_encoder is not None:
            components["image_encoder"] = self.image_encoder
        return components

    def row_blocks(self) -> list[torch.nn.Module]:
        return [block for transformer in self.transformers.values() for block in transformer.blocks]

    def expert_for(self, time: float) -> torch.nn.Module:
        """The transformer that denoises at model time `time`: the high-noise expert from the boundary up."""
        if self.boundary_time is None or time >= self.boundary_time:
            return self.transformers["transformer"]
        return self.transformers["transformer_2"]

    # ------------------------------------------------------------------------------------------ shapes

    def latent_windows(self, windows: ContextWindows | None) -> ContextWindows | None:
        """Video-frame windows (length 4k + 1, overlap a multiple of 4) as latent-frame windows."""
        if windows is None:
            return None
        stride = self.temporal_stride
        if (windows.length - 1) % stride or windows.overlap % stride:
            raise AnyV2VError(f"Wan windows need a length of {stride}k + 1 frames and an overlap that is a multiple of "
                              f"{stride} (got {windows.length} / {windows.overlap}); e.g. {8 * stride + 1} / {2 * stride}")
        return ContextWindows((windows.length - 1) // stride + 1, windows.overlap // stride)

    # ------------------------------------------------------------------------------------------ conditioning

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, 512, D] UMT5 hidden states of the prompt's tokens, zeros after them; cached per prompt."""
        if prompt not in self._text_cache:
            tokens = self.tokenizer(clean_prompt(prompt), padding="max_length", max_length=TEXT_TOKENS,
                                    truncation=True, add_special_tokens=True, return_attention_mask=True,
                                    return_tensors="pt")
            length = int(tokens.attention_mask.sum())
            hidden = self.text_encoder(tokens.input_ids.to(self.device),
                                       tokens.attention_mask.to(self.device)).last_hidden_state
            embeddings = torch.zeros(1, TEXT_TOKENS, hidden.shape[-1])
            embeddings[:, :length] = hidden[:, :length].to("cpu", torch.float32)
            self._text_cache[prompt] = embeddings
        return self._text_cache[prompt]

    @torch.inference_mode()
    def encode_image(self, first_frame: torch.Tensor) -> torch.Tensor:
        """[1, 257, 1280] penultimate CLIP ViT-H hidden states of a frame [1, H, W, 3]."""
        from PIL import Image

        pixels = (first_frame[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        inputs = self.image_processor(images=Image.fromarray(pixels), return_tensors="pt")
        pixel_values = inputs.pixel_values.to(self.device, self.image_encoder.dtype)
        hidden = self.image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return hidden.to("cpu", torch.float32)

    @torch.inference_mode()
    def condition(self, first_frame: torch.Tensor, prompt: str, *, num_frames: int, fps: int,
                  unconditional: bool = False) -> WanRow:
        # Wan's negative row keeps the image conditioning: only the prompt differs.
        latents = self._first_frame_latents.get(  # [1, C, F', h, w]
            first_frame, lambda frame: self.encode_video(first_frame_then_grey(frame, num_frames)), key=(num_frames,))
        mask = torch.zeros(1, self.temporal_stride, *latents.shape[2:])
        mask[:, :, 0] = 1  # the first latent frame holds one known video frame, repeated over the temporal_stride mask channels
        image_embeddings = None
        if self.image_encoder is not None:
            image_embeddings = self._first_frame_tokens.get(first_frame, self.encode_image)
        return WanRow(text_embeddings=self.encode_prompt(prompt), image_condition=torch.cat([mask, latents], dim=1),
                      image_embeddings=image_embeddings)

    # ------------------------------------------------------------------------------------------ networks

    @torch.inference_mode()
    def encode_video(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents [1, C, F', h, w] of frames [F, H, W, 3] (the whole clip through the causal VAE)."""
        pixels = (frames.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1).to(self.device, self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        latents = (posterior.mean if generator is None else posterior.sample(generator)).to(torch.float32)
        return (latents - self.latents_mean.to(latents.device)) / self.latents_std.to(latents.device)

    @torch.inference_mode()
    def predict(self, latents: torch.Tensor, timestep: float, rows: Sequence[WanRow]) -> torch.Tensor:
        """Velocity [B, C, F', h, w] for latents [B, C, F', h, w] at model time `timestep`."""
        device, dtype = self.device, self.dtype
        sample = torch.cat([latents, torch.cat([row.image_condition for row in rows]).to(latents)], dim=1)
        image = None
        if rows[0].image_embeddings is not None:
            image = torch.cat([row.image_embeddings for row in rows]).to(device, dtype)
        output = self.expert_for(timestep)(
            hidden_states=sample.to(device, dtype),
            timestep=torch.full((len(rows),), timestep, device=device, dtype=torch.float32),
            encoder_hidden_states=torch.cat([row.text_embeddings for row in rows]).to(device, dtype),
            encoder_hidden_states_image=image, return_dict=False)[0]
        return output.to(torch.float32)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, chunk_size: int = 1, progress=None) -> torch.Tensor:
        """Frames [F, H, W, 3] float32 0..1 on the CPU. The causal VAE decodes the whole clip one
        latent frame at a time with its own cache, so `chunk_size` does not apply; `progress` is
        reported (and may cancel) after each latent frame."""
        z = latents.to(self.device, torch.float32)
        z = (z * self.latents_std.to(self.device) + self.latents_mean.to(self.device)).to(self.vae.dtype)
        total = (latents.shape[2] - 1) * self.temporal_stride + 1
        decoded = [0]

        def report(module, args, output) -> None:
            decoded[0] += output.shape[2]
            if progress is not None:
                progress(min(decoded[0], total), total)

        handle = self.vae.decoder.register_forward_hook(report)
        try:
            pixels = self.vae.decode(z, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
        finally:
            handle.remove()
        return (pixels[0].to(torch.float32).permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1).cpu()


class WanTI2VBackbone(WanBackbone):
    """Wan 2.2 TI2V 5B: the first frame's latent kept clean as latent frame 0, with timestep 0 on its tokens."""

    conditioning_frames = 1

    @torch.inference_mode()
    def condition(self, first_frame: torch.Tensor, prompt: str, *, num_frames: int, fps: int,
                  unconditional: bool = False) -> WanTI2VRow:
        follows_first_frame = torch.zeros(1, 1, (num_frames - 1) // self.temporal_stride, 1, 1, dtype=torch.bool)
        follows_first_frame[:, :, 0] = True
        return WanTI2VRow(text_embeddings=self.encode_prompt(prompt),
                          first_frame_latents=self._first_frame_latents.get(first_frame, self.encode_video),
                          follows_first_frame=follows_first_frame)

    @torch.inference_mode()
    def predict(self, latents: torch.Tensor, timestep: float, rows: Sequence[WanTI2VRow]) -> torch.Tensor:
        """Velocity [B, C, W, h, w] of generated latent frames [B, C, W, h, w] (all of them, or one
        temporal window); the clean first frame goes in front of the window that starts the video."""
        device, dtype = self.device, self.dtype
        clean_frames = 1 if bool(rows[0].follows_first_frame[0, 0, 0]) else 0
        sample = latents
        if clean_frames:
            sample = torch.cat([torch.cat([row.first_frame_latents for row in rows]).to(latents), latents], dim=2)
        tokens_hw = (sample.shape[3] // self.patch_hw[0]) * (sample.shape[4] // self.patch_hw[1])
        per_token = torch.full((sample.shape[2], tokens_hw), timestep, dtype=torch.float32)
        per_token[:clean_frames] = 0  # the clean first frame
        output = self.expert_for(timestep)(
            hidden_states=sample.to(device, dtype),
            timestep=per_token.flatten().expand(len(rows), -1).to(device),
            encoder_hidden_states=torch.cat([row.text_embeddings for row in rows]).to(device, dtype),
            return_dict=False)[0]
        return output[:, :, clean_frames:].to(torch.float32)

    def video_latents(self, latents: torch.Tensor, row: WanTI2VRow) -> torch.Tensor:
        return torch.cat([row.first_frame_latents.to(latents), latents], dim=2)


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class WanFolder:
    """What a Wan diffusers folder holds, read from its configs alone (no weights)."""

    kind: str  # "wan2.1-i2v", "wan2.2-i2v-a14b" or "wan2.2-ti2v"
    num_blocks: int
    experts: tuple[str, ...] = field(default=("transformer",))
    boundary_ratio: float | None = None
    image_encoder: bool = False
    toy: bool = False  # the toy Wan this repository ships and measures (`WAN_TOY_DEFAULTS`)

    @property
    def defaults(self) -> BackboneDefaults:
        return WAN_TOY_DEFAULTS if self.toy else WAN_DEFAULTS[self.kind]

    @property
    def components(self) -> dict[str, str | None]:
        """The component folders a Wan folder must hold (`folders.check_components`): its experts and
        the CLIP parts it declares."""
        components: dict[str, str | None] = {name: "diffusion_pytorch_model" for name in self.experts}
        components.update(vae="diffusion_pytorch_model", text_encoder="model", tokenizer=None, scheduler=None)
        if self.image_encoder:
            components.update(image_encoder="model", image_processor=None)
        return components


WAN_DEFAULTS = {"wan2.1-i2v": WAN21_I2V_DEFAULTS, "wan2.2-i2v-a14b": WAN22_I2V_DEFAULTS,
                "wan2.2-ti2v": WAN22_TI2V_DEFAULTS}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; download the whole Wan diffusers repository") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); download it again") from None


def inspect_wan_folder(folder: Path, model_index: dict) -> WanFolder:
    """Which Wan model a folder holds, refusing text-to-video models and incomplete A14B folders."""
    transformer = _read_json(folder / "transformer" / "config.json")
    in_channels, out_channels = int(transformer["in_channels"]), int(transformer.get("out_channels") or 0)
    num_blocks = int(transformer.get("num_layers", 40))
    if model_index.get("expand_timesteps"):
        return WanFolder(kind="wan2.2-ti2v", num_blocks=num_blocks, toy=bool(model_index.get("anyv2v_toy")))
    if in_channels == out_channels:
        raise ModelLoadError(
            f"{folder} holds a Wan text-to-video model ({in_channels} input channels, no first-frame input); AnyV2V "
            "needs an image-to-video one: Wan2.1-I2V-14B-480P/720P, Wan2.2-I2V-A14B or Wan2.2-TI2V-5B (-Diffusers)")
    boundary_ratio = model_index.get("boundary_ratio")
    if boundary_ratio is not None or (model_index.get("transformer_2") or [None])[0] is not None:
        if not (folder / "transformer_2" / "config.json").is_file():
            raise ModelLoadError(f"{folder} is a Wan 2.2 A14B folder but transformer_2/ (the low-noise expert) is "
                                 "missing; download the whole Wan-AI/Wan2.2-I2V-A14B-Diffusers repository")
        if boundary_ratio is None:
            raise ModelLoadError(f"{folder}/model_index.json has two transformers but no boundary_ratio; add "
                                 '"boundary_ratio": 0.9 (Wan 2.2 A14B\'s value)')
        return WanFolder(kind="wan2.2-i2v-a14b", num_blocks=num_blocks, experts=("transformer", "transformer_2"),
                         boundary_ratio=float(boundary_ratio))
    return WanFolder(kind="wan2.1-i2v", num_blocks=num_blocks, image_encoder=transformer.get("image_dim") is not None)


def wan_defaults(folder: Path) -> BackboneDefaults:
    return inspect_wan_folder(folder, read_model_index(folder)).defaults


def load_wan(folder: Path, model_index: dict, *, dtype: torch.dtype, device: torch.device, variant: str | None,
             use_safetensors: bool | None, shift: float | None = None, attention_blocks: str = "all") -> WanBackbone:
    """A Wan backbone from a diffusers folder (validated by its registry entry, `families.py`), in eval mode.

    The VAE runs in float32 whatever `dtype` is (diffusers' advice for Wan's decoder quality; it
    is small). `shift` overrides the model's default sigma shift; `attention_blocks` picks the
    transformer blocks injection hooks (see `attention_block_indices`).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    info = inspect_wan_folder(folder, model_index)
    blocks = attention_block_indices(attention_blocks, info.num_blocks)  # bad options fail before any weight loads
    defaults = info.defaults
    schedule = FlowMatchingSchedule(shift=defaults.shift if shift is None else shift)
    weights = dict(torch_dtype=dtype, variant=variant, use_safetensors=use_safetensors)
    transformers = {name: WanTransformer3DModel.from_pretrained(folder, subfolder=name, **weights)
                    for name in info.experts}
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, variant=variant,
                                           use_safetensors=use_safetensors)
    text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype, variant=variant,
                                                    use_safetensors=use_safetensors)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    image_encoder = image_processor = None
    if info.image_encoder:
        image_encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder", dtype=dtype, variant=variant,
                                                        use_safetensors=use_safetensors)
        image_processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
    backbone_class = WanTI2VBackbone if info.kind == "wan2.2-ti2v" else WanBackbone
    backbone = backbone_class(name=info.kind, defaults=defaults, schedule=schedule, transformers=transformers, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder,
                              image_processor=image_processor, boundary_ratio=info.boundary_ratio,
                              attention_blocks=blocks, device=device, dtype=dtype)
    for module in backbone.modules().values():
        module.eval().requires_grad_(False)
    return backbone.to(device)
