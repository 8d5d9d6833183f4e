"""Peak GPU memory and time per phase of an AnyV2V edit with the real I2VGen-XL architecture.

    python benchmarks/gpu.py                    # 500 inversion / 50 sampling steps, as the reference
    python benchmarks/gpu.py --quick            # 50 / 25 steps
    python benchmarks/gpu.py --offload model --frames 16 64
    python benchmarks/gpu.py --device cpu --tiny --inversion-steps 4 --steps 2   # the same code path, on a CPU

The networks are I2VGen-XL's published architecture (`i2vgenxl_configs.json`) with random
weights, built on the execution device: speed and memory do not depend on the weight values, so
no download is needed. For each offload policy and frame count, one edit at 512x512 runs phase by
phase as the ComfyUI nodes run it (inversion, injected sampling, decode); each phase reports its
time and the peak memory allocated on the device during it (`torch.cuda.max_memory_allocated`,
reset before the phase; weights resident on the device count). Frame counts longer than the
window run twice: all frames at once (the reference's approach) and in temporal context windows.
A row that runs out of memory prints OOM (one the engine refuses, refused) and the table goes on.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overhead import markdown, peak_rss_mib, reset_peak_rss  # noqa: E402  (benchmarks/ is this script's folder)

from anyv2v_core.backbones.i2vgen_xl import I2VGenXLBackbone  # noqa: E402
from anyv2v_core.errors import AnyV2VError, AnyV2VOutOfMemory  # noqa: E402
from anyv2v_core.injection import InjectionSettings  # noqa: E402
from anyv2v_core.inversion import check_inversion_steps, invert_video  # noqa: E402
from anyv2v_core.memory import OFFLOAD_POLICIES  # noqa: E402
from anyv2v_core.pipeline import EditSettings  # noqa: E402
from anyv2v_core.sampling import sample_edit  # noqa: E402
from anyv2v_core.tiny_models import moving_square_video, write_tokenizer  # noqa: E402
from anyv2v_core.windows import ContextWindows  # noqa: E402

CONFIGS = Path(__file__).with_name("i2vgenxl_configs.json")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROMPT = "a blue square moving over a gradient"
GIB = 2**30


def build_backbone(config: dict, device: torch.device, dtype: torch.dtype, scratch: Path) -> I2VGenXLBackbone:
    """I2VGen-XL with random weights. Each network is initialised on `device` (fast on a GPU) and
    cast before the next is built, so the float32 copy of only one network exists at a time.
    The tokenizer is byte-level (no merges): prompts tokenize to other ids than CLIP's, which costs
    the same."""
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    builders = {
        "unet": lambda: I2VGenXLUNet.from_config(config["unet"]),
        "vae": lambda: AutoencoderKL.from_config(config["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**config["image_encoder"])),
    }
    networks = {}
    for name, build in builders.items():
        with torch.device(device):
            network = build()
        # torch's own `to`: diffusers' override warns about modules kept in float32, which these configs lack
        networks[name] = torch.nn.Module.to(network, dtype).eval().requires_grad_(False)
    write_tokenizer(scratch / "tokenizer")
    return I2VGenXLBackbone(**networks, tokenizer=CLIPTokenizer.from_pretrained(scratch / "tokenizer"),
                            clip_image_config=config["feature_extractor"], scheduler_config=config["scheduler"],
                            device=device, dtype=dtype)


class Meter:
    """Time and peak memory of one phase: the CUDA allocator's peak on a GPU; on the CPU, how far
    the process's resident set rose above its level at the phase's start, after the C allocator
    handed its free memory back to the system (else a phase reusing memory a larger earlier phase
    freed would show no rise; indicative only, and glibc only)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.libc = None if self.cuda else ctypes.CDLL(ctypes.util.find_library("c"))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def resident_gib(self) -> float | str:
        return torch.cuda.memory_allocated() / GIB if self.cuda else "n/a"

    def measure(self, phase: Callable):
        """(phase's result, seconds, peak GiB)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            gc.collect()
            self.libc.malloc_trim(0)
            reset_peak_rss()
            start_rss = peak_rss_mib() / 1024
        start = time.perf_counter()
        result = phase()
        self.sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / GIB if self.cuda else peak_rss_mib() / 1024 - start_rss
        return result, seconds, peak


def edit_phases(backbone, meter: Meter, frames: torch.Tensor, windows: ContextWindows | None, *,
                inversion_steps: int, steps: int, decode_chunk_size: int) -> dict[str, tuple[float, float]]:
    """{phase: (seconds, peak GiB)} of one edit at the backbone's default settings."""
    d = backbone.defaults
    edited_first_frame = frames[:1].flip(-1)  # stands in for an edited first frame
    inversion, *inverting = meter.measure(lambda: invert_video(
        backbone, frames, inversion_steps=inversion_steps, sampling_steps=steps, fps=d.fps, windows=windows))
    latents, *sampling = meter.measure(lambda: sample_edit(
        backbone, inversion, edited_first_frame, prompt=PROMPT, negative_prompt=d.negative_prompt,
        injection=InjectionSettings(), cfg=d.cfg, start_index=d.start_index))
    _, *decoding = meter.measure(lambda: backbone.decode(latents, decode_chunk_size))
    return {"inversion": tuple(inverting), "sampling": tuple(sampling), "decode": tuple(decoding)}


