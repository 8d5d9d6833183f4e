"""DDIM inversion of the source video (AnyV2V's starting point and the source branch's input).

The reference recipe: no classifier-free guidance, the empty prompt, conditioned on the
*source* first frame, deterministic DDIM moves towards noisier timesteps. The reference writes
every inversion step to disk; we keep in memory only the latents at the timesteps that
sampling will visit, because those are the only ones it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backbones.base import Backbone, RowCondition
from .errors import AnyV2VError
from .memory import guard_out_of_memory
from .video import check_frames, check_size
from .windows import ContextWindows, check_frame_count, predict_in_windows

Progress = Callable[[int, int], None]


@dataclass
class Inversion:
    """The inverted source video, ready for injected sampling.

    latents: {timestep: [1, C, F, h, w] float32 on the CPU}, one per sampling timestep.
    source_condition: the source row's conditioning (empty prompt, source first frame).
    """

    latents: dict[int, torch.Tensor]
    source_condition: RowCondition
    source_first_frame: torch.Tensor  # [1, H, W, 3]
    backbone_name: str
    num_frames: int
    fps: int
    inversion_steps: int
    sampling_steps: int
    windows: ContextWindows | None = None  # temporal windows used here and by sampling; None: all frames at once

    @property
    def size_wh(self) -> tuple[int, int]:
        return int(self.source_first_frame.shape[2]), int(self.source_first_frame.shape[1])

    def latent_at(self, timestep: int) -> torch.Tensor:
        if timestep not in self.latents:
            raise AnyV2VError(
                f"the inversion holds no latent for timestep {timestep}: it was made for {self.sampling_steps} "
                "sampling steps; invert again with the sampling step count you use"
            )
        return self.latents[timestep]


def start_timestep(backbone: Backbone, inversion_steps: int, sampling_steps: int, start_index: int = 0) -> int:
    """Timestep of the inverted latent that sampling starts from (see `Backbone.start_timestep`)."""
    first = backbone.schedule.timesteps(sampling_steps)[start_index]
    if start_index or backbone.start_timestep is None:
        return first
    targets = backbone.schedule.inversion_timesteps(inversion_steps)
    return max([t for t in targets if t <= backbone.start_timestep], default=first)


@guard_out_of_memory("inversion")
def invert_video(
    backbone: Backbone,
    frames: torch.Tensor,
    *,
    inversion_steps: int = 500,
    sampling_steps: int = 50,
    fps: int = 8,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
    windows: ContextWindows | None = None,
) -> Inversion:
    """DDIM-invert prepared frames [F, H, W, 3] (already at the working size).

    `generator` samples the VAE posterior instead of taking its mean (the reference samples it
    from the global RNG; the mean is the deterministic default). `windows` runs every UNet
    evaluation over temporal context windows (`windows.py`); sampling then uses the same windows.
    """
    if not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise AnyV2VError(f"fps must be positive (got {fps!r}); I2V models use 8 as their default")
    backbone.schedule.check_inversion_steps(inversion_steps, sampling_steps)
    frames = check_frames(frames, "source frames", min_frames=2)
    check_size((frames.shape[2], frames.shape[1]))
    check_frame_count(backbone, int(frames.shape[0]), windows)
    schedule = backbone.schedule
    keep = set(schedule.timesteps(sampling_steps)) | {start_timestep(backbone, inversion_steps, sampling_steps)}
    num_frames = int(frames.shape[0])
    source_first_frame = frames[:1]
    source_condition = backbone.condition(source_first_frame, "", num_frames=num_frames, fps=fps)

    # the sampling state: frames the model generates (a conditioning first frame is not inverted)
    latents = backbone.encode_video(frames, generator=generator)[:, :, backbone.conditioning_frames:]
    kept: dict[int, torch.Tensor] = {}
    targets = schedule.inversion_timesteps(inversion_steps)
    with torch.inference_mode():
        for done, t in enumerate(targets, start=1):
            model_output = predict_in_windows(backbone, latents, t, [source_condition], windows)
            alpha_now, alpha_target = schedule.inversion_alphas(t, inversion_steps)
            latents = schedule.ddim_move(model_output, latents, alpha_now, alpha_target)
            if t in keep:
                kept[t] = latents.to("cpu", copy=True)
            if progress is not None:
                progress(done, len(targets))
    return Inversion(
        latents=kept,
        source_condition=source_condition,
        source_first_frame=source_first_frame,
        backbone_name=backbone.name,
        num_frames=num_frames,
        fps=fps,
        inversion_steps=inversion_steps,
        sampling_steps=sampling_steps,
        windows=windows,
    )
