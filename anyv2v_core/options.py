"""The options of one edit, described once: the arguments `python -m anyv2v_core edit` parses,
the keys a batch job line holds (the same options, `_` for `-`), and how both become the engine's
`EditSettings` and `load_backbone`'s arguments, checked before any model loads.

The CLI (`cli.py`) and the batch (`batch/jobs.py`, `batch/worker.py`) both import this module.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .backbones.families import BACKBONES
from .errors import AnyV2VError

# The options of an edit's outputs: the CLI takes them; a batch writes each result to <out>/<job id>/.
OUTPUT_KEYS = ("out", "save_latents", "overwrite")


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (width x height), got {text!r}") from None
    return width, height


def _tau(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a tau is a fraction of the steps in [0, 1], got {value}")
    return value


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an edit, as arguments of `parser` (the CLI's `edit` subcommand, a job line's parser)."""
    parser.add_argument("--model", required=True,
                        help=f"model folder or Hugging Face repo id of an image-to-video model: {', '.join(BACKBONES)}")
    parser.add_argument("--video", required=True, type=Path, help="source video file or folder of frames (sorted by name)")
    parser.add_argument("--edited-first-frame", required=True, type=Path, help="the edited first frame (PNG/JPEG)")
    parser.add_argument("--prompt", required=True, help="text describing the edited video")
    parser.add_argument("--out", required=True, type=Path, help="output .mp4")
    parser.add_argument("--negative-prompt", default=None, help="default: the paper's negative prompt")
    parser.add_argument("--inversion-steps", type=int, default=None,
                        help="inversion steps (default: the model's; 500 for I2VGen-XL, the sampling steps for Wan)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's; 50, Wan 40-50)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's; "
                                                                "9.0 for I2VGen-XL, 5.0 for Wan 2.1)")
    parser.add_argument("--start-index", type=int, default=None, help="first sampling step (T' in the paper, default 0)")
    parser.add_argument("--conv-tau", type=_tau, default=0.2, help="fraction of steps with conv injection")
    parser.add_argument("--spatial-tau", type=_tau, default=0.2, help="fraction of steps with spatial Q/K injection")
    parser.add_argument("--temporal-tau", type=_tau, default=0.5, help="fraction of steps with temporal Q/K injection")
    parser.add_argument("--attention-tau", type=_tau, default=0.5,
                        help="Wan: fraction of steps with Q/K injection in the joint space-time self-attention, which "
                             "does the work of the UNets' spatial and temporal ones (the conv/spatial/temporal taus "
                             "do not apply to Wan, this one not to the UNets)")
    parser.add_argument("--attention-blocks", default="all",
                        help="Wan: transformer blocks whose self-attention is injected: all, early, late, or indices "
                             "like 0-9,20")
    parser.add_argument("--inversion-order", type=int, choices=(1, 2), default=None,
                        help="Wan: solver order of the inversion and of the matching sampler, 1 = Euler, 2 = midpoint "
                             "(two model calls per step, far more exact; default 2). UNet backbones invert with DDIM (1)")
    parser.add_argument("--shift", type=float, default=None,
                        help="Wan: sigma shift of the noise schedule (default: the official 3.0 for Wan 2.1 at 480p, "
                             "5.0 for 720p, Wan 2.2)")
    parser.add_argument("--fps", type=int, default=None, help="target_fps micro-condition and output fps (default 8)")
    parser.add_argument("--frames", type=int, default=None,
                        help="number of source frames to edit (default: all; Wan: all that fit 4k + 1)")
    parser.add_argument("--size", type=_size, default=None,
                        help="working size WxH, multiples of 8 (Wan 2.1: 16, Wan 2.2 TI2V: 32; default: the model's)")
    parser.add_argument("--resize", choices=("stretch", "crop", "pad"), default="stretch", help="resize policy")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                        help="edit sampler (default: the backbone's reference sampler; SEINE: ddpm)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the DDPM noise and --sample-posterior")
    parser.add_argument("--sample-posterior", action="store_true",
                        help="sample the VAE posterior as the reference does (default: its mean, deterministic)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; only for files you trust")
    parser.add_argument("--window", type=int, default=None,
                        help="edit long videos in temporal windows of this many frames (e.g. 16); default: all frames at once")
    parser.add_argument("--window-overlap", type=int, default=4, help="frames shared by neighbouring windows")
    parser.add_argument("--offload", choices=("auto", "none", "model", "sequential"), default="auto",
                        help="GPU memory policy: model = one component on the GPU at a time, sequential = lowest VRAM; "
                             "auto = the fastest that fits the GPU (docs/memory.md)")
    parser.add_argument("--rows", choices=("batched", "one-at-a-time"), default="batched",
                        help="Wan: run the source, negative and positive rows of a step together (faster) or one at a "
                             "time through each block (a third of the activation memory)")
    parser.add_argument("--decode-chunk-size", type=int, default=1, help="frames decoded at once by the VAE")
    parser.add_argument("--save-latents", type=Path, default=None,
                        help="also write final latents and the inverted start latent (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def edit_settings(args: argparse.Namespace):
    """The `edit` options as EditSettings."""
    from .injection import InjectionSettings
    from .plan import EditSettings
    from .windows import ContextWindows

    return EditSettings(
        negative_prompt=args.negative_prompt, size_wh=args.size, resize=args.resize, num_frames=args.frames,
        fps=args.fps, inversion_steps=args.inversion_steps, steps=args.steps, cfg=args.cfg,
        start_index=args.start_index, decode_chunk_size=args.decode_chunk_size, sampler=args.sampler,
        seed=args.seed, sample_posterior=args.sample_posterior, inversion_order=args.inversion_order,
        windows=None if args.window is None else ContextWindows(args.window, args.window_overlap),
        injection=InjectionSettings(conv_tau=args.conv_tau, spatial_tau=args.spatial_tau, temporal_tau=args.temporal_tau,
                                    attention_tau=args.attention_tau),
    )


def check_edit_settings(args: argparse.Namespace, settings, frame_count: int | None) -> None:
    """Check `settings` against the model's defaults and rules without its weights, where the model
    is a local folder (a repo id is checked once downloaded); with the source's frame count, its
    frame rules too."""
    from .backbones.families import backbone_defaults, detect_backbone
    from .plan import clip_frame_count

    local_model = Path(args.model).expanduser()
    if local_model.is_dir():
        name = detect_backbone(local_model)
        defaults = backbone_defaults(name, local_model)
        resolved = settings.resolved(defaults)
        if frame_count is not None:
            clip_frame_count(resolved, defaults, name, frame_count)


def backbone_options(args: argparse.Namespace) -> dict:
    """`load_backbone`'s arguments from the `edit` options; the device defaults to cuda where there is one."""
    import torch

    # Wan's load options, passed only when set so that the other backbones refuse them by name
    wan_options = {key: value for key, value in (("shift", args.shift), ("attention_blocks", args.attention_blocks))
                   if value not in (None, "all")}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(source=args.model, dtype=args.dtype, device=device, allow_pickle=args.allow_pickle,
                offload=args.offload, one_row_at_a_time=args.rows == "one-at-a-time", **wan_options)


class JobLineParser(argparse.ArgumentParser):
    """The parser of job lines: an error raises instead of printing usage and exiting, and an
    option name must be written in full."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str):
        raise AnyV2VError(message)


def job_line_parser() -> JobLineParser:
    parser = JobLineParser(prog="python -m anyv2v_core edit")
    add_edit_arguments(parser)
    return parser


def job_options(entry: dict, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The edit options of a job line's JSON object, parsed as the CLI parses them (outputs aside)."""
    args = parser.parse_args([f"--out={os.devnull}", *job_argv(entry)])
    for key, value in entry.items():
        if value is False and getattr(args, key, None) is not False:
            raise AnyV2VError(f"{key} is not a switch; give it a value, or null for its default")
    return args


def job_argv(entry: dict) -> list[str]:
    """The `edit` command line of a job's JSON object."""
    argv = []
    for key, value in entry.items():
        if key in OUTPUT_KEYS:
            raise AnyV2VError(f"{key} is not a job key: the batch writes each result to <out>/<job id>/")
        if key == "help":
            raise AnyV2VError("help is not a job key; python -m anyv2v_core edit --help lists the options")
        option = "--" + key.replace("_", "-")
        if value is True:
            argv.append(option)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv.append(f"{option}={value}")  # one token, so a value starting with "-" stays a value
        elif value is not None and value is not False:
            raise AnyV2VError(f"{key} must be a string, a number, true or null, got {json.dumps(value)}")
    return argv
