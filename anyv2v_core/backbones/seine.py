"""SEINE (Vchitect/SEINE) as an AnyV2V backbone.

SEINE is Stable Diffusion 1.4 made into a video model: its UNet (`seine_unet.py`) comes from the
single checkpoint `seine.pt` (the `"ema"` entry), and the VAE, CLIP text encoder, tokenizer and
scheduler config from a diffusers-format SD-1.4 folder. Conditioning on the first frame is by
inpainting: the UNet input is `cat([x_t, mask, masked-video latent])`, where the mask is 0 on
frame 0 and 1 elsewhere, and the masked video is frame 0 followed by F-1 mid-grey frames (0 in
[-1, 1]), each through the VAE. The model predicts noise under linear betas 1e-4..0.02.

AnyV2V's reference edits with DDPM sampling (`sampler = "ddpm"`); see `sampling.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..diffusion_schedule import DiffusionSchedule
from ..memory import ActivationProfile
from .base import Backbone, BackboneDefaults, RowCondition
from .checkpoints import is_safetensors_file, load_state_dict_file
from .folders import check_components
from .seine_unet import DEFAULT_INJECTION_LAYERS, SeineUNet3D, SeineUNetConfig
from .rotary import cast_keeping_rotary_float32
from .vae_frames import FirstFrameLatent, decode_latents, encode_frames

DEFAULTS = BackboneDefaults(
    size_wh=(512, 512),
    num_frames=16,
    fps=8,  # SEINE has no fps input; kept for the video files
    inversion_steps=500,
    sampling_steps=50,
    cfg=4.0,
    start_index=0,
    negative_prompt="",
)

# SEINE was trained with these betas, not SD's scaled_linear ones; the rest of SD-1.4's scheduler
# config (steps_offset 1, set_alpha_to_one False) still applies.
SCHEDULE_OVERRIDES = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}

CHECKPOINT_ENTRY = "ema"  # seine.pt is {"ema": state_dict, ...}; the EMA weights are the model
SD_COMPONENTS = {"vae": "diffusion_pytorch_model", "text_encoder": "model", "tokenizer": None, "scheduler": None}


@dataclass
class SeineRow(RowCondition):
    frame_fields: ClassVar[tuple[str, ...]] = ("mask", "masked_latents")
    text_embeddings: torch.Tensor  # [1, 77, D]
    mask: torch.Tensor  # [1, 1, F, h, w]: 0 on the given first frame, 1 on the frames to generate
    masked_latents: torch.Tensor  # [1, C, F, h, w]: latents of [first frame, grey, ..., grey]


class SeineBackbone(Backbone):
    name = "seine"
    defaults = DEFAULTS
    injection_layers = DEFAULT_INJECTION_LAYERS
    activation_profile = ActivationProfile(unet=8070, vae=768)  # benchmarks/memory_table.py, docs/memory.md
    sampler = "ddpm"  # the reference's edit sampler; "ddim" is the deterministic alternative
    start_timestep = 997  # the reference saves inverted latents every 4th step and edits from the noisiest

    def __init__(self, *, unet: SeineUNet3D, vae, text_encoder, tokenizer, scheduler_config: dict,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule = DiffusionSchedule.from_scheduler_config(scheduler_config, **SCHEDULE_OVERRIDES)
        self.vae_scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.initial_device, self.dtype = torch.device(device), dtype
        self._text_cache: dict[str, torch.Tensor] = {}
        self._grey_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._first_frame_latent = FirstFrameLatent()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device: torch.device | str) -> "SeineBackbone":
        self._grey_cache.clear()
        return super().to(device)

    # ------------------------------------------------------------------------------------------ conditioning

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, 77, D] CLIP last hidden state (after the final layer norm), cached per prompt."""
        if prompt not in self._text_cache:
            ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(self.device))[0]
            self._text_cache[prompt] = hidden.to("cpu", torch.float32)
        return self._text_cache[prompt]

    def grey_latent(self, height: int, width: int) -> torch.Tensor:
        """[1, C, 1, h, w] latent of a mid-grey frame: the masked-out frames of the masked video."""
        if (height, width) not in self._grey_cache:
            grey = torch.full((1, height, width, 3), 0.5)
            self._grey_cache[(height, width)] = self.encode_video(grey).cpu()
        return self._grey_cache[(height, width)]

    @torch.inference_mode()
    def condition(self, first_frame: torch.Tensor, prompt: str, *, num_frames: int, fps: int,
                  unconditional: bool = False) -> SeineRow:
        # The negative row keeps the first frame too (the reference feeds it the same masked video).
        height, width = first_frame.shape[1:3]
        first = self._first_frame_latent.get(first_frame, self.encode_video)  # [1, C, 1, h, w]
        # every grey frame encodes to the same latent, so it is encoded once
        masked = torch.cat([first, self.grey_latent(height, width).expand(-1, -1, num_frames - 1, -1, -1)], dim=2)
        mask = torch.ones(1, 1, *masked.shape[2:])
        mask[:, :, 0] = 0
        return SeineRow(text_embeddings=self.encode_prompt(prompt), mask=mask, masked_latents=masked)

    # ------------------------------------------------------------------------------------------ networks

    def encode_video(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_frames(self.vae, frames, scaling_factor=self.vae_scaling_factor, device=self.device,
                             generator=generator)

    @torch.inference_mode()
    def predict(self, latents: torch.Tensor, timestep: int, rows: Sequence[SeineRow]) -> torch.Tensor:
        on_device = self.offloader.rows_on_device  # built once per set of rows (and window), not every step
        mask = on_device([row.mask for row in rows], self.dtype)
        masked_latents = on_device([row.masked_latents for row in rows], self.dtype)
        sample = torch.cat([latents.to(self.device, self.dtype), mask, masked_latents], dim=1)  # [B, 4 + 1 + 4, F, h, w]
        text = on_device([row.text_embeddings for row in rows], self.dtype)
        output = self.unet(sample, int(timestep), text)
        return output.to(torch.float32)

    def decode(self, latents: torch.Tensor, chunk_size: int = 1, progress=None) -> torch.Tensor:
        return decode_latents(self.vae, latents, scaling_factor=self.vae_scaling_factor, device=self.device,
                              chunk_size=chunk_size, progress=progress)


# ---------------------------------------------------------------------------------------------- loading


def load_seine_unet(config: SeineUNetConfig, checkpoint: str | os.PathLike, *, dtype: torch.dtype,
                    allow_pickle: bool) -> SeineUNet3D:
    """The SEINE UNet with the weights of `checkpoint` (seine.pt's "ema" entry, or a converted
    safetensors file), in eval mode. The model is built on the meta device and takes the loaded
    tensors, so no time or memory goes into a random initialisation."""
    checkpoint = Path(checkpoint)
    entry = None if checkpoint.is_file() and is_safetensors_file(checkpoint) else CHECKPOINT_ENTRY
    state = load_state_dict_file(checkpoint, allow_pickle=allow_pickle, entry=entry)
    with torch.device("meta"):
        unet = SeineUNet3D(config)
    expected = unet.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        details = [f"{len(found)} {what} (e.g. {found[:3]})" for what, found in
                   (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)) if found]
        raise ModelLoadError(
            f"{checkpoint} does not match the SEINE UNet configured by unet/config.json: {'; '.join(details)}. "
            "Use the official seine.pt (or its safetensors conversion) with the CompVis/stable-diffusion-v1-4 configs"
        )
    unet.load_state_dict(state, strict=True, assign=True)
    del state
    return cast_keeping_rotary_float32(unet, dtype).eval().requires_grad_(False)


