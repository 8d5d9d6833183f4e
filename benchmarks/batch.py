"""Batch throughput on Ray, and what "invert once, edit many" saves, with the tiny model on the CPU.

    python benchmarks/batch.py [--videos 4] [--edits 3] [--frames 8] [--size 32] [--inversion-steps 20] [--steps 2]

The jobs: each of `--videos` clips edited `--edits` times (other prompts and seeds), with 10
inversion steps per sampling step as the paper's 500 : 50.
1. Ray, with 1 worker and then 2 (a local cluster of 2 CPUs, one torch thread per worker): jobs per
   minute over the whole run, and after start-up (from the moment every worker has ended its first
   job to the last job: the actors' start and model load left out), and the ratio 2 workers / 1.
2. Invert once, edit many: the same jobs through the batch runner in this process (one inversion
   per video) against one `pipeline.edit` per job on the same loaded model (one inversion per job,
   as separate runs of the CLI or the reference do). Compute time only: model load and file writes
   are left out of both.
3. What the inversion cache costs on disk: this run's file per clip, and an I2VGen-XL clip at its
   defaults (512x512, 16 frames, 50 sampling steps) built from zeros with the real tensor shapes.
Ray must be installed (requirements-batch.txt). Timings are wall-clock seconds: on a shared
machine they include the waits for a core (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core.backbones.i2vgen_xl import I2VGenXLRow  # noqa: E402
from anyv2v_core.batch.runner import run_batch  # noqa: E402
from anyv2v_core.inversion import Inversion  # noqa: E402
from anyv2v_core.inversion_store import save_inversion  # noqa: E402
from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.pipeline import edit  # noqa: E402
from anyv2v_core.plan import EditSettings  # noqa: E402
from anyv2v_core.testing.tiny_models import build_tiny_i2vgenxl, moving_square_video  # noqa: E402
from anyv2v_core.video import read_frames, read_image, write_image, write_video  # noqa: E402


class EndTimes:
    """A non-terminal progress stream: the batch writes one line per ended job; keep when."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def write(self, text: str) -> int:
        if text.startswith("batch:"):
            self.times.append(time.perf_counter())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def make_jobs(folder: Path, model: Path, args) -> list[dict]:
    jobs = []
    for video in range(args.videos):
        colour = torch.rand(3, generator=torch.Generator().manual_seed(video)).tolist()
        frames = moving_square_video(args.frames, args.size, colour=colour)
        write_video(folder / f"video{video}.mp4", frames, fps=8)
        write_image(folder / f"first{video}.png", frames[0].flip(-1))
        for number in range(args.edits):
            jobs.append({"model": str(model), "video": str(folder / f"video{video}.mp4"),
                         "edited_first_frame": str(folder / f"first{video}.png"), "prompt": f"edit {number}",
                         "seed": number, "size": f"{args.size}x{args.size}", "steps": args.steps,
                         "inversion_steps": args.inversion_steps})
    return jobs


def ray_throughput(jobs_file: Path, folder: Path, workers: int, jobs: int) -> tuple[float, float, float]:
    """Jobs per minute over the whole run and after every worker's first job, and the mean seconds a
    job takes inside its worker after the first (it grows when the workers wait for cores)."""
    out = folder / f"out-{workers}-workers"
    ends = EndTimes()
    started = time.perf_counter()
    summary = run_batch(jobs_file, out, inversion_cache=out / "inversions", ray_address="auto", workers=workers,
                        stream=ends)
    total = time.perf_counter() - started
    assert summary.done == jobs and summary.failed == 0, summary.describe()
    steady = (len(ends.times) - workers) / (ends.times[-1] - ends.times[workers - 1])
    job_seconds = [record["timings_s"]["total"] - record["timings_s"]["load"]
                   for record in map(json.loads, map(Path.read_text, out.glob("*/result.json")))]
    return 60 * jobs / total, 60 * steady, sum(job_seconds) / len(job_seconds)


