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
from .options import add_edit_arguments, backbone_options, check_edit_settings, edit_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anyv2v_core", description="AnyV2V: tuning-free video editing.")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="edit a video from an edited first frame and a prompt")
    add_edit_arguments(edit)

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
