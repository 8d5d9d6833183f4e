"""Command line: `python -m anyv2v_core edit | batch | convert | demo`.

On bad input the CLI prints one line, "error: <what is wrong and how to fix it>", and exits with
status 2 (3 when the accelerator ran out of memory), without a traceback. Every check that needs
no model runs before the model loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import AnyV2VError, AnyV2VOutOfMemory


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


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CLI's parser; `parser_class` builds it and its subcommands (e.g. one whose errors raise
    instead of exiting, to parse `edit` options that do not come from the command line)."""
    parser = parser_class(prog="python -m anyv2v_core", description="AnyV2V: tuning-free video editing.")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="edit a video from an edited first frame and a prompt")
    edit.add_argument("--model", required=True,
                      help="model folder (diffusers I2VGen-XL, ConsistI2V, Wan 2.1/2.2 image-to-video; SEINE) or repo id")
    edit.add_argument("--video", required=True, type=Path, help="source video file or folder of frames (sorted by name)")
    edit.add_argument("--edited-first-frame", required=True, type=Path, help="the edited first frame (PNG/JPEG)")
    edit.add_argument("--prompt", required=True, help="text describing the edited video")
    edit.add_argument("--out", required=True, type=Path, help="output .mp4")
    edit.add_argument("--negative-prompt", default=None, help="default: the paper's negative prompt")
    edit.add_argument("--inversion-steps", type=int, default=None,
                      help="inversion steps (default: the model's; 500 for I2VGen-XL, the sampling steps for Wan)")
    edit.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's; 50, Wan 40-50)")
    edit.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's; "
                                                              "9.0 for I2VGen-XL, 5.0 for Wan 2.1)")
    edit.add_argument("--start-index", type=int, default=None, help="first sampling step (T' in the paper, default 0)")
    edit.add_argument("--conv-tau", type=_tau, default=0.2, help="fraction of steps with conv injection")
    edit.add_argument("--spatial-tau", type=_tau, default=0.2, help="fraction of steps with spatial Q/K injection")
    edit.add_argument("--temporal-tau", type=_tau, default=0.5, help="fraction of steps with temporal Q/K injection")
    edit.add_argument("--attention-tau", type=_tau, default=0.5,
                      help="Wan: fraction of steps with Q/K injection in the joint space-time self-attention, which "
                           "does the work of the UNets' spatial and temporal ones (the conv/spatial/temporal taus "
                           "do not apply to Wan, this one not to the UNets)")
    edit.add_argument("--attention-blocks", default="all",
                      help="Wan: transformer blocks whose self-attention is injected: all, early, late, or indices "
                           "like 0-9,20")
    edit.add_argument("--inversion-order", type=int, choices=(1, 2), default=None,
                      help="Wan: solver order of the inversion and of the matching sampler, 1 = Euler, 2 = midpoint "
                           "(two model calls per step, far more exact; default 2). UNet backbones invert with DDIM (1)")
    edit.add_argument("--shift", type=float, default=None,
                      help="Wan: sigma shift of the noise schedule (default: the official 3.0 for Wan 2.1 at 480p, "
                           "5.0 for 720p, Wan 2.2)")
    edit.add_argument("--fps", type=int, default=None, help="target_fps micro-condition and output fps (default 8)")
    edit.add_argument("--frames", type=int, default=None,
                      help="number of source frames to edit (default: all; Wan: all that fit 4k + 1)")
    edit.add_argument("--size", type=_size, default=None,
                      help="working size WxH, multiples of 8 (Wan 2.1: 16, Wan 2.2 TI2V: 32; default: the model's)")
    edit.add_argument("--resize", choices=("stretch", "crop", "pad"), default="stretch", help="resize policy")
    edit.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                      help="edit sampler (default: the backbone's reference sampler; SEINE: ddpm)")
    edit.add_argument("--seed", type=int, default=0, help="seeds the DDPM noise and --sample-posterior")
    edit.add_argument("--sample-posterior", action="store_true",
                      help="sample the VAE posterior as the reference does (default: its mean, deterministic)")
    edit.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    edit.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    edit.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; only for files you trust")
    edit.add_argument("--window", type=int, default=None,
                      help="edit long videos in temporal windows of this many frames (e.g. 16); default: all frames at once")
    edit.add_argument("--window-overlap", type=int, default=4, help="frames shared by neighbouring windows")
    edit.add_argument("--offload", choices=("auto", "none", "model", "sequential"), default="auto",
                      help="GPU memory policy: model = one component on the GPU at a time, sequential = lowest VRAM; "
                           "auto = the fastest that fits the GPU (docs/memory.md)")
    edit.add_argument("--rows", choices=("batched", "one-at-a-time"), default="batched",
                      help="Wan: run the source, negative and positive rows of a step together (faster) or one at a "
                           "time through each block (a third of the activation memory)")
    edit.add_argument("--decode-chunk-size", type=int, default=1, help="frames decoded at once by the VAE")
    edit.add_argument("--save-latents", type=Path, default=None,
                      help="also write final latents and the inverted start latent (.safetensors)")
    edit.add_argument("--overwrite", action="store_true", help="replace existing output files")

    batch = commands.add_parser("batch", help="run many edits from a JSON-lines file, resumable, optionally on Ray")
    batch.add_argument("jobs", type=Path, help="JSON lines, one edit each: the edit options as keys (model, video, "
                       "edited_first_frame, prompt, steps, ...); see docs/batch.md")
    batch.add_argument("--out", required=True, type=Path,
                       help="results folder: <out>/<job id>/ per job, failures.jsonl, inversions/")
    batch.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                       help="run on Ray actors: auto joins this machine's cluster or starts one, ADDRESS joins a cluster")
    batch.add_argument("--workers", type=int, default=None,
                       help="Ray actors, each holding a loaded model (default: one per GPU, else one per CPU slot)")
    batch.add_argument("--gpus-per-worker", type=float, default=None,
                       help="GPUs each actor reserves (default: 1 on a cluster with GPUs, else 0; 0.5 shares a GPU by two)")
    batch.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor reserves; also its torch threads")
    batch.add_argument("--retries", type=int, default=2, help="runs of a job again after its worker died")
    batch.add_argument("--no-inversion-cache", action="store_true",
                       help="keep inversions in memory only, not in <out>/inversions (disk cost: docs/batch.md)")

    demo = commands.add_parser("demo", help="offline demo: a real edit on the shipped toy backbone (CPU, seconds)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for source.mp4, edited.mp4, strip.png")
    demo.add_argument("--seed", type=int, default=0, help="which held-out toy clip to edit")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files")

    convert = commands.add_parser("convert", help="convert a pickle checkpoint (e.g. seine.pt) to safetensors, once")
    convert.add_argument("src", type=Path, help="the pickle checkpoint (.pt/.pth/.ckpt/.bin)")
    convert.add_argument("dst", type=Path, help="the .safetensors file to write (e.g. seine.safetensors beside it)")
    convert.add_argument("--entry", default=None,
                         help="the entry holding the state dict (default: 'ema' for SEINE checkpoints, else the whole file)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def run_demo(args: argparse.Namespace) -> None:
    from .toy.demo import run_demo as demo

    started = time.perf_counter()
    result = demo(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f'edited "{result.prompt}" in {time.perf_counter() - started:.1f} s: ' + ", ".join(map(str, result.files)))
    print(f"shape centroid error {result.scores.centroid_error:.2f} px, colour error {result.scores.colour_error:.3f}")


def run_convert(args: argparse.Namespace) -> None:
    from .backbones.checkpoints import convert_checkpoint_to_safetensors

    entry = args.entry if args.entry is not None else ("ema" if args.src.name.lower().startswith("seine") else None)
    written = convert_checkpoint_to_safetensors(args.src, args.dst, entry=entry, overwrite=args.overwrite)
    print(f"wrote {written}")


def run_batch(args: argparse.Namespace) -> int:
    from .batch.runner import run_batch as batch

    if args.ray is None and (args.workers, args.gpus_per_worker) != (None, None):
        raise AnyV2VError("--workers and --gpus-per-worker need --ray; without it the batch runs in this process")
    if ((args.workers is not None and args.workers < 1) or args.retries < 0 or args.cpus_per_worker <= 0
            or (args.gpus_per_worker is not None and args.gpus_per_worker < 0)):
        raise AnyV2VError("--workers must be >= 1, --retries >= 0, --cpus-per-worker > 0 and --gpus-per-worker >= 0")
    summary = batch(args.jobs, args.out, inversion_cache=None if args.no_inversion_cache else args.out / "inversions",
                    ray_address=args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                    cpus_per_worker=args.cpus_per_worker, retries=args.retries, stream=sys.stderr)
    print(summary.describe())
    return 130 if summary.interrupted else 1 if summary.failed or summary.invalid else 0


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
    from .loading import backbone_defaults, detect_backbone
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


def run_edit(args: argparse.Namespace) -> None:
    from .loading import load_backbone
    from .pipeline import edit
    from .video import check_output_path, read_frames, read_image, write_video

    # checks that need no model, before the model loads
    check_output_path(args.out, overwrite=args.overwrite)
    if args.save_latents is not None:
        check_output_path(args.save_latents, overwrite=args.overwrite)
    settings = edit_settings(args)
    frames, _ = read_frames(args.video)
    edited_first_frame = read_image(args.edited_first_frame)
    check_edit_settings(args, settings, int(frames.shape[0]))

    backbone = load_backbone(**backbone_options(args))
    started = time.perf_counter()
    result = edit(backbone, frames, edited_first_frame, prompt=args.prompt, settings=settings,
                  progress=_print_progress)
    print(file=sys.stderr)
    write_video(args.out, result.frames, result.fps, overwrite=args.overwrite)
    if args.save_latents is not None:
        _save_latents(args.save_latents, result, overwrite=args.overwrite)
    print(f"wrote {args.out} ({result.frames.shape[0]} frames) in {time.perf_counter() - started:.1f} s")


def _save_latents(path: Path, result, *, overwrite: bool) -> None:
    from safetensors.torch import save_file

    from .video import _write_atomically, check_output_path

    tensors = {"latents": result.latents.contiguous(), "inverted_start": result.inverted_start.contiguous()}
    _write_atomically(check_output_path(path, overwrite=overwrite), lambda tmp: save_file(tensors, tmp))


def _print_progress(done: int, total: int) -> None:
    print(f"\rstep {done}/{total}", end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "edit":
            run_edit(args)
        elif args.command == "batch":
            return run_batch(args)
        elif args.command == "convert":
            run_convert(args)
        elif args.command == "demo":
            run_demo(args)
    except AnyV2VError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except AnyV2VOutOfMemory as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