def invert_once_saving(jobs_file: Path, folder: Path, jobs: list[dict]) -> dict:
    """Compute seconds and inversion UNet calls: the batch runner against one full edit per job."""
    out = folder / "out-in-process"
    summary = run_batch(jobs_file, out, inversion_cache=None, stream=None)
    assert summary.done == len(jobs), summary.describe()
    records = [json.loads(path.read_text()) for path in out.glob("*/result.json")]
    batch_seconds = sum(r["timings_s"]["inversion"] + r["timings_s"]["edit"] for r in records)
    batch_calls = sum(r["model_calls"]["inversion"] for r in records)

    backbone = load_backbone(jobs[0]["model"])
    calls = [0]
    backbone.denoiser.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    single_seconds, single_calls = 0.0, 0
    for job in jobs:
        frames, first = read_frames(job["video"])[0], read_image(job["edited_first_frame"])
        settings = EditSettings(size_wh=tuple(map(int, job["size"].split("x"))), steps=job["steps"],
                                inversion_steps=job["inversion_steps"], seed=job["seed"])
        started = time.perf_counter()
        edit(backbone, frames, first, prompt=job["prompt"], settings=settings)
        single_seconds += time.perf_counter() - started
    single_calls = calls[0] - len(jobs) * jobs[0]["steps"]  # the sampling calls are the same in both
    return {"batch_s": batch_seconds, "single_s": single_seconds, "batch_inversion_calls": batch_calls,
            "single_inversion_calls": single_calls}


def cache_file_mib(inversion: Inversion, folder: Path) -> float:
    return save_inversion(folder / "size.safetensors", inversion, overwrite=True).stat().st_size / 2**20


def i2vgenxl_default_inversion() -> Inversion:
    """Zeros with the shapes of an I2VGen-XL inversion at its defaults: 16 frames of 512x512, latents
    [1, 4, 16, 64, 64] kept at each of the 50 sampling timesteps, a 1024-wide text encoder."""
    latent = torch.zeros(1, 4, 16, 64, 64)
    row = I2VGenXLRow(text_embeddings=torch.zeros(1, 77, 1024), image_embeddings=torch.zeros(1, 1, 1024),
                      image_latents=latent, fps=8)
    return Inversion(latents={t: latent for t in range(1, 1000, 20)}, source_condition=row,
                     source_first_frame=torch.zeros(1, 512, 512, 3), backbone_name="i2vgen-xl", num_frames=16, fps=8,
                     inversion_steps=500, sampling_steps=50)


SMOKE = ["--videos", "1", "--edits", "3", "--frames", "4", "--inversion-steps", "2", "--steps", "1"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--edits", type=int, default=3, help="edits per video")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--inversion-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    import ray

    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_tiny_i2vgenxl(folder / "tiny-i2vgenxl")
        jobs = make_jobs(folder, model, args)
        jobs_file = folder / "jobs.jsonl"
        jobs_file.write_text("".join(json.dumps(job) + "\n" for job in jobs))
        print(f"{len(jobs)} jobs: {args.videos} videos x {args.edits} edits, {args.frames} frames of {args.size}x"
              f"{args.size}, {args.inversion_steps} inversion / {args.steps} sampling steps, torch {torch.__version__}")

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        per_minute = {workers: ray_throughput(jobs_file, folder, workers, len(jobs)) for workers in (1, 2)}
        ray.shutdown()
        print("\nRay workers | jobs/min, whole run | jobs/min, after start-up | s per job in its worker")
        for workers, (whole, steady, job_seconds) in per_minute.items():
            print(f"{workers:11d} | {whole:18.1f} | {steady:24.1f} | {job_seconds:23.2f}")
        print(f"2 workers / 1: {per_minute[2][0] / per_minute[1][0]:.2f}x whole run, "
              f"{per_minute[2][1] / per_minute[1][1]:.2f}x after start-up")

        saving = invert_once_saving(jobs_file, folder, jobs)
        print(f"\ninvert once, edit many ({args.edits} edits per video, in this process):")
        print(f"  batch runner   {saving['batch_s']:6.1f} s compute, {saving['batch_inversion_calls']} inversion UNet calls")
        print(f"  edit per job   {saving['single_s']:6.1f} s compute, {saving['single_inversion_calls']} inversion UNet calls")
        print(f"  saved          {saving['single_s'] - saving['batch_s']:6.1f} s "
              f"({1 - saving['batch_s'] / saving['single_s']:.0%}), {saving['single_s'] / saving['batch_s']:.2f}x faster")

        cached = next((folder / "out-1-workers" / "inversions").glob("*.safetensors"))
        print(f"\ninversion cache per clip: {cached.stat().st_size / 2**20:.2f} MiB here; an I2VGen-XL clip at its "
              f"defaults: {cache_file_mib(i2vgenxl_default_inversion(), folder):.1f} MiB")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
