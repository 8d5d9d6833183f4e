"""One call for a whole AnyV2V edit: prepare -> invert -> injected sampling -> decode.

This is what the CLI, the demo and the tests use; the ComfyUI nodes call the same steps one by
one so ComfyUI can cache the inversion ("invert once, edit many").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .backbones.base import Backbone, BackboneDefaults
from .errors import AnyV2VError
from .injection import InjectionSettings, check_injection_layers
from .inversion import Inversion, Progress, invert_video, start_level
from .sampling import SAMPLERS, check_sampling_settings, sample_edit
from .video import RESIZE_POLICIES, check_frames, check_size, prepare_first_frame, prepare_frames
from .windows import ContextWindows


@dataclass(frozen=True)
class EditSettings:
    """Every knob of an edit; None means the backbone's reference default."""

    negative_prompt: str | None = None
    size_wh: tuple[int, int] | None = None
    resize: str = "stretch"
    num_frames: int | None = None
    fps: int | None = None
    inversion_steps: int | None = None
    steps: int | None = None
    cfg: float | None = None
    start_index: int | None = None
    injection: InjectionSettings = field(default_factory=InjectionSettings)
    decode_chunk_size: int = 1
    windows: ContextWindows | None = None  # temporal context windows for long videos; None: all frames at once
    sampler: str | None = None  # "ddim" (deterministic) or "ddpm"; None: the backbone's reference sampler
    inversion_order: int | None = None  # 1 or 2 (rectified-flow backbones); None: the backbone's default
    seed: int = 0  # seeds the DDPM sampler's noise and, with sample_posterior, the VAE posterior sample
    sample_posterior: bool = False  # the reference samples the VAE posterior; the mean is deterministic

    def __post_init__(self) -> None:
        """Check what can be checked without the model, so bad input fails before any loading."""
        positive = {"steps": self.steps, "inversion steps": self.inversion_steps, "fps": self.fps,
                    "frame count": self.num_frames}
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise AnyV2VError(f"{name} must be an integer >= 1 (got {value!r})")
        if self.cfg is not None and (not isinstance(self.cfg, (int, float)) or not 0 < self.cfg < math.inf):
            raise AnyV2VError(f"cfg must be positive and finite (got {self.cfg!r}); the paper uses 9.0 for I2VGen-XL")
        if self.start_index is not None and self.steps is not None:
            check_sampling_settings(self.steps, self.cfg or 1.0, self.start_index)
        elif self.start_index is not None and (not isinstance(self.start_index, int) or self.start_index < 0):
            raise AnyV2VError(f"start index must be an integer >= 0 (got {self.start_index!r})")
        if self.size_wh is not None:
            check_size(self.size_wh)
        if self.resize not in RESIZE_POLICIES:
            raise AnyV2VError(f"resize policy {self.resize!r} is unknown; use one of {', '.join(RESIZE_POLICIES)}")
        if not isinstance(self.decode_chunk_size, int) or self.decode_chunk_size < 1:
            raise AnyV2VError(f"decode chunk size must be an integer >= 1 (got {self.decode_chunk_size!r})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise AnyV2VError(f"sampler {self.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
        if self.inversion_order not in (None, 1, 2):
            raise AnyV2VError(f"inversion order must be 1 or 2 (got {self.inversion_order!r})")
        if not isinstance(self.injection, InjectionSettings):
            raise AnyV2VError(f"injection must be an InjectionSettings, got {type(self.injection).__name__}")
        if self.windows is not None and not isinstance(self.windows, ContextWindows):
            raise AnyV2VError(f"windows must be a ContextWindows or None, got {type(self.windows).__name__}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise AnyV2VError(f"seed must be in 0..2**64-1 (got {self.seed})")

    def resolved(self, defaults: BackboneDefaults) -> "EditSettings":
        """A copy with every None replaced by the backbone's default, validated as a whole."""
        d = defaults
        settings = replace(
            self,
            negative_prompt=d.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            size_wh=self.size_wh or d.size_wh,
            fps=self.fps or d.fps,
            inversion_steps=self.inversion_steps or d.inversion_steps,
            steps=self.steps or d.sampling_steps,
            cfg=d.cfg if self.cfg is None else self.cfg,
            start_index=d.start_index if self.start_index is None else self.start_index,
            inversion_order=self.inversion_order or d.inversion_order,
        )
        check_sampling_settings(settings.steps, settings.cfg, settings.start_index)
        if settings.sampler is not None and settings.sampler not in d.samplers:
            raise AnyV2VError(f"sampler {settings.sampler!r} does not apply to this model; "
                              + (f"use one of {', '.join(d.samplers)}" if d.samplers else
                                 "it samples with the solver of its inversion order (--inversion-order)"))
        d.spacing.check_inversion_steps(settings.inversion_steps, settings.steps, settings.inversion_order)
        return settings


def clip_frame_count(settings: EditSettings, defaults: BackboneDefaults, name: str, available: int) -> int:
    """How many source frames an edit with resolved `settings` uses (all that the model's frame
    rule admits, unless a count is set), checked with the size against the model's rules."""
    count = settings.num_frames if settings.num_frames is not None else defaults.usable_frame_count(available)
    defaults.check_clip(name, count, settings.size_wh)
    return count


@dataclass
class EditResult:
    frames: torch.Tensor  # [F, H, W, 3] float32 0..1
    latents: torch.Tensor  # [1, C, F, h, w] final denoised latents
    inverted_start: torch.Tensor  # [1, C, F', h, w] the inverted latent sampling started from (F' = F-1 for ConsistI2V)
    fps: int
    inversion: Inversion


def prepare_source(backbone: Backbone, source_frames: torch.Tensor, settings: EditSettings) -> torch.Tensor:
    """The source frames an edit with resolved `settings` reads, at the working size."""
    available = int(check_frames(source_frames, "source frames", min_frames=2).shape[0])
    num_frames = clip_frame_count(settings, backbone.defaults, backbone.name, available)
    return prepare_frames(source_frames, size_wh=settings.size_wh, resize=settings.resize, num_frames=num_frames)


def invert_source(
    backbone: Backbone,
    source_frames: torch.Tensor,
    settings: EditSettings = EditSettings(),
    progress: Progress | None = None,
) -> Inversion:
    """The inversion `edit` starts from: `source_frames` [F, H, W, 3] prepared and inverted with the
    settings' working size, frames, fps, steps, order and windows. Give it to `edit(inversion=...)`
    to edit the same source several times with one inversion."""
    s = settings.resolved(backbone.defaults)
    frames = prepare_source(backbone, source_frames, s)
    generator = torch.Generator(backbone.device).manual_seed(s.seed) if s.sample_posterior else None
    return invert_video(backbone, frames, inversion_steps=s.inversion_steps, sampling_steps=s.steps, fps=s.fps,
                        progress=progress, generator=generator, windows=s.windows, order=s.inversion_order)


def edit(
    backbone: Backbone,
    source_frames: torch.Tensor,
    edited_first_frame: torch.Tensor,
    *,
    prompt: str,
    settings: EditSettings = EditSettings(),
    progress: Progress | None = None,
    inversion: Inversion | None = None,
) -> EditResult:
    """Edit a video: the appearance of `edited_first_frame` with the structure and motion of
    `source_frames` ([F, H, W, 3] and [1, H', W', 3], float 0..1, any size).

    `inversion`: `invert_source(backbone, source_frames, settings)` made earlier, to skip inverting
    again; None inverts here."""
    s = settings.resolved(backbone.defaults)
    check_injection_layers(backbone.denoiser, s.injection.layers or backbone.injection_layers)
    frames = prepare_source(backbone, source_frames, s)
    first_frame = prepare_first_frame(edited_first_frame, size_wh=s.size_wh, resize=s.resize,
                                      source_wh=(int(source_frames.shape[-2]), int(source_frames.shape[-3])))
    if inversion is not None:
        check_inversion_fits(inversion, backbone, s, int(frames.shape[0]))
    inversion_done = s.inversion_steps if inversion is None else 0
    sampling_done = inversion_done + s.steps - s.start_index
    total = sampling_done + frames.shape[0]  # inversion steps, sampling steps, decoded frames

    def phase(offset: int) -> Progress | None:
        return None if progress is None else (lambda done, _: progress(offset + done, total))

    if inversion is None:
        inversion = invert_source(backbone, frames, s, progress=phase(0))  # preparing frames again changes nothing
    latents = sample_edit(backbone, inversion, first_frame, prompt=prompt, negative_prompt=s.negative_prompt,
                          injection=s.injection, cfg=s.cfg, start_index=s.start_index, sampler=s.sampler,
                          seed=s.seed, progress=phase(inversion_done))
    start = inversion.latent_at(start_level(backbone, s.inversion_steps, s.steps, s.start_index, s.inversion_order))
    decoded = backbone.decode(latents, s.decode_chunk_size, progress=phase(sampling_done))
    return EditResult(frames=decoded, latents=latents.cpu(), inverted_start=start, fps=s.fps, inversion=inversion)


def check_inversion_fits(inversion: Inversion, backbone: Backbone, settings: EditSettings, num_frames: int) -> None:
    """Refuse an inversion made with other inversion settings than `settings` (resolved)."""
    made = {"working size": inversion.size_wh, "frame count": inversion.num_frames, "fps": inversion.fps,
            "inversion steps": inversion.inversion_steps, "sampling steps": inversion.sampling_steps,
            "inversion order": inversion.order, "windows": inversion.windows}
    wanted = {"working size": settings.size_wh, "frame count": num_frames, "fps": settings.fps,
              "inversion steps": settings.inversion_steps, "sampling steps": settings.steps,
              "inversion order": settings.inversion_order, "windows": backbone.latent_windows(settings.windows)}
    differ = [f"{name} {made[name]} (asked: {wanted[name]})" for name in made if made[name] != wanted[name]]
    if differ:
        raise AnyV2VError(f"the inversion was made with other settings: {', '.join(differ)}; invert the source "
                          "again with these settings (invert_source)")
