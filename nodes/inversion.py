"""DDIMInvertVideo: the source video, prepared and DDIM-inverted once.

ComfyUI caches a node's output until one of its inputs changes, so the expensive inversion
runs again only when the video, the model or these settings change, never for a new prompt,
a new edited first frame or new injection settings ("invert once, edit many").
"""

from __future__ import annotations

from dataclasses import dataclass

from . import host
from .loaders import BACKBONE

INVERSION = "ANYV2V_INVERSION"
RESIZE_POLICIES = ("stretch", "crop", "pad")
RESIZE_TOOLTIP = ("How frames of another aspect ratio reach the working size: stretch (the paper's choice), "
                  "crop (keep the aspect ratio, cut the overflow) or pad (keep it, add black bars).")
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000  # every supported backbone's scheduler


@dataclass
class SourceInversion:
    """What flows on an ANYV2V_INVERSION link: the engine's Inversion and the resize policy the
    edited first frame must follow to line up with the source frames."""

    inversion: object  # anyv2v_core.inversion.Inversion
    resize: str
    source_wh: tuple[int, int] | None = None  # the source frames' size before resizing (for the aspect-ratio warning)


def size_inputs(default: int = 512) -> dict:
    """Working width/height widgets, shared with FirstFrameEditor so both offer the same choices."""
    return {
        axis: ("INT", {"default": default, "min": 64, "max": 2048, "step": 8,
                       "tooltip": f"Working {axis} in pixels, a multiple of 8. I2VGen-XL was trained at 512x512; "
                                  "memory and time grow with the pixel count."})
        for axis in ("width", "height")
    }


def check_steps(inversion_steps, sampling_steps) -> str | None:
    """The engine's rule (every sampling timestep must be an inversion target) on the 1000-step
    schedule all supported backbones share; the engine checks it again against the real model."""
    from anyv2v_core.errors import AnyV2VError
    from anyv2v_core.diffusion_schedule import TimestepSpacing

    if inversion_steps is None or sampling_steps is None:
        return None
    for name, value in (("inversion_steps", inversion_steps), ("sampling_steps", sampling_steps)):
        if not 1 <= value <= DEFAULT_NUM_TRAIN_TIMESTEPS:
            return f"{name} must be between 1 and {DEFAULT_NUM_TRAIN_TIMESTEPS} (got {value})"
    try:
        TimestepSpacing(DEFAULT_NUM_TRAIN_TIMESTEPS).check_inversion_steps(inversion_steps, sampling_steps)
    except AnyV2VError as error:
        return str(error)
    return None


def context_windows(length: int, overlap: int):
    """The engine's temporal windows, or None for length 0 (all frames at once)."""
    from anyv2v_core.windows import ContextWindows

    return ContextWindows(length, overlap) if length else None


class DDIMInvertVideo:
    DESCRIPTION = (
        "Prepares the source clip (frame count, working size) and DDIM-inverts it with the image-to-video "
        "model, conditioned on its own first frame and an empty prompt. Runs once per video: changing the "
        "prompt, the edited first frame or the injection settings reuses the cached inversion. Only the "
        "latents at the sampling timesteps are kept (on the CPU)."
    )
    CATEGORY = "AnyV2V/inversion"
    RETURN_TYPES = (INVERSION,)
    RETURN_NAMES = ("inversion",)
    OUTPUT_TOOLTIPS = ("The inverted source video, for CaptureFeatures.",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": (BACKBONE, {"tooltip": "The model from LoadI2VBackbone."}),
                "source_frames": ("IMAGE", {"tooltip": "The video to edit, as an IMAGE batch (frames on the batch axis)."}),
                **size_inputs(),
                "resize": (RESIZE_POLICIES, {"default": "stretch", "tooltip": RESIZE_TOOLTIP}),
                "frame_count": ("INT", {"default": 16, "min": 2, "max": 1024,
                                        "tooltip": "How many frames to edit, from the first one. I2VGen-XL generates 16; "
                                                   "for more, set window_length. The source must have at least this "
                                                   "many."}),
                "fps": ("INT", {"default": 8, "min": 1, "max": 60,
                                "tooltip": "The frame rate the model is told the clip has (a conditioning input). "
                                           "I2VGen-XL and the paper use 8; the edited video is played at this rate."}),
                "inversion_steps": ("INT", {"default": 500, "min": 1, "max": DEFAULT_NUM_TRAIN_TIMESTEPS,
                                            "tooltip": "DDIM inversion steps (the paper: 500; 100 is faster and usually "
                                                       "fine). Must reach every sampling timestep: use a multiple of "
                                                       "sampling_steps that divides 1000, e.g. 100 or 500 for 50."}),
                "sampling_steps": ("INT", {"default": 50, "min": 1, "max": DEFAULT_NUM_TRAIN_TIMESTEPS,
                                           "tooltip": "DDIM steps InjectedSampler will take (the paper: 50). Set here "
                                                      "because the inversion keeps only the latents those steps read."}),
                "window_length": ("INT", {"default": 0, "min": 0, "max": 1024,
                                          "tooltip": "0: the model sees all frames at once (the paper). Otherwise the "
                                                     "model runs on overlapping windows of this many frames, for clips "
                                                     "longer than it was trained on (16 for I2VGen-XL); memory then "
                                                     "depends on the window, not the clip. The sampler uses the same "
                                                     "windows."}),
                "window_overlap": ("INT", {"default": 4, "min": 0, "max": 1023,
                                           "tooltip": "Frames shared by neighbouring windows, cross-faded so no seam "
                                                      "shows (below window_length)."}),
            }
        }

    # ComfyUI files a failed VALIDATE_INPUTS under every input the method takes, so it takes only the two
    # step counts. Width, height and the window widgets get ComfyUI's own min/max checks, each under its
    # input; the frontend snaps them to their step, and `invert` checks the rest before any model work.
    @classmethod
    def VALIDATE_INPUTS(cls, inversion_steps, sampling_steps):
        return check_steps(inversion_steps, sampling_steps) or True

    def invert(self, backbone, source_frames, width, height, resize, frame_count, fps, inversion_steps,
               sampling_steps, window_length, window_overlap):
        from anyv2v_core.inversion import run_inversion
        from anyv2v_core.plan import plan_inversion, video_frames_per_call
        from anyv2v_core.video import prepare_frames

        windows = context_windows(window_length, window_overlap)
        frames = prepare_frames(source_frames, size_wh=(width, height), resize=resize, num_frames=frame_count)
        plan = plan_inversion(backbone.backbone, frames, inversion_steps=inversion_steps, sampling_steps=sampling_steps,
                              fps=fps, windows=windows)
        with host.on_compute_device(backbone, frames=video_frames_per_call(backbone.backbone, plan),
                                    size_wh=(width, height), rows=1) as model:
            inversion = run_inversion(model, plan, progress=host.progress_bar(inversion_steps))
        host.logger.info("inverted %d frames at %dx%d in %d steps", frame_count, width, height, inversion_steps)
        source_wh = (int(source_frames.shape[2]), int(source_frames.shape[1]))
        return (SourceInversion(inversion=inversion, resize=resize, source_wh=source_wh),)


NODE_CLASS_MAPPINGS = {"DDIMInvertVideo": DDIMInvertVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"DDIMInvertVideo": "AnyV2V DDIM Invert Video"}