def free_memory(meter: Meter) -> None:
    gc.collect()
    if meter.cuda:
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--offload", nargs="+", choices=OFFLOAD_POLICIES, default=list(OFFLOAD_POLICIES))
    parser.add_argument("--frames", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--window", type=int, default=ContextWindows().length,
                        help="context window length for frame counts above it; 0: all frames at once only")
    parser.add_argument("--window-overlap", type=int, default=ContextWindows().overlap)
    parser.add_argument("--quick", action="store_true", help="50 inversion / 25 sampling steps")
    parser.add_argument("--inversion-steps", type=int, default=None, help="default: 500 (--quick: 50)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps; default: 50 (--quick: 25)")
    parser.add_argument("--size", type=int, default=None, help="frame width and height; default 512 (--tiny: 32)")
    parser.add_argument("--decode-chunk-size", type=int, default=EditSettings().decode_chunk_size)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny to check the script")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny config of the same architecture (CPU check)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device is available (torch.cuda.is_available() is False). This benchmark "
                 "measures GPU memory and time: run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
                 "or check its code path on the CPU with --device cpu --tiny.")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU mode checks the code path; one thread leaves a shared machine usable
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    inversion_steps = args.inversion_steps or (50 if args.quick else 500)
    steps = args.steps or (25 if args.quick else 50)
    size = args.size or (32 if args.tiny else 512)
    windows = ContextWindows(args.window, args.window_overlap) if args.window else None
    config = json.loads(CONFIGS.read_text())["tiny" if args.tiny else "i2vgen-xl"]

    with tempfile.TemporaryDirectory() as scratch:
        backbone = build_backbone(config, device, dtype, Path(scratch))
    check_inversion_steps(backbone, inversion_steps, steps)
    meter = Meter(device)
    name = torch.cuda.get_device_name(device) if meter.cuda else "CPU"
    unit = "GiB allocated" if meter.cuda else "GiB RSS rise"
    print(f"### AnyV2V on I2VGen-XL{' (tiny config)' if args.tiny else ''}, random weights: {name}, {str(dtype)[6:]}, "
          f"{size}x{size}, {inversion_steps} inversion / {steps} sampling steps, torch {torch.__version__}\n", flush=True)

    # warm-up (kernel selection, lazy initialisation, the prompt cache): not measured
    backbone.set_offload(args.offload[0], device)
    edit_phases(backbone, meter, moving_square_video(min(args.frames), size), windows,
                inversion_steps=1, steps=1, decode_chunk_size=args.decode_chunk_size)

    header = ["offload", "frames", "approach", "resident at start GiB", "inversion s", f"inversion peak {unit}",
              "sampling s", f"sampling peak {unit}", "decode s", f"decode peak {unit}", "total s", f"peak {unit}"]
    print(markdown(header, []), flush=True)  # rows print as they finish: a full run takes hours
    for policy in args.offload:
        backbone.set_offload(policy, device)
        for num_frames in args.frames:
            frames = moving_square_video(num_frames, size)
            approaches = [("all frames", None)]
            if windows is not None and num_frames > windows.length:
                approaches.append((f"windows {windows.length}/{windows.overlap}", windows))
            for approach, row_windows in approaches:
                free_memory(meter)
                resident = meter.resident_gib()
                try:
                    phases = edit_phases(backbone, meter, frames, row_windows, inversion_steps=inversion_steps,
                                         steps=steps, decode_chunk_size=args.decode_chunk_size)
                except (torch.OutOfMemoryError, AnyV2VOutOfMemory):  # the engine wraps OOM in inversion and sampling
                    row = [policy, num_frames, approach, resident, *["OOM"] * 8]
                except AnyV2VError as error:  # e.g. a frame count the engine refuses without windows
                    print(error, file=sys.stderr)
                    row = [policy, num_frames, approach, resident, *["refused"] * 8]
                else:
                    cells = [value for phase in phases.values() for value in phase]
                    total = sum(seconds for seconds, _ in phases.values())
                    row = [policy, num_frames, approach, resident, *cells, total,
                           max(peak for _, peak in phases.values())]
                print(markdown(header, [row]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
