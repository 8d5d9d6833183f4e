"""Planning an edit: every setting resolved and every rule checked once, before any model work.

`plan_edit` turns (backbone, source frames, edited first frame, settings) into an `EditPlan`: the
settings with the backbone's defaults filled in, the frames prepared at the working size, and the
inversion's and the sampling's plans. Each rule is checked here and only here (working size,
frame count, windows, step grids, sampler and order, cfg, seed, injection layers, a cached
inversion's fit); `inversion.run_inversion`, `sampling.run_sampling` and the backbone's decoder
then run the plans without checking again. The CLI checks the settings part before the model
loads (`EditSettings.resolved`, `clip_frame_count`), the nodes plan each phase before it moves a
model to the GPU, and `invert_video` / `sample_edit` plan and run in one call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from .backbones.base import Backbone, BackboneDefaults
from .errors import AnyV2VError
from .injection import InjectionPlan, InjectionSettings, check_injection_layers
from .schedule import InversionStep, Level, SamplingStep
from .video import RESIZE_POLICIES, check_frames, check_size, prepare_first_frame, prepare_frames
from .windows import ContextWindows

logger = logging.getLogger("AnyV2V")

SAMPLERS = ("ddim", "ddpm")  # the named samplers of DDPM-family backbones; flow backbones follow the order

# Frames per model call, as multiples of the backbone's training length: above WARN_FACTOR the
# temporal layers see clips much longer than any they were trained on (quality drops); above
# MAX_FACTOR the call is refused, since no accelerator holds it and the result would be unusable.
WARN_FACTOR, MAX_FACTOR = 2, 8


# ---------------------------------------------------------------------------------------------- rules


def check_sampling_settings(steps: int, cfg: float, start_index: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise AnyV2VError(f"sampling steps must be an integer >= 1 (got {steps!r})")
    if not isinstance(start_index, int) or not 0 <= start_index < steps:
        raise AnyV2VError(f"start index must be in 0..{steps - 1} for {steps} steps (got {start_index!r}); 0 is the paper's value")
    if not isinstance(cfg, (int, float)) or not 0 < cfg < math.inf:
        raise AnyV2VError(f"cfg must be positive and finite (got {cfg!r}); the paper uses 9.0 for I2VGen-XL")


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise AnyV2VError(f"seed must be an integer in 0..2**64-1 (got {seed!r})")


def check_frame_count(backbone: Backbone, num_frames: int, windows: ContextWindows | None) -> None:
    """Refuse (or warn about) more frames per model call than the backbone can handle, naming the windows option."""
    native = backbone.defaults.num_frames
    per_call = num_frames if windows is None else min(num_frames, windows.length)
    if per_call <= WARN_FACTOR * native:
        return
    if windows is None:
        fix = (f"edit the clip in temporal windows of {native} frames (node window_length {native}, CLI --window {native}, "
               f"windows=ContextWindows({native}, 4)) or edit fewer frames")
        what = f"{num_frames} frames at once"
    else:
        fix = f"use windows of {native} frames, the length {backbone.name} was trained on"
        what = f"windows of {windows.length} frames"
    message = f"{what} exceed {{}}x the {native} frames {backbone.name} was trained on; {fix}"
    if per_call > MAX_FACTOR * native:
        raise AnyV2VError(message.format(MAX_FACTOR))
    logger.warning(message.format(WARN_FACTOR) + " (quality drops and memory grows with the frame count)")


def check_edited_first_frame(image: torch.Tensor, size_wh: tuple[int, int]) -> torch.Tensor:
    """The edited first frame [1, H, W, 3] validated against the inversion's working size."""
    image = check_frames(image, "edited first frame")
    image_wh = (int(image.shape[2]), int(image.shape[1]))
    if image.shape[0] != 1 or image_wh != size_wh:
        raise AnyV2VError(
            f"the edited first frame must be one image at the inversion's working size {size_wh[0]}x"
            f"{size_wh[1]}, got {image.shape[0]} image(s) of {image_wh[0]}x{image_wh[1]}; "
            "resize it with video.prepare_first_frame(image, size_wh=inversion.size_wh)"
        )
    return image


def start_level(backbone: Backbone, inversion_steps: int, sampling_steps: int, start_index: int = 0,
                order: int = 1) -> Level:
    """Noise level of the inverted latent that sampling starts from (see `Backbone.start_timestep`)."""
    schedule = backbone.schedule
    first = schedule.sampling_steps(sampling_steps, order=order)[start_index].start
    if start_index or backbone.start_timestep is None:
        return first
    reached = [step.end for step in schedule.inversion_steps(inversion_steps, sampling_steps, order)]
    return max([level for level in reached if level <= backbone.start_timestep], default=first)


# ---------------------------------------------------------------------------------------------- settings


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
        check_seed(self.seed)

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


