"""One call for a whole AnyV2V edit: plan -> invert -> injected sampling -> decode.

This is what the CLI, the batch runner and the demo use; the ComfyUI nodes plan and run the same
phases one by one so ComfyUI can cache the inversion ("invert once, edit many").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbones.base import Backbone
from .inversion import Inversion, Progress, run_inversion
from .plan import EditSettings, plan_edit, plan_source_inversion
from .sampling import run_sampling


@dataclass
class EditResult:
    frames: torch.Tensor  # [F, H, W, 3] float32 0..1
    latents: torch.Tensor  # [1, C, F, h, w] final denoised latents
    inverted_start: torch.Tensor  # [1, C, F', h, w] the inverted latent sampling started from (F' = F-1 for ConsistI2V)
    fps: int
    inversion: Inversion


def posterior_generator(backbone: Backbone, settings: EditSettings) -> torch.Generator | None:
    """The VAE posterior's sampler where `settings` ask for one (the reference samples it); None: the mean."""
    return torch.Generator(backbone.device).manual_seed(settings.seed) if settings.sample_posterior else None


def invert_source(
    backbone: Backbone,
    source_frames: torch.Tensor,
    settings: EditSettings = EditSettings(),
    progress: Progress | None = None,
) -> Inversion:
    """The inversion `edit` starts from: `source_frames` [F, H, W, 3] prepared and inverted with the
    settings' working size, frames, fps, steps, order and windows. Give it to `edit(inversion=...)`
    to edit the same source several times with one inversion."""
    plan = plan_source_inversion(backbone, source_frames, settings)
    return run_inversion(backbone, plan, progress=progress, generator=posterior_generator(backbone, settings))


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
    plan = plan_edit(backbone, source_frames, edited_first_frame, prompt=prompt, settings=settings, inversion=inversion)
    inversion_done = plan.inversion.inversion_steps if inversion is None else 0
    sampling_done = inversion_done + len(plan.sampling.steps)
    total = sampling_done + plan.inversion.num_frames  # inversion steps, sampling steps, decoded frames

    def phase(offset: int) -> Progress | None:
        return None if progress is None else (lambda done, _: progress(offset + done, total))

    if inversion is None:
        inversion = run_inversion(backbone, plan.inversion, progress=phase(0),
                                  generator=posterior_generator(backbone, plan.settings))
    latents = run_sampling(backbone, inversion, plan.sampling, progress=phase(inversion_done))
    decoded = backbone.decode(latents, plan.settings.decode_chunk_size, progress=phase(sampling_done))
    return EditResult(frames=decoded, latents=latents.cpu(), inverted_start=inversion.latent_at(plan.sampling.start),
                      fps=plan.settings.fps, inversion=inversion)
