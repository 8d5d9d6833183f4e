"""What every image-to-video backbone provides to the AnyV2V algorithm.

Inversion (`inversion.py`), feature injection (`injection.py`) and the injected sampling loop
(`sampling.py`) are written once against this interface. A backbone owns its networks, knows
how to turn a first frame and a prompt into the conditioning of one batch row, and runs its
UNet on a batch of rows.

Layouts: frames are float tensors [F, H, W, 3] in 0..1 (ComfyUI's IMAGE layout); latents are
[B, C, F, h, w] float32 and already multiplied by the VAE scaling factor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..diffusion_schedule import TimestepSpacing
from ..flow_schedule import SigmaSpacing
from ..errors import AnyV2VError
from ..schedule import NoiseSchedule
from ..video import check_size
from ..windows import ContextWindows

if TYPE_CHECKING:
    from ..memory import ActivationProfile
    from ..offload import Offloader


@dataclass(frozen=True)
class InjectionLayers:
    """Module names (as in `unet.named_modules()`) whose outputs the source row overwrites.

    conv: convolutions whose output is the residual branch to inject (a resnet's `conv2`).
    spatial_attention / temporal_attention: self-attention modules with Q and K projections
    (named by `query_key`); their Q and K (never V) are injected.
    attention: the joint space-time self-attention modules of a video transformer.
    """

    conv: tuple[str, ...] = ()
    spatial_attention: tuple[str, ...] = ()
    temporal_attention: tuple[str, ...] = ()
    attention: tuple[str, ...] = ()
    # the Q and K projections inside an attention module: diffusers' names, or ComfyUI's native Wan's ("q", "k")
    query_key: tuple[str, str] = ("to_q", "to_k")

    def all_names(self) -> tuple[str, ...]:
        return self.conv + self.spatial_attention + self.temporal_attention + self.attention


@dataclass(frozen=True)
class BackboneDefaults:
    """The reference's settings for this backbone and the rules its inputs follow; nodes and the
    CLI start from these, and check with them before any model loads."""

    size_wh: tuple[int, int]
    num_frames: int
    fps: int
    inversion_steps: int
    sampling_steps: int
    cfg: float
    start_index: int
    negative_prompt: str
    # the step-count rules of the backbone's noise path, checkable before the model loads
    spacing: TimestepSpacing | SigmaSpacing = TimestepSpacing()
    inversion_order: int = 1
    shift: float | None = None  # sigma shift of a rectified-flow model's schedule (None: not a flow model)
    samplers: tuple[str, ...] = ("ddim", "ddpm")  # named samplers; none for flow models (the order decides)
    size_multiple: int = 8  # width and height are multiples of this (the VAE's stride times the patch size)
    frame_stride: int = 1  # frame counts are frame_stride * k + 1 (a temporally compressing VAE's stride)

    def usable_frame_count(self, available: int) -> int:
        """The most frames of `available` the model takes (all of them unless the frame rule cuts some)."""
        return (available - 1) // self.frame_stride * self.frame_stride + 1

    def check_clip(self, name: str, num_frames: int, size_wh: tuple[int, int]) -> None:
        """Raise AnyV2VError unless `name` takes `num_frames` frames at `size_wh`."""
        check_size(size_wh, self.size_multiple)
        if (num_frames - 1) % self.frame_stride:
            fit = max(self.frame_stride + 1, self.usable_frame_count(num_frames))
            raise AnyV2VError(f"{name} takes {self.frame_stride}k + 1 frames ({self.frame_stride + 1}, "
                              f"{2 * self.frame_stride + 1}, ..., {self.num_frames}), got {num_frames}; use {fit}")


class RowCondition:
    """Conditioning of one batch row (text, first-frame image, masks...). Opaque to the loops;
    each backbone defines its own dataclass subclass and knows how to batch it.

    `frame_fields` names the tensor fields laid out [1, C, F, h, w] along the video's frames;
    temporal windows (`windows.py`) slice them with the latents."""

    frame_fields: ClassVar[tuple[str, ...]] = ()


class Backbone(ABC):
    """An image-to-video model wrapped for AnyV2V."""

    name: str
    schedule: NoiseSchedule
    defaults: BackboneDefaults
    injection_layers: InjectionLayers  # the paper's default injection points for this model
    vae_scale_factor: int  # pixels per latent pixel
    dtype: torch.dtype
    # Places the weights under an offload policy and owns the execution device (`device` reads it);
    # `set_offload` and `to` replace it. None until the first policy.
    offloader: "Offloader | None" = None
    # The device the constructor was given: where the networks run until the first policy places them
    # (every loader ends with `to(device)`; only a backbone built directly runs here unplaced).
    initial_device: torch.device
    # Leading frames of the video that the model takes as a condition and does not generate
    # (ConsistI2V: the first frame). Inverted and sampled latents hold only the other frames;
    # `video_latents` puts the condition frames back in front.
    conditioning_frames: int = 0
    # The reference's edit sampler, sample_edit's default: "ddim" or "ddpm" (SEINE); None where the
    # schedule has no named samplers (rectified flow: the solver order decides).
    sampler: str | None = "ddim"
    # Solver order of inversion and sampling (2: two model calls per step; rectified flow only).
    inversion_order: int = 1
    # Run the rows of a sampling step one at a time through each block (`injection.rows_in_sequence`):
    # a third of the activation memory, a little slower. Backbones whose `row_blocks` are known only.
    one_row_at_a_time: bool = False
    # Sampling from start index 0 starts from the inverted latent at the largest inversion target
    # <= this timestep, when set (SEINE's reference starts from its noisiest saved latent, t=997);
    # None: at the first sampling timestep.
    start_timestep: int | None = None
    # Half precisions in the family's order of preference: dtype "auto" on a GPU takes the first one
    # it runs natively (loading.resolve_dtype; bf16 needs compute capability 8.0).
    half_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    # Peak activation bytes per element of the real architecture (memory.ActivationProfile,
    # measured by benchmarks/memory_table.py): what memory budgets and the `auto` memory mode use;
    # None: not measured (the estimates then count the weights only).
    activation_profile: "ActivationProfile | None" = None

    @abstractmethod
    def condition(
        self,
        first_frame: torch.Tensor,
        prompt: str,
        *,
        num_frames: int,
        fps: int,
        unconditional: bool = False,
    ) -> RowCondition:
        """Conditioning of one row from a first frame [1, H, W, 3] and a prompt.

        `unconditional` marks the negative row of classifier-free guidance, for models whose
        negative row also drops image information (I2VGen-XL zeroes the CLIP image embedding).
        """

    def latent_windows(self, windows: ContextWindows | None) -> ContextWindows | None:
        """Temporal windows counted in video frames, as windows over the latents' frame axis (the
        same for per-frame VAEs; a temporally compressing VAE converts them)."""
        return windows

    @abstractmethod
    def encode_video(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clean latents [1, C, F, h, w] of frames [F, H, W, 3]; the posterior mean unless a
        generator is given, in which case the posterior is sampled with it."""

    @abstractmethod
    def predict(self, latents: torch.Tensor, timestep: int, rows: Sequence[RowCondition]) -> torch.Tensor:
        """UNet output (noise or v, per `schedule.prediction_type`) for latents [B, C, F, h, w]
        at one timestep, row b conditioned on rows[b]. Returns float32 [B, C, F, h, w]."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, chunk_size: int = 1, progress=None) -> torch.Tensor:
        """Frames [F, H, W, 3] float32 in 0..1 on the CPU from latents [1, C, F, h, w],
        decoding `chunk_size` frames at a time; `progress(frames done, frames)` may raise to cancel."""

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts noise or velocity (a UNet, or a diffusion transformer); the
        injection layers are module names inside it. UNet backbones keep it as `self.unet`."""
        return self.unet

    def row_blocks(self) -> list[torch.nn.Module]:
        """The repeated blocks of the denoiser that take the batch's rows as their first axis (a
        transformer's blocks), for running rows one at a time; empty where unsupported (UNets fold
        frames into the batch axis)."""
        return []

    def source_row_for_edit(self, source: RowCondition, edit: RowCondition) -> RowCondition:
        """The source row's conditioning during injected sampling, from the inversion's source row
        and the edit prompt's row. The inversion's own by default; a backbone overrides this to
        reproduce a reference that conditions the source branch otherwise."""
        return source

    def video_latents(self, latents: torch.Tensor, row: RowCondition) -> torch.Tensor:
        """Latents of the whole video [1, C, F, h, w] from sampled latents and the row they were
        sampled with: the same tensor unless `conditioning_frames` > 0."""
        return latents

    @property
    def device(self) -> torch.device:
        """The execution device. Its one owner is the offloader, so that the device the inputs go to
        is always the one the weights are placed on; `to` and `set_offload` change both at once."""
        return self.initial_device if self.offloader is None else self.offloader.device

    @device.setter
    def device(self, device: torch.device | str) -> None:
        raise AttributeError(f"{self.name}'s device is set with its offload policy, which places the weights there: "
                             f"call .to({str(device)!r}) or .set_offload(policy, {str(device)!r})")

    def to(self, device: torch.device | str) -> "Backbone":
        """Move every network to `device`, dropping any offload policy."""
        self.set_offload("none", device)
        return self

    def set_offload(self, policy: str, device: torch.device | str | None = None) -> None:
        """Run on `device` (default: the current execution device) with an offload policy
        ("none", "model", "sequential"; see `offload.py`)."""
        from ..offload import Offloader

        device = self.device if device is None else torch.device(device)
        if self.offloader is not None:
            self.offloader.release()
        self.offloader = Offloader(self.modules(), device, policy)

    @abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """The backbone's networks by component name (unet, vae, text_encoder, ...)."""