# ---------------------------------------------------------------------------------------------- plans


class InversionFacts(Protocol):
    """What sampling and a cached inversion's check read of an inversion, made (`inversion.Inversion`)
    or planned (`InversionPlan`)."""

    backbone_name: str
    fps: int
    inversion_steps: int
    sampling_steps: int
    order: int
    windows: ContextWindows | None

    @property
    def num_frames(self) -> int: ...

    @property
    def size_wh(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class InversionPlan:
    """A checked inversion of `frames`: what `inversion.run_inversion` runs. Its facts carry the
    names of `Inversion`'s, so a sampling plan can be made from either."""

    frames: torch.Tensor  # [F, H, W, 3] float32 0..1 on the CPU, at the working size
    backbone_name: str
    fps: int
    inversion_steps: int
    sampling_steps: int
    order: int
    windows: ContextWindows | None  # over the latents' frames; None: all frames at once
    steps: tuple[InversionStep, ...]  # least noisy first
    keep: frozenset[Level]  # the levels whose latents sampling reads
    start: Level  # the level sampling from start index 0 starts from

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size_wh(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def plan_inversion(backbone: Backbone, frames: torch.Tensor, *, inversion_steps: int = 500, sampling_steps: int = 50,
                   fps: int = 8, windows: ContextWindows | None = None, order: int | None = None) -> InversionPlan:
    """Check an inversion of prepared frames [F, H, W, 3] (already at the working size).

    `windows` (in video frames) runs every model evaluation over temporal context windows;
    sampling later uses the same. `order` is the solver order (None: the backbone's)."""
    if not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise AnyV2VError(f"fps must be positive (got {fps!r}); I2V models use 8 as their default")
    order = backbone.inversion_order if order is None else order
    schedule = backbone.schedule
    schedule.check_inversion_steps(inversion_steps, sampling_steps, order)  # the order too
    frames = check_frames(frames, "source frames", min_frames=2)
    backbone.defaults.check_clip(backbone.name, int(frames.shape[0]), (int(frames.shape[2]), int(frames.shape[1])))
    check_frame_count(backbone, int(frames.shape[0]), windows)
    start = start_level(backbone, inversion_steps, sampling_steps, order=order)
    return InversionPlan(frames=frames, backbone_name=backbone.name, fps=fps, inversion_steps=inversion_steps,
                         sampling_steps=sampling_steps, order=order, windows=backbone.latent_windows(windows),
                         steps=tuple(schedule.inversion_steps(inversion_steps, sampling_steps, order)),
                         keep=frozenset(schedule.source_levels(sampling_steps, order=order) | {start}), start=start)


def video_frames_per_call(backbone: Backbone, inversion: InversionFacts) -> int:
    """Video frames one model call of the inversion, or of sampling from it, sees: the clip, or one
    window of its generated frames, plus any conditioning frame. What memory is sized for: the
    inversion's windows count latent frames, which a temporally compressing VAE (Wan) packs 4 to 1."""
    generated = inversion.num_frames - backbone.conditioning_frames
    if inversion.windows is not None:
        generated = min(generated, (inversion.windows.length - 1) * backbone.defaults.frame_stride + 1)
    return generated + backbone.conditioning_frames


@dataclass(frozen=True)
class SamplingPlan:
    """A checked injected sampling run: what `sampling.run_sampling` runs."""

    first_frame: torch.Tensor  # [1, H, W, 3] the edited first frame at the working size
    prompt: str
    negative_prompt: str
    cfg: float
    start_index: int
    steps: tuple[SamplingStep, ...]  # the steps run: the full schedule's from `start_index` on
    start: Level  # the inverted latent's level that sampling starts from
    injection: InjectionPlan
    seed: int
    noise: torch.Tensor | None = None  # replayed DDPM noise [draws, 1, C, F, h, w]
    initial_latents: torch.Tensor | None = None  # replaces the inverted start latent (an ablation)
    keep_source_row: bool = False  # run the source row after the last injection window too (the reference does)


def plan_sampling(
    backbone: Backbone,
    inversion: InversionFacts,
    edited_first_frame: torch.Tensor,
    *,
    prompt: str,
    negative_prompt: str,
    injection: InjectionSettings = InjectionSettings(),
    cfg: float = 9.0,
    start_index: int = 0,
    sampler: str | None = None,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    initial_latents: torch.Tensor | None = None,
    keep_source_row: bool = False,
) -> SamplingPlan:
    """Check an injected sampling run from `inversion` (made, or planned) with the edited first
    frame [1, H, W, 3] at the working size.

    Sampling integrates with the solver order the inversion used. `sampler` names a sampler of
    DDPM-family backbones: "ddim" (deterministic) or "ddpm" (ancestral, as the SEINE reference
    edits); None takes the backbone's. DDPM draws its noise from a CPU generator seeded with
    `seed`, or replays `noise` [steps run - 1, 1, C, F, h, w] (the last step adds none).
    `initial_latents` replaces the inverted start latent (the paper's "random noise" ablation).
    `keep_source_row` runs the source row at every step, as the reference does; the result is the
    same, at the cost of one more row per step after the last injection window."""
    steps = inversion.sampling_steps
    check_sampling_settings(steps, cfg, start_index)
    check_seed(seed)
    first_frame = check_edited_first_frame(edited_first_frame, inversion.size_wh)
    if inversion.backbone_name != backbone.name:
        raise AnyV2VError(f"this inversion was made with {inversion.backbone_name}, not {backbone.name}; invert again")
    todo = backbone.schedule.sampling_steps(steps, sampler=sampler or backbone.sampler, order=inversion.order)
    todo = todo[start_index:]
    injection_plan = InjectionPlan.build(steps, injection, backbone.injection_layers)
    check_injection_layers(backbone.denoiser, injection_plan.layers)
    noise_draws = sum(step.draws_noise for step in todo)
    if noise is not None and len(noise) < noise_draws:
        raise AnyV2VError(f"{len(noise)} replayed noise tensors are too few for {noise_draws} stochastic steps")
    if backbone.one_row_at_a_time and not backbone.row_blocks():
        raise AnyV2VError(f"{backbone.name} cannot run its rows one at a time; run them batched")
    return SamplingPlan(first_frame=first_frame, prompt=prompt, negative_prompt=negative_prompt, cfg=cfg,
                        start_index=start_index, steps=tuple(todo),
                        start=start_level(backbone, inversion.inversion_steps, steps, start_index, inversion.order),
                        injection=injection_plan, seed=seed, noise=noise, initial_latents=initial_latents,
                        keep_source_row=keep_source_row)


@dataclass(frozen=True)
class EditPlan:
    """A whole edit, checked: `pipeline.edit` runs it."""

    settings: EditSettings  # resolved against the backbone's defaults
    inversion: InversionPlan
    sampling: SamplingPlan


def plan_source_inversion(backbone: Backbone, source_frames: torch.Tensor, settings: EditSettings) -> InversionPlan:
    """The inversion of `source_frames` [F, H, W, 3] (any size) that an edit with `settings` starts from."""
    s = settings.resolved(backbone.defaults)
    available = int(check_frames(source_frames, "source frames", min_frames=2).shape[0])
    num_frames = clip_frame_count(s, backbone.defaults, backbone.name, available)
    frames = prepare_frames(source_frames, size_wh=s.size_wh, resize=s.resize, num_frames=num_frames)
    return plan_inversion(backbone, frames, inversion_steps=s.inversion_steps, sampling_steps=s.steps, fps=s.fps,
                          windows=s.windows, order=s.inversion_order)


def plan_edit(backbone: Backbone, source_frames: torch.Tensor, edited_first_frame: torch.Tensor, *, prompt: str,
              settings: EditSettings, inversion: InversionFacts | None = None) -> EditPlan:
    """Check a whole edit of `source_frames` [F, H, W, 3] with `edited_first_frame` [1, H', W', 3]
    (float 0..1, any size); `inversion`: one made earlier for these settings, checked to fit."""
    s = settings.resolved(backbone.defaults)
    inverting = plan_source_inversion(backbone, source_frames, s)
    if inversion is not None:
        check_inversion_fits(inversion, inverting)
    first_frame = prepare_first_frame(edited_first_frame, size_wh=s.size_wh, resize=s.resize,
                                      source_wh=(int(source_frames.shape[-2]), int(source_frames.shape[-3])))
    sampling = plan_sampling(backbone, inversion or inverting, first_frame, prompt=prompt,
                             negative_prompt=s.negative_prompt, injection=s.injection, cfg=s.cfg,
                             start_index=s.start_index, sampler=s.sampler, seed=s.seed)
    return EditPlan(settings=s, inversion=inverting, sampling=sampling)


def check_inversion_fits(inversion: InversionFacts, wanted: InversionPlan) -> None:
    """Refuse an inversion made with other inversion settings than the plan's."""
    facts = ("size_wh", "num_frames", "fps", "inversion_steps", "sampling_steps", "order", "windows")
    names = ("working size", "frame count", "fps", "inversion steps", "sampling steps", "inversion order", "windows")
    differ = [f"{name} {getattr(inversion, fact)} (asked: {getattr(wanted, fact)})"
              for name, fact in zip(names, facts) if getattr(inversion, fact) != getattr(wanted, fact)]
    if differ:
        raise AnyV2VError(f"the inversion was made with other settings: {', '.join(differ)}; invert the source "
                          "again with these settings (invert_source)")
