"""I2VGen-XL (ali-vilab/i2vgen-xl) as an AnyV2V backbone.

Only diffusers' `I2VGenXLUNet` and `AutoencoderKL` and transformers' CLIP models are used; the
deprecated `I2VGenXLPipeline` is not. Conditioning is reproduced from the reference:
- text: CLIP text, clip_skip=1 (penultimate hidden state through the final layer norm);
- image embedding: the first frame centre-cropped to a square, bilinear-resized to the CLIP crop
  size, CLIP-normalised; zeros for the unconditional row;
- image latents: the VAE latent of the first frame followed by F-1 constant frames of value
  (i+1)/(F-1) (frame-position channels), concatenated to the sample inside the UNet;
- fps: the target_fps micro-condition.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..diffusion_schedule import DiffusionSchedule
from ..memory import ActivationProfile
from .base import Backbone, BackboneDefaults, InjectionLayers, RowCondition
from .vae_frames import FirstFrameLatent, decode_latents, encode_frames

NEGATIVE_PROMPT = (
    "Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, disfigured, "
    "disconnected limbs, Ugly faces, incomplete arms"
)

DEFAULTS = BackboneDefaults(
    size_wh=(512, 512),
    num_frames=16,
    fps=8,
    inversion_steps=500,
    sampling_steps=50,
    cfg=9.0,
    start_index=0,
    negative_prompt=NEGATIVE_PROMPT,
)

_DECODER_ATTENTIONS = ("1.{kind}.1", "1.{kind}.2", "2.{kind}.0", "2.{kind}.1", "2.{kind}.2",
                       "3.{kind}.0", "3.{kind}.1", "3.{kind}.2")

# The paper's injection points: one decoder resnet's residual conv and the self-attention of the
# 8 decoder transformer blocks after the first up block's first attention.
INJECTION_LAYERS = InjectionLayers(
    conv=("up_blocks.1.resnets.1.conv2",),
    spatial_attention=tuple(f"up_blocks.{p.format(kind='attentions')}.transformer_blocks.0.attn1" for p in _DECODER_ATTENTIONS),
    temporal_attention=tuple(
        f"up_blocks.{p.format(kind='temp_attentions')}.transformer_blocks.0.attn1" for p in _DECODER_ATTENTIONS
    ),
)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "image_encoder", "feature_extractor", "scheduler")


@dataclass
class I2VGenXLRow(RowCondition):
    frame_fields: ClassVar[tuple[str, ...]] = ("image_latents",)
    text_embeddings: torch.Tensor  # [1, 77, D]
    image_embeddings: torch.Tensor  # [1, 1, D']
    image_latents: torch.Tensor  # [1, C, F, h, w]: first-frame latent + frame-position frames
    fps: int


class I2VGenXLBackbone(Backbone):
    name = "i2vgen-xl"
    defaults = DEFAULTS
    injection_layers = INJECTION_LAYERS
    activation_profile = ActivationProfile(unet=10728, vae=768)  # benchmarks/memory_table.py, docs/memory.md

    def __init__(self, *, unet, vae, text_encoder, tokenizer, image_encoder, clip_image_config: dict,
                 scheduler_config: dict, device: torch.device, dtype: torch.dtype) -> None:
        self.unet, self.vae = unet, vae
        self.text_encoder, self.tokenizer, self.image_encoder = text_encoder, tokenizer, image_encoder
        self.schedule = DiffusionSchedule.from_scheduler_config(scheduler_config)
        self.scheduler_config = dict(scheduler_config)
        crop = clip_image_config.get("crop_size", 224)
        self.clip_size_wh = (crop["width"], crop["height"]) if isinstance(crop, dict) else (int(crop), int(crop))
        self.clip_mean = torch.tensor(clip_image_config.get("image_mean", [0.48145466, 0.4578275, 0.40821073]))
        self.clip_std = torch.tensor(clip_image_config.get("image_std", [0.26862954, 0.26130258, 0.27577711]))
        self.vae_scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.initial_device, self.dtype = torch.device(device), dtype
        self._text_cache: dict[str, torch.Tensor] = {}
        self._first_frame_latent = FirstFrameLatent()

    @classmethod
    def from_folder(cls, folder: Path, *, dtype: torch.dtype, device: torch.device, variant: str | None,
                    use_safetensors: bool | None) -> "I2VGenXLBackbone":
        """Load the components of a diffusers-format I2VGen-XL folder (validated by `loading.py`)."""
        from diffusers import AutoencoderKL, I2VGenXLUNet
        from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

        weights = dict(torch_dtype=dtype, variant=variant, use_safetensors=use_safetensors)
        unet = I2VGenXLUNet.from_pretrained(folder, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **weights)
        encoder_weights = dict(dtype=dtype, variant=variant, use_safetensors=use_safetensors)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **encoder_weights)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", **encoder_weights)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        clip_image_config = json.loads((folder / "feature_extractor" / "preprocessor_config.json").read_text())
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        backbone = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       image_encoder=image_encoder, clip_image_config=clip_image_config,
                       scheduler_config=scheduler_config, device=device, dtype=dtype)
        for module in backbone.modules().values():
            module.eval().requires_grad_(False)
        return backbone.to(device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "image_encoder": self.image_encoder}

    # ------------------------------------------------------------------------------------------ conditioning

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, 77, D] clip_skip=1 text embeddings; cached per prompt (the same prompts recur every edit)."""
        if prompt not in self._text_cache:
            ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(self.device), output_hidden_states=True).hidden_states[-2]
            # transformers 5 moved final_layer_norm from `.text_model` onto the model itself
            final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            self._text_cache[prompt] = final_layer_norm(hidden).to("cpu", torch.float32)
        return self._text_cache[prompt]

    def clip_pixels(self, first_frame: torch.Tensor) -> torch.Tensor:
        """CLIP input [1, 3, s, s] from a frame [1, H, W, 3], as the reference prepares it with PIL:
        8-bit image, centre crop to a W x W square (box-resizing first if H < W), bilinear resize."""
        from PIL import Image

        pixels = (first_frame[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        image = Image.fromarray(pixels)
        side = image.width
        scale = min(image.width / side, image.height / side)
        image = image.resize((round(image.width // scale), round(image.height // scale)), resample=Image.BOX)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize(self.clip_size_wh, Image.BILINEAR)
        chw = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return ((chw - self.clip_mean[:, None, None]) / self.clip_std[:, None, None]).unsqueeze(0)

    @torch.inference_mode()
    def encode_first_frame_latents(self, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[1, C, F, h, w] on the CPU: the first frame's latent, then the frame-position frames."""
        latent = self._first_frame_latent.get(first_frame, self.encode_video)  # [1, C, 1, h, w]
        positions = [torch.full_like(latent, (i + 1) / (num_frames - 1)) for i in range(num_frames - 1)]
        return torch.cat([latent, *positions], dim=2)

    @torch.inference_mode()
    def encode_image(self, first_frame: torch.Tensor) -> torch.Tensor:
        """[1, 1, D'] CLIP image embedding of a frame [1, H, W, 3], float32 on the CPU."""
        pixels = self.clip_pixels(first_frame).to(self.device, self.dtype)
        return self.image_encoder(pixels).image_embeds.unsqueeze(1).to("cpu", torch.float32)

    @torch.inference_mode()
    def condition(self, first_frame: torch.Tensor, prompt: str, *, num_frames: int, fps: int,
                  unconditional: bool = False) -> I2VGenXLRow:
        if unconditional:  # the negative row's image embedding is zero: the image encoder need not run
            image_embeddings = torch.zeros(1, 1, self.image_encoder.config.projection_dim)
        else:
            image_embeddings = self.encode_image(first_frame)
        return I2VGenXLRow(
            text_embeddings=self.encode_prompt(prompt),
            image_embeddings=image_embeddings,
            image_latents=self.encode_first_frame_latents(first_frame, num_frames),
            fps=int(fps),
        )

    # ------------------------------------------------------------------------------------------ networks

    def encode_video(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_frames(self.vae, frames, scaling_factor=self.vae_scaling_factor, device=self.device,
                             generator=generator)

    @torch.inference_mode()
    def predict(self, latents: torch.Tensor, timestep: int, rows: Sequence[I2VGenXLRow]) -> torch.Tensor:
        dtype = self.dtype  # not unet.dtype: diffusers walks every submodule to answer it
        on_device = self.offloader.rows_on_device  # built once per set of rows (and window), not every step
        text = on_device([row.text_embeddings for row in rows], dtype)
        image_embeddings = on_device([row.image_embeddings for row in rows], dtype)
        image_latents = on_device([row.image_latents for row in rows], dtype)
        fps = torch.tensor([row.fps for row in rows]).to(self.device, non_blocking=True)
        output = self.unet(latents.to(self.device, dtype), timestep, fps=fps, image_latents=image_latents,
                           image_embeddings=image_embeddings, encoder_hidden_states=text, return_dict=False)[0]
        return output.to(torch.float32)

    def decode(self, latents: torch.Tensor, chunk_size: int = 1, progress=None) -> torch.Tensor:
        return decode_latents(self.vae, latents, scaling_factor=self.vae_scaling_factor, device=self.device,
                              chunk_size=chunk_size, progress=progress)
