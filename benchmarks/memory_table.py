"""The memory each backbone needs in each memory mode, computed from the real architectures.

    python benchmarks/memory_table.py [--configs ../shared/docs/model-configs] [--dtype fp16]

Every network is built at its published size from its published config with fake tensors
(torch's FakeTensorMode: shapes and dtypes, no memory, no weights), so this runs on any machine
in about a minute. Weights are counted from the parameters and buffers in the weight dtype.
Activations are the peak of the bytes held by live intermediate tensors during one call, followed
op by op (a tensor is freed when its last reference goes, as with PyTorch's caching allocator),
at the backbone's native size and frame count:

- UNet: one call on 1 row (inversion), 2 rows (sampling once the source row is dropped) and
  3 rows (sampling with the source row), inputs included;
- VAE: encoding one frame, decoding one frame (decode chunk 1);
- text encoder: one prompt; image encoder: one image.

The memory modes' peaks are `memory.policy_peaks` (what the offloader holds on the device at the
worst moment of an edit, plus the activations then, times 1.1 for the allocator's fragmentation).
Not counted: the CUDA context and the kernels' workspaces (cuDNN, cuBLAS), for which a GPU is said
to fit a mode when the peak leaves 1 GiB of it free (`memory.auto_policy`, the `auto` mode).
Attention is counted as a fused kernel (flash / memory-efficient: no attention matrix), which
PyTorch uses for fp16 on every CUDA GPU and for bf16 from compute capability 8.0.

The UNet is also measured at half the native frames and half the native size, and the largest
bytes per element (row x frame x latent pixel, per byte of the weight dtype) of the three are the
coefficients `memory.activation_bytes` uses at any size (each backbone's `activation_profile`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overhead import markdown  # noqa: E402  (benchmarks/ is this script's folder)

from anyv2v_core.memory import (  # noqa: E402
    OFFLOAD_POLICIES, RESERVED_BYTES, ActivationProfile, policy_peaks, weight_bytes)
from anyv2v_core.plan import MAX_FACTOR  # noqa: E402

GIB = 2**30
CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "docs" / "model-configs"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GPU_SIZES_GIB = (8, 12, 16, 24)


class LivePeak(TorchDispatchMode):
    """The peak of the bytes held by tensors created inside the block and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (list, tuple)) else [result]
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                reference = StorageWeakRef(storage)
                if reference.cdata not in self.live:
                    self.live[reference.cdata] = (reference, storage.nbytes())
        for key in [key for key, (reference, _) in self.live.items() if reference.expired()]:
            del self.live[key]
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return result


def peak_of(call: Callable[[], object]) -> int:
    with LivePeak() as meter, torch.inference_mode():
        output = call()
        del output
    return meter.peak


# ---------------------------------------------------------------------------------------------- the architectures


