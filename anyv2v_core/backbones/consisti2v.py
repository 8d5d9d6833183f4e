"""ConsistI2V (TIGER-Lab/ConsistI2V) as an AnyV2V backbone.

The model folder is the diffusers-style `TIGER-Lab/ConsistI2V` layout: `unet/` (ConsistI2V's own
UNet, ported in `consisti2v_unet.py`), `vae/` (AutoencoderKL), `text_encoder/` (CLIPTextModel),
`tokenizer/` (CLIPTokenizer) and `scheduler/` (DDIM). Conditioning, as the reference does it:
- first frame: the clean VAE latent of the first frame, frame 0 on the UNet's frame axis;
- text: CLIP `last_hidden_state` (after the final layer norm) of the prompt padded to 77 tokens;
- frame stride 3 (frames skipped between sampled frames), embedded like a timestep.

The first frame is conditioning, not generated: the sampling state (inverted and sampled
latents) holds frames 1..F-1 only (`conditioning_frames = 1`), and the edit's output latents are
the edited first frame's latent followed by the sampled frames.

Reference quirk reproduced by default (AnyV2V `consisti2v/pipeline_video_editing.py`,
`sample_with_pnp`): the source branch of the injected sampling is conditioned on the *edited*
first frame, not the source one (it reads the source frame, then appends the edited one).
`source_branch_first_frame="source"` selects the corrected variant.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..diffusion_schedule import DiffusionSchedule
from ..memory import ActivationProfile
from .base import Backbone, BackboneDefaults, InjectionLayers, RowCondition
from .checkpoints import load_state_dict_file
from .consisti2v_unet import ConsistI2VUNet, ConsistI2VUNetConfig
from .folders import PICKLE_SUFFIXES
from .rotary import cast_keeping_rotary_float32
from .vae_frames import FirstFrameLatent, decode_latents, encode_frames

logger = logging.getLogger("AnyV2V")

NEGATIVE_PROMPT = (
    "Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, disfigured, "
    "disconnected limbs, Ugly faces, incomplete arms"
)

# AnyV2V's consisti2v/configs/pipeline_256: 256x256 is the resolution ConsistI2V was trained at.
DEFAULTS = BackboneDefaults(
    size_wh=(256, 256),
    num_frames=16,
    fps=8,  # unused by ConsistI2V (it is conditioned on the frame stride); kept for the common interface
    inversion_steps=500,
    sampling_steps=50,
    cfg=35.0,  # cfg_txt; the image guidance cfg_img is 1 (off), so the rows are [source, uncond, cond]
    start_index=4,  # sampling starts from the inverted latent at t=901
    negative_prompt=NEGATIVE_PROMPT,
)
FRAME_STRIDE = 3

# The paper's places, as in the reference's pnp_utils: the residual conv of the second resnet of
# the second decoder block, and the self-attention of the decoder transformers after the first
# one of that block (8 spatial, and the 8 temporal ones at the same places).
_DECODER_PLACES = ((1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2))
INJECTION_LAYERS = InjectionLayers(
    conv=("up_blocks.1.resnets.1.conv2",),
    spatial_attention=tuple(f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn1" for b, i in _DECODER_PLACES),
    temporal_attention=tuple(f"up_blocks.{b}.tempo_attns.{i}.transformer_blocks.0.attn1" for b, i in _DECODER_PLACES),
)

# The official scheduler_config.json could not be read when this port was written; these are
# ConsistI2V's own noise_scheduler_kwargs (configs/inference/inference.yaml), used only when a
# folder has no scheduler config.
FALLBACK_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}
# Likewise for unet/config.json: SD-2.1-base's UNet plus ConsistI2V's unet_additional_kwargs,
# which are the defaults of ConsistI2VUNetConfig.
FALLBACK_UNET_CONFIG = ConsistI2VUNetConfig()

UNET_WEIGHT_STEM = "diffusion_pytorch_model"
SOURCE_BRANCH_FIRST_FRAMES = ("edited", "source")


@dataclass
class ConsistI2VRow(RowCondition):
    text_embeddings: torch.Tensor  # [1, 77, D] float32, CPU
    first_frame_latents: torch.Tensor  # [1, C, 1, h, w] float32, CPU: clean first-frame latent


class ConsistI2VBackbone(Backbone):
    name = "consisti2v"
    defaults = DEFAULTS
    injection_layers = INJECTION_LAYERS
    activation_profile = ActivationProfile(unet=8675, vae=768)  # benchmarks/memory_table.py, docs/memory.md
    conditioning_frames = 1  # the first frame is a condition; latents hold frames 1..F-1

    def __init__(self, *, unet: ConsistI2VUNet, vae, text_encoder, tokenizer, scheduler_config: dict,
                 device: torch.device, dtype: torch.dtype, source_branch_first_frame: str = "edited") -> None:
        if source_branch_first_frame not in SOURCE_BRANCH_FIRST_FRAMES:
            raise ValueError(f"source_branch_first_frame must be one of {SOURCE_BRANCH_FIRST_FRAMES}, "
                             f"got {source_branch_first_frame!r}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule = DiffusionSchedule.from_scheduler_config(scheduler_config)
        self.scheduler_config = dict(scheduler_config)
        self.frame_stride = FRAME_STRIDE
        self.source_branch_first_frame = source_branch_first_frame
        self.vae_scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.initial_device, self.dtype = torch.device(device), dtype
        self._text_cache: dict[str, torch.Tensor] = {}
        self._first_frame_latent = FirstFrameLatent()

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", allow_pickle: bool = False,
                    source_branch_first_frame: str = "edited") -> "ConsistI2VBackbone":
        """Load a `TIGER-Lab/ConsistI2V`-layout folder (or the tiny oracle model) in eval mode.

        A repo id is resolved to a folder by `loading.load_backbone`. `source_branch_first_frame`:
        "edited" reproduces the reference (see the module docstring), "source" is the corrected variant.
        """
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        missing = [f"{name}/" for name in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / name).is_dir()]
        if missing:
            raise ModelLoadError(f"{folder} is not a ConsistI2V model folder: {', '.join(missing)} missing; "
                                 "download the whole TIGER-Lab/ConsistI2V repository")
        unet = load_unet(folder / "unet", dtype=dtype, allow_pickle=allow_pickle)
        use_safetensors = not allow_pickle
        try:
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype,
                                                use_safetensors=use_safetensors or None)
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype,
                                                         use_safetensors=use_safetensors or None)
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not load the VAE / text encoder / tokenizer of {folder}: {error}") from error
        backbone = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       scheduler_config=read_scheduler_config(folder), device=device, dtype=dtype,
                       source_branch_first_frame=source_branch_first_frame)
        for module in backbone.modules().values():
            module.eval().requires_grad_(False)
        return backbone.to(device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    # ------------------------------------------------------------------------------------------ conditioning

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, 77, D] CLIP last_hidden_state; cached per prompt."""
        if prompt not in self._text_cache:
            ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(self.device)).last_hidden_state
            self._text_cache[prompt] = hidden.to("cpu", torch.float32)
        return self._text_cache[prompt]

    @torch.inference_mode()
    def condition(self, first_frame: torch.Tensor, prompt: str, *, num_frames: int, fps: int,
                  unconditional: bool = False) -> ConsistI2VRow:
        # ConsistI2V's negative row keeps the first frame (cfg_img = 1 in AnyV2V): `unconditional`
        # only changes the prompt, which the caller already chose; fps does not apply.
        return ConsistI2VRow(text_embeddings=self.encode_prompt(prompt),
                             first_frame_latents=self._first_frame_latent.get(first_frame, self.encode_video))

    def source_row_for_edit(self, source: ConsistI2VRow, edit: ConsistI2VRow) -> ConsistI2VRow:
        # Reference quirk (AnyV2V sample_with_pnp): the source branch is conditioned on the edited
        # first frame; its prompt stays the inversion prompt.
        if self.source_branch_first_frame == "edited":
            return replace(source, first_frame_latents=edit.first_frame_latents)
        return source

    def video_latents(self, latents: torch.Tensor, row: ConsistI2VRow) -> torch.Tensor:
        """The whole video [1, C, F, h, w]: the row's first-frame latent, then the sampled frames
        (the reference decodes the edited first frame's latent as frame 0)."""
        return torch.cat([row.first_frame_latents.to(latents), latents], dim=2)

    # ------------------------------------------------------------------------------------------ networks

    def encode_video(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [1, C, F, h, w] of all frames [F, H, W, 3] (frame 0 included), one frame at a
        time as the reference does."""
        return encode_frames(self.vae, frames, scaling_factor=self.vae_scaling_factor, device=self.device,
                             generator=generator)

    @torch.inference_mode()
    def predict(self, latents: torch.Tensor, timestep: int, rows: Sequence[ConsistI2VRow]) -> torch.Tensor:
        """Noise [B, C, F-1, h, w] for the generated frames [B, C, F-1, h, w], row b conditioned on
        rows[b]'s first-frame latent and text."""
        on_device = self.offloader.rows_on_device  # built once per set of rows (and window), not every step
        text = on_device([row.text_embeddings for row in rows], self.dtype)
        first_frames = on_device([row.first_frame_latents for row in rows], self.dtype)
        output = self.unet(latents.to(self.device, self.dtype), timestep, text, first_frames, self.frame_stride)
        return output.to(torch.float32)

    def decode(self, latents: torch.Tensor, chunk_size: int = 1, progress=None) -> torch.Tensor:
        """Frames [F, H, W, 3] from the latents of the whole video [1, C, F, h, w]."""
        return decode_latents(self.vae, latents, scaling_factor=self.vae_scaling_factor, device=self.device,
                              chunk_size=chunk_size, progress=progress)


def read_scheduler_config(folder: Path) -> dict:
    """The folder's scheduler/scheduler_config.json, or ConsistI2V's own settings with a warning."""
    path = folder / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return _read_json(path)
    logger.warning("%s is missing; using ConsistI2V's DDIM settings (linear betas 0.00085-0.012, epsilon, "
                   "steps_offset 1, leading spacing)", path)
    return dict(FALLBACK_SCHEDULER_CONFIG)


def read_unet_config(unet_folder: Path) -> ConsistI2VUNetConfig:
    """unet/config.json, or the inferred real config (SD-2.1-base + ConsistI2V options) with a warning."""
    path = unet_folder / "config.json"
    if path.is_file():
        return ConsistI2VUNetConfig.from_dict(_read_json(path))
    logger.warning("%s is missing; using the inferred ConsistI2V UNet config (SD-2.1-base widths, 16 frames)", path)
    return FALLBACK_UNET_CONFIG


def find_unet_weights(unet_folder: Path) -> Path:
    """The UNet weight file: safetensors preferred, else a pickle (.bin/.pt/...)."""
    candidates = [unet_folder / f"{UNET_WEIGHT_STEM}.safetensors"]
    candidates += [unet_folder / f"{UNET_WEIGHT_STEM}{suffix}" for suffix in PICKLE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise ModelLoadError(f"{unet_folder} has no {UNET_WEIGHT_STEM}.safetensors (nor a .bin/.pt pickle); "
                         "download unet/ from TIGER-Lab/ConsistI2V again")


def load_unet(unet_folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              allow_pickle: bool = False) -> ConsistI2VUNet:
    """Build the UNet from its config and load its weights strictly by name (eval mode).

    Pickles are read only with allow_pickle, and then with torch.load(weights_only=True); convert
    them once with `checkpoints.convert_checkpoint_to_safetensors`.
    """
    unet_folder = Path(unet_folder)
    config = read_unet_config(unet_folder)
    state_dict = load_state_dict_file(find_unet_weights(unet_folder), allow_pickle=allow_pickle)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        # ConsistI2V's training checkpoints are saved from a DistributedDataParallel wrapper.
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    with torch.device("meta"):
        unet = ConsistI2VUNet(config)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        details = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
                   (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong)) if v]
        raise ModelLoadError(f"the UNet weights in {unet_folder} do not fit its config: {'; '.join(details)}. "
                             "Is this a ConsistI2V checkpoint with its own unet/config.json?")
    unet.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict  # cast tensor by tensor below: the file's precision is never held twice
    return cast_keeping_rotary_float32(unet, dtype).eval().requires_grad_(False)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); download it again") from None
