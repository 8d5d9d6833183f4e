"""Bytes copied between the host and the GPU per UNet call, for each offload policy, on the real
I2VGen-XL architecture, on any machine.

    python benchmarks/offload.py [--frames 16] [--size 512] [--calls 4] [--dtype fp16]

The networks are built at their published size (`i2vgenxl_configs.json`) on the meta device and
run on the weightless stand-in GPU of `anyv2v_core.testing.device_standin` (shapes only: no memory, nothing
computed), which counts every copy and whether it was asked to be non-blocking.
For each policy, the calls of one edit are replayed through the backbone: conditioning (the text
encoder, the image encoder, the VAE encoding the first frame), `--calls` UNet calls of sampling
(3 rows, through `Backbone.predict`), a second prompt through the text encoder (the node's next
edit), then the VAE decoding one frame. Reported: the bytes to the device and back to the host
per UNet call (the mean over the calls after the first: the loop's steady state), the share of
the bytes to the device asked for as non-blocking copies, and both totals over the sequence.
One pass over the UNet's weights is the floor for sequential offload.

Also reported, per policy, the host RAM the weights take on a CUDA GPU (`host_ram_peak`): the
pageable host copies, the pinned ones as PyTorch's pinned-memory allocator holds them (each block
rounded up to a power of two), and one tensor held twice while it is being pinned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overhead import markdown  # noqa: E402  (benchmarks/ is this script's folder)

from anyv2v_core.backbones.i2vgen_xl import I2VGenXLBackbone, I2VGenXLRow  # noqa: E402
from anyv2v_core.memory import OFFLOAD_POLICIES  # noqa: E402
from anyv2v_core.offload import Offloader, pinned_bytes_cap  # noqa: E402
from anyv2v_core.testing.device_standin import StandInDevice, weightless_on_host  # noqa: E402

CONFIGS = Path(__file__).with_name("i2vgenxl_configs.json")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2**30


def build(dtype: torch.dtype, config_name: str = "i2vgen-xl") -> I2VGenXLBackbone:
    """I2VGen-XL (or the "tiny" config of its architecture) with weightless weights on the host; no
    tokenizer: the text encoder takes token ids."""
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = json.loads(CONFIGS.read_text())[config_name]
    with torch.device("meta"):
        networks = {"unet": I2VGenXLUNet.from_config(config["unet"]), "vae": AutoencoderKL.from_config(config["vae"]),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
                    "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**config["image_encoder"]))}
    networks = {name: weightless_on_host(torch.nn.Module.to(network, dtype).eval().requires_grad_(False))
                for name, network in networks.items()}
    return I2VGenXLBackbone(**networks, tokenizer=None, clip_image_config=config["feature_extractor"],
                            scheduler_config=config["scheduler"], device=torch.device("cpu"), dtype=dtype)


def replay(backbone: I2VGenXLBackbone, gpu: StandInDevice, *, frames: int, size: int, calls: int) -> dict:
    """The calls of one edit on the stand-in; the byte counts per UNet call and in all."""
    dtype, device, h = backbone.dtype, gpu.device, size // 8
    text_dim, image_dim = backbone.unet.config.cross_attention_dim, backbone.image_encoder.config.projection_dim
    image_size = backbone.image_encoder.config.image_size
    with torch.inference_mode():
        backbone.text_encoder(torch.zeros(1, 77, dtype=torch.long).to(device))
        backbone.image_encoder(torch.randn(1, 3, image_size, image_size, dtype=dtype).to(device))
        backbone.vae.encode(torch.randn(1, 3, size, size, dtype=dtype).to(device))
        rows = [I2VGenXLRow(text_embeddings=torch.randn(1, 77, text_dim), image_embeddings=torch.randn(1, 1, image_dim),
                            image_latents=torch.randn(1, 4, frames, h, h), fps=8) for _ in range(3)]
        latents = torch.randn(3, 4, frames, h, h).to(device)
        per_call = []
        for t in range(calls):
            before = (gpu.bytes_to_device, gpu.bytes_to_host)
            backbone.predict(latents, 981 - 20 * t, rows)
            per_call.append((gpu.bytes_to_device - before[0], gpu.bytes_to_host - before[1]))
        backbone.text_encoder(torch.zeros(1, 77, dtype=torch.long).to(device))
        backbone.vae.decode(torch.randn(1, 4, h, h, dtype=dtype).to(device))
    steady = per_call[1:] or per_call
    return {"to device per call": sum(b for b, _ in steady) / len(steady),
            "to host per call": sum(b for _, b in steady) / len(steady),
            "non-blocking share": gpu.non_blocking_bytes_to_device / max(gpu.bytes_to_device, 1),
            "to device in all": gpu.bytes_to_device, "to host in all": gpu.bytes_to_host}


def pinned_block(size: int) -> int:
    """Bytes PyTorch's CUDA host allocator holds for a pinned tensor of `size` bytes (a power of two)."""
    return 1 << max(0, size - 1).bit_length()


def host_ram_peak(offloader: Offloader) -> tuple[int, int]:
    """(host RAM peak, pinned bytes) of the offloader's host copies on a CUDA GPU, pinned as
    `HostWeights.pin` pins them: the components it loads more than once, tensor by tensor, up to the cap."""
    pinned_components, cap = set(offloader.pinned_components()), pinned_bytes_cap()
    held = pinned = largest = 0
    for name, weights in offloader.weights.items():
        for tensor in {id(t): t for t in weights.host.values()}.values():
            size = tensor.numel() * tensor.element_size()
            if name in pinned_components and pinned + size <= cap:
                pinned, held, largest = pinned + size, held + pinned_block(size), max(largest, size)
            else:
                held += size
    return held + largest, pinned
SMOKE = ["--tiny", "--frames", "2", "--size", "32", "--calls", "2"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--calls", type=int, default=4, help="UNet calls (the first one is not in the per-call mean)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--tiny", action="store_true", help="a tiny config of the same architecture (checks the script)")
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(1)

    backbone = build(DTYPES[args.dtype], "tiny" if args.tiny else "i2vgen-xl")
    weights = {name: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
               for name, m in backbone.modules().items()}
    print(f"### I2VGen-XL ({args.dtype}, {args.size}x{args.size}, {args.frames} frames): weights "
          + ", ".join(f"{name} {size / GIB:.3f} GiB" for name, size in weights.items()) + "\n")
    header = ["policy", "to device per UNet call GiB", "to host per UNet call GiB", "x one pass over the UNet",
              "non-blocking share", "to device in all GiB", "to host in all GiB", "host RAM peak GiB",
              "of which pinned GiB"]
    rows = []
    for policy in OFFLOAD_POLICIES:
        with StandInDevice(weightless=True) as gpu:
            backbone.set_offload(policy, gpu.device)
            host_peak, pinned = host_ram_peak(backbone.offloader)
            counts = replay(backbone, gpu, frames=args.frames, size=args.size, calls=args.calls)
            backbone.to("cpu")  # not counted: the next policy starts from the host
        rows.append([policy, counts["to device per call"] / GIB, counts["to host per call"] / GIB,
                     counts["to device per call"] / weights["unet"], counts["non-blocking share"],
                     counts["to device in all"] / GIB, counts["to host in all"] / GIB, host_peak / GIB, pinned / GIB])
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
