"""Peak GPU memory and time per phase of an AnyV2V edit with a real architecture (I2VGen-XL or Wan).

    python benchmarks/gpu.py                    # I2VGen-XL, 500 inversion / 50 sampling steps, as the reference
    python benchmarks/gpu.py --quick            # 50 / 25 steps
    python benchmarks/gpu.py --offload model --frames 16 64
    python benchmarks/gpu.py --model wan2.1-i2v --dtype bf16 --offload none --rows batched one-at-a-time
    python benchmarks/gpu.py --device cpu --tiny --inversion-steps 4 --steps 2   # the same code path, on a CPU
    python benchmarks/gpu.py --device cpu --tiny --model wan2.2-ti2v --frames 9 --steps 2 --inversion-steps 2
    python benchmarks/gpu.py --device standin --tiny --quick --model wan2.1-i2v --frames 9   # a GPU's device rules, no GPU

The networks are the published architectures (`i2vgenxl_configs.json`, `wan_configs.json`: Wan 2.1
I2V 14B with its UMT5-XXL and CLIP ViT-H encoders, Wan 2.2 I2V A14B's two experts, Wan 2.2 TI2V 5B)
with random weights, built on the execution device (the Wan VAE in float32, as the engine runs it): speed and memory do not depend on the weight values, so
no download is needed. For each offload policy, rows mode (Wan) and frame count, one edit at the
model's size (I2VGen-XL 512x512, Wan its default) runs phase by phase as the nodes run it (inversion,
injected sampling, decode) at the model's default settings; each phase reports its
time and the peak memory allocated on the device during it (`torch.cuda.max_memory_allocated`,
reset before the phase; weights resident on the device count). Frame counts longer than the
window run twice: all frames at once (the reference's approach) and in temporal context windows.
A row that runs out of memory prints OOM (one the engine refuses, refused) and the table goes on.
`--device standin` runs the tiny check on `anyv2v_core.testing.device_standin`'s stand-in GPU (the weights
built on the CPU, every phase under the offload policies with CUDA's device rules).
"""

from __future__ import annotations

import argparse
import contextlib
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
from anyv2v_core.inversion import invert_video  # noqa: E402
from anyv2v_core.memory import OFFLOAD_POLICIES  # noqa: E402
from anyv2v_core.plan import EditSettings  # noqa: E402
from anyv2v_core.sampling import sample_edit  # noqa: E402
from anyv2v_core.testing.tiny_models import build_tiny_wan, moving_square_video  # noqa: E402
from anyv2v_core.toy.components import write_character_tokenizer, write_tokenizer  # noqa: E402
from anyv2v_core.windows import ContextWindows  # noqa: E402

CONFIGS = Path(__file__).with_name("i2vgenxl_configs.json")
WAN_CONFIGS = Path(__file__).with_name("wan_configs.json")
MODELS = ("i2vgen-xl", "wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v")
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