def i2vgen_xl(configs: Path, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = configs / "ali-vilab--i2vgen-xl"
    read = lambda name: json.loads((folder / name / "config.json").read_text())  # noqa: E731
    unet = I2VGenXLUNet.from_config(read("unet"))
    vae = AutoencoderKL.from_config(read("vae"))
    text = CLIPTextModel(CLIPTextConfig(**read("text_encoder")))
    image = CLIPVisionModelWithProjection(CLIPVisionConfig(**read("image_encoder")))

    def unet_call(rows: int, frames: int, h: int):
        return lambda: unet(torch.randn(rows, 4, frames, h, h, dtype=dtype), torch.tensor([500] * rows),
                            fps=torch.tensor([8] * rows), image_latents=torch.randn(rows, 4, frames, h, h, dtype=dtype),
                            image_embeddings=torch.randn(rows, 1, 1024, dtype=dtype),
                            encoder_hidden_states=torch.randn(rows, 77, 1024, dtype=dtype), return_dict=False)

    return dict(name="I2VGen-XL", size=512, frames=16, unet=unet, vae=vae,
                encoders={"text_encoder": (text, lambda: text(torch.zeros(1, 77, dtype=torch.long))),
                          "image_encoder": (image, lambda: image(torch.randn(1, 3, 224, 224, dtype=dtype)))},
                unet_call=unet_call)


def consisti2v(configs: Path, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from anyv2v_core.backbones.consisti2v_unet import ConsistI2VUNet, ConsistI2VUNetConfig

    config = json.loads((configs / "TIGER-Lab--ConsistI2V" / "unet" / "config.RECONSTRUCTED.json").read_text())
    unet = ConsistI2VUNet(ConsistI2VUNetConfig.from_dict(config))
    # SD-2.1-base's VAE (the SD VAE) and text encoder (OpenCLIP ViT-H, as I2VGen-XL's)
    vae = AutoencoderKL.from_config(json.loads((configs / "CompVis--stable-diffusion-v1-4/vae/config.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig(**json.loads((configs / "ali-vilab--i2vgen-xl/text_encoder/config.json").read_text())))

    def unet_call(rows: int, frames: int, h: int):  # frames: the first frame (a condition) and the generated ones
        return lambda: unet(torch.randn(rows, 4, frames - 1, h, h, dtype=dtype), 500,
                            torch.randn(rows, 77, 1024, dtype=dtype), torch.randn(rows, 4, 1, h, h, dtype=dtype), 3)

    return dict(name="ConsistI2V", size=256, frames=16, unet=unet, vae=vae,
                encoders={"text_encoder": (text, lambda: text(torch.zeros(1, 77, dtype=torch.long)))},
                unet_call=unet_call)


def seine(configs: Path, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from anyv2v_core.backbones.seine_unet import SeineUNet3D, SeineUNetConfig

    folder = configs / "CompVis--stable-diffusion-v1-4"
    read = lambda name: json.loads((folder / name / "config.json").read_text())  # noqa: E731
    unet = SeineUNet3D(SeineUNetConfig.from_dict(read("unet")))
    vae = AutoencoderKL.from_config(read("vae"))
    text = CLIPTextModel(CLIPTextConfig(**read("text_encoder")))

    def unet_call(rows: int, frames: int, h: int):
        return lambda: unet(torch.randn(rows, 9, frames, h, h, dtype=dtype), 500,
                            torch.randn(rows, 77, 768, dtype=dtype))

    return dict(name="SEINE", size=512, frames=16, unet=unet, vae=vae,
                encoders={"text_encoder": (text, lambda: text(torch.zeros(1, 77, dtype=torch.long)))},
                unet_call=unet_call)


BACKBONES = {"i2vgen-xl": i2vgen_xl, "consisti2v": consisti2v, "seine": seine}


def measure(build, configs: Path, dtype: torch.dtype) -> dict:
    """Weights per component, activation peaks and coefficients of one backbone (fake tensors throughout)."""
    from anyv2v_core.backbones.rotary import cast_keeping_rotary_float32

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build(configs, dtype)
        components = {"unet": model["unet"], "vae": model["vae"], **{n: m for n, (m, _) in model["encoders"].items()}}
        for module in components.values():
            cast_keeping_rotary_float32(module.eval(), dtype)
        size, frames, vae = model["size"], model["frames"], model["vae"]
        latent = size // 8
        unet = {rows: peak_of(model["unet_call"](rows, frames, latent)) for rows in (1, 2, 3)}
        per_element = [unet[1] / (frames * latent * latent)]
        per_element += [peak_of(model["unet_call"](1, f, h)) / (f * h * h) for f, h in ((frames // 2, latent),
                                                                                        (frames, latent // 2))]
        vae_peaks = {"encode": peak_of(lambda: vae.encode(torch.randn(1, 3, size, size, dtype=dtype))),
                     "decode": peak_of(lambda: vae.decode(torch.randn(1, 4, latent, latent, dtype=dtype)))}
        return dict(name=model["name"], size=size, frames=frames, components=components,
                    weights={name: weight_bytes(module) for name, module in components.items()},
                    unet=unet, vae=vae_peaks, encoders={name: peak_of(call) for name, (_, call) in model["encoders"].items()},
                    profile=ActivationProfile(unet=max(per_element) / dtype.itemsize,
                                              vae=max(vae_peaks.values()) / (size * size * dtype.itemsize)))


def wan_profile(dtype: torch.dtype) -> ActivationProfile:
    """Wan 2.1 I2V 14B's activation coefficients (benchmarks/wan_configs.json, the published configs):
    one transformer call on 1 row at 832x480 x 81 frames (21 latent frames) and at half the frames
    and half the size, per row x latent frame x latent pixel; the VAE (float32 in the engine) decoding
    one latent frame at 832x480, per pixel and per byte of `dtype`; and the Q and K of one block's
    source row that rows-one-at-a-time holds (2 x the hidden width per token of 2x2 latent pixels)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from anyv2v_core.backbones.rotary import cast_keeping_rotary_float32

    config = json.loads((Path(__file__).parent / "wan_configs.json").read_text())["wan2.1-i2v"]
    expert = config["experts"]["transformer"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        transformer = cast_keeping_rotary_float32(WanTransformer3DModel.from_config(expert).eval(), dtype)
        vae = AutoencoderKLWan.from_config(config["vae"]).eval()

        def call(frames: int, h: int, w: int) -> float:
            peak = peak_of(lambda: transformer(
                hidden_states=torch.randn(1, expert["in_channels"], frames, h, w, dtype=dtype),
                timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 512, expert["text_dim"], dtype=dtype),
                encoder_hidden_states_image=torch.randn(1, 257, expert["image_dim"], dtype=dtype), return_dict=False))
            return peak / (frames * h * w * dtype.itemsize)

        per_element = max(call(21, 60, 104), call(11, 60, 104), call(21, 30, 52))
        decode = peak_of(lambda: vae.decode(torch.randn(1, 16, 1, 60, 104), return_dict=False))
    dim = expert["num_attention_heads"] * expert["attention_head_dim"]
    patch_pixels = expert["patch_size"][1] * expert["patch_size"][2]
    return ActivationProfile(unet=per_element, vae=decode / (832 * 480 * dtype.itemsize),
                             held_source_row=2 * dim / patch_pixels)


def most_frames(report: dict, policy: str, dtype: torch.dtype, total: int) -> int:
    """The most frames per 3-row UNet call under `policy` on a device of `total` bytes (the estimate
    `memory.activation_bytes` makes from the coefficients), by bisection: the peak grows with frames."""
    latent_pixels = (report["size"] // 8) ** 2
    vae = int(report["profile"].vae * report["size"] ** 2 * dtype.itemsize)

    def fits(frames: int) -> bool:
        unet = int(report["profile"].unet * 3 * frames * latent_pixels * dtype.itemsize)
        return policy_peaks(report["components"], unet, vae)[policy] + RESERVED_BYTES <= total

    # fits(low) holds (0 frames: weights only, assumed to fit); no more than the engine takes per call
    low, high = 0, MAX_FACTOR * report["frames"]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def gib(value: int) -> float:
    return value / GIB


SMOKE = ["--backbones", "seine"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="the published configs (model-configs/)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--backbones", nargs="+", choices=tuple(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--wan", action="store_true", help="only Wan's coefficients (wan_profile), in --dtype")
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(1)
    if args.wan:
        profile = wan_profile(dtype)
        print(f"Wan: ActivationProfile(unet={profile.unet:.0f}, vae={profile.vae:.0f}, "
              f"held_source_row={profile.held_source_row:.0f})")
        return
    reports = [measure(BACKBONES[key], args.configs, dtype) for key in args.backbones]

    components = ["unet", "vae", "text_encoder", "image_encoder"]
    print(f"### Weights ({args.dtype}), GiB\n")
    print(markdown(["backbone", *components, "total"],
                   [[r["name"], *[gib(r["weights"][c]) if c in r["weights"] else "-" for c in components],
                     gib(sum(r["weights"].values()))] for r in reports]))
    print(f"\n### Activation peaks at the native size ({args.dtype}), GiB\n")
    print(markdown(["backbone", "size, frames", "UNet 1 row", "UNet 2 rows", "UNet 3 rows", "VAE encode 1 frame",
                    "VAE decode 1 frame", "encoders"],
                   [[r["name"], f"{r['size']}x{r['size']}, {r['frames']}", *[gib(r["unet"][n]) for n in (1, 2, 3)],
                     gib(r["vae"]["encode"]), gib(r["vae"]["decode"]), gib(max(r["encoders"].values()))]
                    for r in reports]))
    print(f"\n### Peak per memory mode, native size, 3-row sampling, decode chunk 1 ({args.dtype}), GiB\n")
    rows = []
    for r in reports:
        peaks = policy_peaks(r["components"], r["unet"][3], max(r["vae"].values()))
        for policy in OFFLOAD_POLICIES:
            fits = [f"{size}" for size in GPU_SIZES_GIB if peaks[policy] + RESERVED_BYTES <= size * GIB]
            rows.append([r["name"], policy, gib(peaks[policy]), ", ".join(fits) or "none of these"])
    print(markdown(["backbone", "policy", "peak GiB", "fits (GB cards)"], rows))
    print(f"\n### Most frames per UNet call (clip length, or window length) that fit, native size ({args.dtype}; "
          f"the engine takes at most {MAX_FACTOR}x the native frames per call)\n")
    print(markdown(["backbone", "policy", *[f"{size} GB" for size in GPU_SIZES_GIB]],
                   [[r["name"], policy, *[most_frames(r, policy, dtype, size * GIB) for size in GPU_SIZES_GIB]]
                    for r in reports for policy in OFFLOAD_POLICIES]))
    print("\n### Coefficients (bytes per element per dtype byte)\n")
    for r in reports:
        print(f"{r['name']}: ActivationProfile(unet={r['profile'].unet:.0f}, vae={r['profile'].vae:.0f})")


if __name__ == "__main__":
    main()
