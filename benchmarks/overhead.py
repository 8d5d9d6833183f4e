"""How much of an AnyV2V edit is the UNet itself? The engine's overhead on a tiny model, on the CPU.

    python benchmarks/overhead.py [--frames 8] [--size 32] [--inversion-steps 50] [--steps 25]
                                  [--repeats 2] [--threads 1] [--clock cpu|wall] [--model DIR] [--profile N]

One `pipeline.edit` on a tiny random I2VGen-XL (built in a temp folder, or `--model DIR`), in
three kinds of runs:
1. a recording run (also the warm-up): a forward pre-hook on the UNet clones the inputs of every
   UNet call, with the injection state (active kinds, rows) the sampling loop set for it;
2. `--repeats` timed runs, each followed by a replay of the recorded calls through the bare UNet.
   Replaying the same inputs with no injection hooks is the lower bound of what any loop around
   this UNet can cost ("UNet-only"): loop time / UNet-only time is the loop's overhead, 1.0 at
   best. The sampling calls are also replayed with the injection hooks installed and set as they
   were, which prices the injection copies themselves;
3. the sampling loop again with `keep_source_row=True` (the reference's batch: the source row at
   every step), to count the row-evaluations the source-row drop saves.
Each timed run also times the UNet forwards inside the loops (pre/post forward hooks): loop time
over that is the same overhead measured within one run, which a busy machine disturbs far less
than the comparison of two runs. Timings are the minimum over the repeats, in process CPU seconds
by default (with one thread and no I/O that is the wall time of an idle machine, without the
waits for a core that a shared machine adds; `--clock wall` measures elapsed time). The VAE and
the CLIP encoders are not loop time: they have their own rows.
Peak memory is the process's peak resident set per phase (VmHWM, reset before each phase of the
first timed run): weights, activations and the Python heap together.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core import pipeline  # noqa: E402
from anyv2v_core.injection import FeatureInjector, InjectionPlan, InjectionSettings, injected  # noqa: E402
from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.plan import EditSettings  # noqa: E402
from anyv2v_core.sampling import sample_edit  # noqa: E402
from anyv2v_core.testing.tiny_models import build_tiny_i2vgenxl, moving_square_video  # noqa: E402

PHASES = ("inversion", "sampling")
PROMPT = "a blue square moving over a gradient"


# ---------------------------------------------------------------------------------------------- measuring


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


class Clock:
    """Exclusive time per name: time spent in a nested timed span counts for the inner name only."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.totals: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, start, time of nested spans]

    def start(self, name: str) -> None:
        self._open.append([name, self.now(), 0.0])

    def stop(self) -> None:
        name, start, nested = self._open.pop()
        elapsed = self.now() - start
        self.totals[name] += elapsed - nested
        if self._open:
            self._open[-1][2] += elapsed

    def wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            self.start(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.stop()

        return timed


@contextmanager
def patched(owner, name: str, value) -> Iterator[None]:
    """Set `owner.name` for the block; restore it (or drop an instance attribute) afterwards."""
    had, old = name in vars(owner), vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets VmHWM to the current RSS (Linux)
        clear_refs.write("5")


@dataclass
class UNetCall:
    phase: str
    args: tuple
    kwargs: dict
    injection: tuple[tuple[str, ...], int] | None  # (active kinds, rows) given to the injector; None: no hooks

    @property
    def rows(self) -> int:
        return int(self.args[0].shape[0])


def cloned(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


@dataclass
class EditRun:
    """What one instrumented `pipeline.edit` measured."""

    seconds: dict[str, float]  # exclusive time: the loops' own code, unet:<phase>, condition, vae ..., edit (glue)
    peak_rss_mib: dict[str, float]
    calls: list[UNetCall]
    result: pipeline.EditResult


def run_edit(backbone, frames, first_frame, settings: EditSettings, now: Callable[[], float], *,
             record: bool = False) -> EditRun:
    """`pipeline.edit` with every phase timed and, when `record`, every UNet call's inputs cloned.

    The loops' exclusive time is what remains of `run_inversion` / `run_sampling` once the UNet
    forward and the conditioning encoders are taken out: the loops' own overhead.
    """
    clock, calls, peaks = Clock(now), [], {}
    state = {"phase": "prepare", "injection": None}

    def phase(name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def entered(*args, **kwargs):
            state["phase"], state["injection"] = name, None
            reset_peak_rss()
            try:
                return clock.wrap(name, function)(*args, **kwargs)
            finally:
                peaks[name] = peak_rss_mib()

        return entered

    def unet_pre(module, args, kwargs):
        if record:
            calls.append(UNetCall(state["phase"], tuple(cloned(a) for a in args),
                                  {k: cloned(v) for k, v in kwargs.items()}, state["injection"]))
        clock.start(f"unet:{state['phase']}")

    def unet_post(module, args, kwargs, output):
        clock.stop()

    set_step = FeatureInjector.set_step

    def recording_set_step(injector, active_kinds, num_rows):
        state["injection"] = (active_kinds, num_rows)
        set_step(injector, active_kinds, num_rows)

    with ExitStack() as stack:
        stack.enter_context(patched(pipeline, "run_inversion", phase("inversion", pipeline.run_inversion)))
        stack.enter_context(patched(pipeline, "run_sampling", phase("sampling", pipeline.run_sampling)))
        stack.enter_context(patched(FeatureInjector, "set_step", recording_set_step))
        # condition() encodes the first frame through encode_video: the clock keeps them apart
        stack.enter_context(patched(backbone, "condition", clock.wrap("condition", backbone.condition)))
        stack.enter_context(patched(backbone, "encode_video", clock.wrap("vae encode", backbone.encode_video)))
        stack.enter_context(patched(backbone, "decode", phase("vae decode", backbone.decode)))
        handles = [backbone.unet.register_forward_pre_hook(unet_pre, with_kwargs=True),
                   backbone.unet.register_forward_hook(unet_post, with_kwargs=True)]
        stack.callback(lambda: [handle.remove() for handle in handles])
        result = clock.wrap("edit", pipeline.edit)(backbone, frames, first_frame, prompt=PROMPT, settings=settings)
    peaks["edit"] = max(peaks.values())
    return EditRun(dict(clock.totals), peaks, calls, result)


@torch.inference_mode()
def replay(backbone, calls: list[UNetCall], now: Callable[[], float], *, with_injection: bool) -> float:
    """Time of the recorded calls through the UNet alone; with the injection hooks set as they
    were when `with_injection` (calls made without hooks replay without them)."""
    plan = InjectionPlan.build(0, InjectionSettings(), backbone.injection_layers)  # hooks only, never active
    with injected(backbone.unet, plan) if with_injection else nullcontext() as injector:
        start = now()
        for call in calls:
            if injector is not None:
                injector.set_step(*(call.injection or ((), 1)))
            backbone.unet(*call.args, **call.kwargs)
        return now() - start


def count(calls: list[UNetCall]) -> tuple[int, int]:
    """(UNet calls, batch rows summed over calls)."""
    return len(calls), sum(call.rows for call in calls)


def counting_rows(unet: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    rows: list[int] = []
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(int(args[0].shape[0])))
    return rows, handle


# ---------------------------------------------------------------------------------------------- report


def markdown(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def profile_edit(backbone, frames, first_frame, settings: EditSettings, top: int) -> None:
    """cProfile one edit and print its top functions by cumulative time: what is not under the UNet's
    forward there is what a leaner engine could save."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(pipeline.edit, backbone, frames, first_frame, prompt=PROMPT, settings=settings)
    stats = pstats.Stats(profiler)
    print(f"\n### cProfile of one edit: top {top} functions by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(top)


SMOKE = ["--frames", "4", "--inversion-steps", "2", "--steps", "2", "--repeats", "1"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="frame width and height in pixels")
    parser.add_argument("--inversion-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (each followed by its UNet-only replays)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 keeps timings stable on a shared machine)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="cpu: process CPU time, which on one thread is the wall time of an idle machine and "
                             "ignores waits for a busy core; wall: elapsed time (use on an idle machine)")
    parser.add_argument("--model", type=Path, default=None, help="an I2VGen-XL diffusers folder (default: a tiny random one)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also cProfile one edit and print its top N functions by cumulative time")
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(args.threads)
    now = CLOCKS[args.clock]

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or build_tiny_i2vgenxl(Path(scratch) / "tiny-i2vgenxl")
        backbone = load_backbone(model_dir, dtype="fp32", device="cpu")
    source = moving_square_video(args.frames, args.size)
    edited_first_frame = source[:1].flip(-1)  # stands in for an edited first frame
    settings = EditSettings(size_wh=(args.size, args.size), num_frames=args.frames,
                                     inversion_steps=args.inversion_steps, steps=args.steps)
    resolved = settings.resolved(backbone.defaults)
    taus = resolved.injection

    recorded = run_edit(backbone, source, edited_first_frame, settings, now, record=True).calls
    calls = {name: [call for call in recorded if call.phase == name] for name in PHASES}
    runs, bare, hooked = [], defaultdict(list), []
    for _ in range(args.repeats):  # interleaved, so a busy spell on the machine hits both sides alike
        runs.append(run_edit(backbone, source, edited_first_frame, settings, now))
        for name in PHASES:
            bare[name].append(replay(backbone, calls[name], now, with_injection=False))
        hooked.append(replay(backbone, calls["sampling"], now, with_injection=True))

    def best(key: str) -> float:
        return min(run.seconds.get(key, 0.0) for run in runs)

    rows_kept, handle = counting_rows(backbone.unet)
    try:
        start = now()
        kept = sample_edit(backbone, runs[0].result.inversion, edited_first_frame, prompt=PROMPT,
                           negative_prompt=resolved.negative_prompt, injection=taus, cfg=resolved.cfg,
                           keep_source_row=True)
        kept_seconds = now() - start
    finally:
        handle.remove()

    def loop(run: EditRun, names: tuple[str, ...]) -> float:  # the loops' own code + their UNet forwards
        return sum(run.seconds[name] + run.seconds[f"unet:{name}"] for name in names)

    def in_run_ratio(names: tuple[str, ...]) -> str:  # both sides from the same moments: robust to machine load
        return f"{min(loop(run, names) / sum(run.seconds[f'unet:{n}'] for n in names) for run in runs):.3f}"

    table = []
    for names, label in [(("inversion",), "inversion loop"), (("sampling",), "sampling loop"), (PHASES, "**both loops**")]:
        wall = min(loop(run, names) for run in runs)
        in_pipeline = min(sum(run.seconds[f"unet:{name}"] for name in names) for run in runs)
        unet_only = sum(min(bare[name]) for name in names)
        table.append([label, *count([call for call in recorded if call.phase in names]), wall, in_pipeline,
                      unet_only, in_run_ratio(names), f"{wall / unet_only:.3f}"])
    for key, label in [("condition", "conditioning (CLIP text + image, first-frame latents)"),
                       ("vae encode", "VAE encode (source frames)"), ("vae decode", "VAE decode"),
                       ("edit", "other (resize, glue)")]:
        table.append([label, "", "", best(key), "", "", "", ""])
    table.append(["**edit total**", "", "", min(sum(run.seconds.values()) for run in runs), "", "", "", ""])

    print(f"\n### Engine overhead: {args.frames} frames {args.size}x{args.size}, {args.inversion_steps} inversion / "
          f"{args.steps} sampling steps, taus conv {taus.conv_tau} spatial {taus.spatial_tau} temporal "
          f"{taus.temporal_tau}, {args.threads} thread(s), {args.clock} seconds, min of {args.repeats} runs\n")
    print(markdown(["phase", "UNet calls", "UNet rows", "s", "UNet in pipeline s", "UNet-only replay s",
                    "s / UNet in pipeline", "s / UNet-only"], table))
    print(f"\nSampling calls replayed with the injection hooks set as they were: {min(hooked):.3f} s "
          f"(bare {min(bare['sampling']):.3f} s: the injection copies cost "
          f"{min(hooked) / min(bare['sampling']) - 1:+.1%} of the sampling UNet time).\n")

    sampling_rows, inversion_rows = count(calls["sampling"])[1], count(calls["inversion"])[1]
    saved = sum(rows_kept) - sampling_rows
    print(markdown(["sampling batch", "UNet rows", "s", "max abs difference of the latents"], [
        ["source row dropped after the last injection step (default)", sampling_rows,
         min(loop(run, ("sampling",)) for run in runs), "0 (reference)"],
        ["source row at every step (keep_source_row=True, as the reference)", sum(rows_kept), kept_seconds,
         f"{float((kept - runs[0].result.latents).abs().max()):.1e}"],
    ]))
    print(f"\nThe source-row drop saves {saved} of {sum(rows_kept)} sampling row-evaluations "
          f"({saved / sum(rows_kept):.0%}), {saved / (sum(rows_kept) + inversion_rows):.0%} of the edit's "
          f"(inversion: {inversion_rows}).\n")

    peaks = runs[0].peak_rss_mib
    print(markdown(["phase", "peak RSS MiB"],
                   [[name, f"{peaks[name]:.0f}"] for name in ("inversion", "sampling", "vae decode", "edit")]))
    if args.profile:
        profile_edit(backbone, source, edited_first_frame, settings, args.profile)


if __name__ == "__main__":
    main()