def build_wan_backbone(kind: str, config: dict, device: torch.device, dtype: torch.dtype, scratch: Path):
    """A Wan backbone of the published architecture with random weights, each network initialised on
    `device` and cast before the next is built. The tokenizer has one token per character."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config,
                              UMT5EncoderModel)

    from anyv2v_core.backbones.wan import WAN_DEFAULTS, WanBackbone, WanTI2VBackbone
    from anyv2v_core.flow_schedule import FlowMatchingSchedule

    def built(build, network_dtype):
        with torch.device(device):
            network = build()
        return torch.nn.Module.to(network, network_dtype).eval().requires_grad_(False)

    experts = {name: built(lambda c=expert: WanTransformer3DModel.from_config(c), dtype)
               for name, expert in config["experts"].items()}
    vae = built(lambda: AutoencoderKLWan.from_config(config["vae"]), torch.float32)
    text_encoder = built(lambda: UMT5EncoderModel(UMT5Config(**config["text_encoder"])), dtype)
    image_encoder = image_processor = None
    if "image_encoder" in config:
        image_encoder = built(lambda: CLIPVisionModel(CLIPVisionConfig(**config["image_encoder"])), dtype)
        image_processor = CLIPImageProcessor(**config["image_processor"])
    write_character_tokenizer(scratch / "tokenizer")
    defaults = WAN_DEFAULTS[kind]
    backbone_class = WanTI2VBackbone if kind == "wan2.2-ti2v" else WanBackbone
    return backbone_class(name=kind, defaults=defaults, schedule=FlowMatchingSchedule(shift=defaults.shift),
                          transformers=experts, vae=vae, text_encoder=text_encoder,
                          tokenizer=AutoTokenizer.from_pretrained(scratch / "tokenizer"), image_encoder=image_encoder,
                          image_processor=image_processor, boundary_ratio=config.get("boundary_ratio"),
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
    backbone.schedule.check_inversion_steps(inversion_steps, steps, backbone.inversion_order)
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


SMOKE = ["--device", "cpu", "--tiny", "--inversion-steps", "2", "--steps", "1", "--frames", "4", "--window", "0",
         "--offload", "none"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="i2vgen-xl")
    parser.add_argument("--offload", nargs="+", choices=OFFLOAD_POLICIES, default=list(OFFLOAD_POLICIES))
    parser.add_argument("--rows", nargs="+", choices=("batched", "one-at-a-time"), default=["batched"],
                        help="Wan: the source, negative and positive rows batched or one at a time per block")
    parser.add_argument("--frames", nargs="+", type=int, default=None,
                        help="default: 16 32 64 128 (Wan: its default, 81 or 121)")
    parser.add_argument("--window", type=int, default=None,
                        help="context window length for frame counts above it (default: 16; Wan 81 / 121); "
                             "0: all frames at once only")
    parser.add_argument("--window-overlap", type=int, default=None, help="default: 4 (Wan: 8)")
    parser.add_argument("--quick", action="store_true", help="50 inversion / 25 sampling steps (Wan: 10 and 10)")
    parser.add_argument("--inversion-steps", type=int, default=None,
                        help="default: 500 (--quick: 50); Wan: the model's default (--quick: 10)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps; default: 50 (--quick: 25); Wan: the model's default (--quick: 10)")
    parser.add_argument("--size", type=int, default=None,
                        help="frame width and height; default 512, Wan its default size (--tiny: 32, TI2V 64)")
    parser.add_argument("--decode-chunk-size", type=int, default=EditSettings().decode_chunk_size)
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), cuda:N, or cpu / standin (the stand-in GPU) with --tiny to check the script")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny config of the same architecture (CPU check)")
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    with contextlib.ExitStack() as stack:
        run(args, stack)


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    standin = args.device == "standin"
    if standin and not args.tiny:
        sys.exit("benchmarks/gpu.py: --device standin computes on the CPU: use it with --tiny")
    device = torch.device("cpu" if standin else args.device)  # where the networks are built
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device is available (torch.cuda.is_available() is False). This benchmark "
                 "measures GPU memory and time: run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
                 "or check its code path on the CPU with --device cpu --tiny.")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU mode checks the code path; one thread leaves a shared machine usable
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    wan = args.model != "i2vgen-xl"
    with tempfile.TemporaryDirectory() as scratch:
        if not wan:
            config = json.loads(CONFIGS.read_text())["tiny" if args.tiny else "i2vgen-xl"]
            backbone = build_backbone(config, device, dtype, Path(scratch))
        elif args.tiny:
            from anyv2v_core.loading import load_backbone

            backbone = load_backbone(build_tiny_wan(Path(scratch) / "wan", args.model), dtype=dtype, device=device)
        else:
            backbone = build_wan_backbone(args.model, json.loads(WAN_CONFIGS.read_text())[args.model], device, dtype,
                                          Path(scratch))
    if standin:
        from anyv2v_core.testing.device_standin import StandInDevice

        device = stack.enter_context(StandInDevice()).device  # where they run
    d = backbone.defaults
    quick_steps = (10, 10) if wan else (50, 25)
    inversion_steps = args.inversion_steps or (quick_steps[0] if args.quick else d.inversion_steps)
    steps = args.steps or (quick_steps[1] if args.quick else d.sampling_steps)
    size_wh = (args.size, args.size) if args.size else (
        (d.size_multiple * 2,) * 2 if args.tiny and wan else (32, 32) if args.tiny else d.size_wh)
    frame_counts = args.frames or ([d.num_frames] if wan else [16, 32, 64, 128])
    window = d.num_frames if args.window is None and wan else ContextWindows().length if args.window is None else args.window
    overlap = args.window_overlap if args.window_overlap is not None else (8 if wan else ContextWindows().overlap)
    windows = ContextWindows(window, overlap) if window else None
    meter = Meter(device)
    name = torch.cuda.get_device_name(device) if meter.cuda else "the stand-in GPU" if standin else "CPU"
    unit = "GiB allocated" if meter.cuda else "GiB RSS rise"
    print(f"### AnyV2V on {args.model}{' (tiny config)' if args.tiny else ''}, random weights: {name}, {str(dtype)[6:]}, "
          f"{size_wh[0]}x{size_wh[1]}, {inversion_steps} inversion / {steps} sampling steps (order "
          f"{backbone.inversion_order}), torch {torch.__version__}\n", flush=True)

    # warm-up (kernel selection, lazy initialisation, the prompt cache): not measured
    backbone.set_offload(args.offload[0], device)
    warm_up_frames = d.usable_frame_count(min(frame_counts))
    edit_phases(backbone, meter, clip_frames(warm_up_frames, size_wh), None, inversion_steps=1, steps=1,
                decode_chunk_size=args.decode_chunk_size)

    header = ["offload", "rows", "frames", "approach", "resident at start GiB", "inversion s",
              f"inversion peak {unit}", "sampling s", f"sampling peak {unit}", "decode s", f"decode peak {unit}",
              "total s", f"peak {unit}"]
    print(markdown(header, []), flush=True)  # rows print as they finish: a full run takes hours
    for policy in args.offload:
        backbone.set_offload(policy, device)
        for rows in args.rows if wan else ["batched"]:
            backbone.one_row_at_a_time = rows == "one-at-a-time"
            for num_frames in frame_counts:
                frames = clip_frames(num_frames, size_wh)
                approaches = [("all frames", None)]
                if windows is not None and num_frames > windows.length:
                    approaches.append((f"windows {windows.length}/{windows.overlap}", windows))
                for approach, row_windows in approaches:
                    free_memory(meter)
                    resident = meter.resident_gib()
                    try:
                        phases = edit_phases(backbone, meter, frames, row_windows, inversion_steps=inversion_steps,
                                             steps=steps, decode_chunk_size=args.decode_chunk_size)
                    except (torch.OutOfMemoryError, AnyV2VOutOfMemory):  # the engine wraps OOM in its phases
                        row = [policy, rows, num_frames, approach, resident, *["OOM"] * 8]
                    except AnyV2VError as error:  # e.g. a frame count the engine refuses without windows
                        print(error, file=sys.stderr)
                        row = [policy, rows, num_frames, approach, resident, *["refused"] * 8]
                    else:
                        cells = [value for phase in phases.values() for value in phase]
                        total = sum(seconds for seconds, _ in phases.values())
                        row = [policy, rows, num_frames, approach, resident, *cells, total,
                               max(peak for _, peak in phases.values())]
                    print(markdown(header, [row]).splitlines()[-1], flush=True)


def clip_frames(num_frames: int, size_wh: tuple[int, int]) -> torch.Tensor:
    """A moving square clip [F, H, W, 3] at a (possibly non-square) working size."""
    side = max(size_wh)
    return moving_square_video(num_frames, side)[:, :size_wh[1], :size_wh[0]].contiguous()


if __name__ == "__main__":
    main()