def load_seine(sd_folder: str | os.PathLike, checkpoint: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", allow_pickle: bool = False) -> SeineBackbone:
    """SEINE from a diffusers-format SD-1.4 folder and the SEINE checkpoint.

    `checkpoint` is `seine.pt` (a torch pickle, read with weights_only=True and only when
    `allow_pickle`) or its safetensors conversion (`python -m anyv2v_core convert`).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    sd_folder = Path(sd_folder)
    if not (sd_folder / "unet" / "config.json").is_file():
        raise ModelLoadError(f"{sd_folder}/unet/config.json is missing: SEINE takes its UNet layout from the "
                             "Stable Diffusion 1.4 folder (CompVis/stable-diffusion-v1-4)")
    only_safetensors = check_components(sd_folder, SD_COMPONENTS, variant=None, allow_pickle=allow_pickle)
    # None lets diffusers/transformers prefer safetensors per component and fall back to the allowed pickles
    use_safetensors = True if only_safetensors else None
    device = torch.device(device)
    try:
        config = SeineUNetConfig.from_dict(json.loads((sd_folder / "unet" / "config.json").read_text()))
        unet = load_seine_unet(config, checkpoint, dtype=dtype, allow_pickle=allow_pickle)
        vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae", torch_dtype=dtype, use_safetensors=use_safetensors)
        text_encoder = CLIPTextModel.from_pretrained(sd_folder / "text_encoder", dtype=dtype, use_safetensors=use_safetensors)
        tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
        scheduler_config = json.loads((sd_folder / "scheduler" / "scheduler_config.json").read_text())
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load SEINE from {sd_folder} and {checkpoint}: {error}") from error
    backbone = SeineBackbone(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             scheduler_config=scheduler_config, device=device, dtype=dtype)
    for module in backbone.modules().values():
        module.eval().requires_grad_(False)
    return backbone.to(device)
