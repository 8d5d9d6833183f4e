"""The native path (a ComfyUI MODEL through nodes/comfy_wan.py) next to the diffusers path (anyv2v_core's
WanBackbone) on the same tiny Wan 2.1 I2V transformer weights: time, peak memory and model calls of
an inversion plus an injected edit, rows batched and one at a time. CPU, one thread.

    <ComfyUI's python> benchmarks/native_vs_diffusers.py --comfyui ../shared/comfyui [--steps 10] [--frames 33]

Run it with the Python of a ComfyUI environment that also has the pack's requirements (`.ci/run`
builds one under ~/.cache/anyv2v-ci/comfyui-*). Each configuration runs in its own process. The
conditioning rows and the clean latents are the same seeded tensors in both paths, so the loops are
compared, not the encoders (the VAE is not used).
Times are the fastest of --repeats runs; peak memory is the resident set's rise above its value when
the first run's inversion starts, sampled every 2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakResident:
    """The highest resident set size seen while the block runs, above its value at the start (MiB)."""

    def __enter__(self):
        self.start = self.peak = self.resident()
        self.running = True
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @staticmethod
    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    def watch(self):
        while self.running:
            self.peak = max(self.peak, self.resident())
            time.sleep(0.002)

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def run_one(path: str, row_mode: str, comfyui: str, steps: int, frames: int, size: int, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    from anyv2v_core.injection import InjectionSettings
    from anyv2v_core.inversion import invert_video
    from anyv2v_core.sampling import sample_edit
    from anyv2v_core.testing.tiny_models import moving_square_video, original_wan_state_dict, tiny_wan_transformer

    transformer = tiny_wan_transformer("wan2.1-i2v", seed=0, comfyui_dims=True).eval()
    latent_frames, latent_size = (frames - 1) // 4 + 1, size // 8
    generator = torch.Generator().manual_seed(0)

    def tensors():  # one row's conditioning: text, [mask | first-frame latents], CLIP image tokens
        mask = torch.zeros(1, 4, latent_frames, latent_size, latent_size)
        mask[:, :, 0] = 1
        return (torch.randn(1, 512, 4096, generator=generator) * 0.1,
                torch.cat([mask, torch.randn(1, 16, latent_frames, latent_size, latent_size, generator=generator)], 1),
                torch.randn(1, 257, 1280, generator=generator))

    conditioning = [tensors() for _ in range(3)]  # source, negative, positive
    if path == "diffusers":
        from diffusers import AutoencoderKLWan

        from anyv2v_core.backbones.wan import WAN21_I2V_DEFAULTS, WanBackbone, WanRow
        from anyv2v_core.flow_schedule import FlowMatchingSchedule

        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
        backbone = WanBackbone(name="wan2.1-i2v", defaults=WAN21_I2V_DEFAULTS, schedule=FlowMatchingSchedule(shift=8.0),
                               transformers={"transformer": transformer}, vae=vae, text_encoder=None, tokenizer=None,
                               device=torch.device("cpu"), dtype=torch.float32)
        rows = [WanRow(text_embeddings=text, image_condition=image, image_embeddings=clip)
                for text, image, clip in conditioning]
        network = transformer
    else:
        sys.path.insert(0, comfyui)
        os.chdir(comfyui)
        from comfy.cli_args import args

        args.cpu = True
        # ComfyUI's attention on NVIDIA GPUs (its CPU default is its split attention): the kernel
        # diffusers uses, so that both paths run the same attention
        args.use_pytorch_cross_attention = True
        import comfy.sd

        import importlib.util

        # the pack as ComfyUI imports it, under a package name (its nodes import each other relatively)
        spec = importlib.util.spec_from_file_location("anyv2v", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        sys.modules["anyv2v"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["anyv2v"])
        comfy_wan = importlib.import_module("anyv2v.nodes.comfy_wan")
        patcher = comfy.sd.load_diffusion_model_state_dict(original_wan_state_dict(transformer))
        # the loops need no VAE (see encode_video below): an object with the Wan 2.1 VAE's factors
        wan21_vae = types.SimpleNamespace(latent_channels=16, spacial_compression_encode=lambda: 8,
                                          temporal_compression_decode=lambda: 4)
        backbone = comfy_wan.native_wan_backbone(patcher, vae=wan21_vae)
        rows = [comfy_wan.ComfyWanRow(c_crossattn=text, c_concat=image, clip_fea=clip) for text, image, clip in conditioning]
        network = patcher.model.diffusion_model
    backbone.one_row_at_a_time = row_mode == "one at a time"
    # the same clean latents in both paths, so that the loops are what is measured
    clean = torch.randn(1, 16, latent_frames, latent_size, latent_size, generator=generator)
    backbone.encode_video = lambda frames, generator=None: clean
    calls = []
    network.register_forward_pre_hook(lambda module, args: calls.append(1))
    source = moving_square_video(frames, size)
    times, rises = [], []
    for _ in range(repeats):  # the fastest run: on a shared machine the others measure the neighbours too
        calls.clear()
        with torch.inference_mode(), PeakResident() as memory:
            started = time.perf_counter()
            with phase(backbone, rows=1, frames=frames, size=size):
                inversion = invert_video(backbone, source, inversion_steps=steps, sampling_steps=steps,
                                         source_row=rows[0])
            inverted = time.perf_counter()
            with phase(backbone, rows=3, frames=frames, size=size):
                sample_edit(backbone, inversion, source[:1], prompt="", negative_prompt="", cfg=5.0,
                            injection=InjectionSettings(attention_tau=0.5), edit_rows=(rows[1], rows[2]))
            times.append((inverted - started, time.perf_counter() - inverted))
        rises.append(memory.rise_mib)
    return {"inversion_s": min(t[0] for t in times), "sampling_s": min(t[1] for t in times), "calls": len(calls),
            "peak_rise_mib": rises[0]}  # the first run's: later runs reuse the memory the first one freed


def phase(backbone, *, rows: int, frames: int, size: int):
    """The native backbone's node phase (ComfyUI's sampler protocol: load, pre_run, cleanup); none for diffusers'."""
    running = getattr(backbone, "running", None)
    return running(rows=rows, frames=frames, size_wh=(size, size)) if running else contextlib.nullcontext()
SMOKE = ["--steps", "1", "--frames", "5", "--size", "32", "--repeats", "1"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=REPO.parent / "shared" / "comfyui")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest is reported")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    if args.one:
        print(json.dumps(run_one(*args.one, str(args.comfyui.resolve()), args.steps, args.frames, args.size,
                                 args.repeats)))
        return
    print(f"tiny Wan 2.1 I2V (1 head of 128, 2 blocks), {args.frames} frames at {args.size}x{args.size}, "
          f"{args.steps} steps of order 2, attention tau 0.5, CPU, 1 thread")
    print("| path | rows | inversion s | sampling s | model calls | peak RSS rise MiB |")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for path in ("diffusers", "native"):
        for rows in ("batched", "one at a time"):
            output = subprocess.run([sys.executable, __file__, "--one", path, rows, "--comfyui", str(args.comfyui),
                                     "--steps", str(args.steps), "--frames", str(args.frames), "--size", str(args.size),
                                     "--repeats", str(args.repeats)],
                                    capture_output=True, text=True, env=env, cwd=REPO)
            if output.returncode:
                sys.exit(f"{path} / {rows} failed:\n{output.stderr[-3000:]}")
            result = json.loads(output.stdout.strip().splitlines()[-1])
            print(f"| {path} | {rows} | {result['inversion_s']:.2f} | {result['sampling_s']:.2f} | {result['calls']} "
                  f"| {result['peak_rise_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
