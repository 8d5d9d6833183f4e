"""Train the toy I2VGen-XL shipped in `anyv2v_core/toy/weights/`.

    python -m anyv2v_core.toy.train --out anyv2v_core/toy/weights --seed 0

Two stages, both on clips from `world.py` generated on the fly (clip seeds below 10**9; the
evaluation uses seeds from `HELD_OUT_SEED`):
1. a tiny `AutoencoderKL` (3 levels, 64x64 -> 4x16x16) trained on single frames; its
   `scaling_factor` is then set so the scaled latents have unit standard deviation;
2. a tiny `I2VGenXLUNet` (the real class with the real block layout, so AnyV2V's injection layers
   exist) trained for image-to-video with I2VGen-XL's objective: v-prediction under the real
   scheduler config (squaredcos_cap_v2 rescaled to zero terminal SNR). Its conditioning is built
   by the engine's own `I2VGenXLBackbone.condition` (first-frame latents + frame-position
   channels, CLIP image embedding, clip-skip text embedding, fps 8), so training and AnyV2V see
   identical inputs. The text and image encoders are frozen random CLIPs.

Conditioning dropout teaches the rows AnyV2V uses: 10% of samples get the empty prompt (the
inversion/source row), 10% get the unconditional row of classifier-free guidance (zero image
embedding with the empty or the negative prompt). The saved UNet is an exponential moving
average of the trained weights. Checkpoints (complete, loadable folders) are written every
`--checkpoint-every` steps, so an interrupted run is still usable. `--resume-from-step N`
continues training the UNet of the folder at `--out` (whose run ended after N UNet steps) on
clips it has not seen, and appends its record to TRAINING.md.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers collapse throughput on a shared, oversubscribed CPU; must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..backbones.i2vgen_xl import NEGATIVE_PROMPT, I2VGenXLBackbone  # noqa: E402
from .components import MODEL_INDEX, SCHEDULER_CONFIG, write_tokenizer  # noqa: E402
from . import world  # noqa: E402

HELD_OUT_SEED = 1_000_000_000  # evaluation clips use seeds >= this; training never does
FPS = 8
CLIP_IMAGE_CONFIG = {
    "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 32},
}
EMBED_DIM = 32  # CLIP width = projection = the UNet's cross_attention_dim
# Default width of every attention head. The shipped weights have 4-wide heads, and their decoder
# self-attention stayed near-uniform (entropy 0.94-0.997 of the uniform map's), so AnyV2V's Q/K
# injection had no structure to carry; the real I2VGen-XL's heads are 64 wide.
ATTENTION_HEAD_DIM = 16


def build_networks(seed: int, head_dim: int = ATTENTION_HEAD_DIM):
    """Freshly initialised (unet, vae, text_encoder, image_encoder); the same seed gives the same weights."""
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(seed + 1)
    # I2VGen-XL's `attention_head_dim` is the number of spatial heads and the temporal head width;
    # both keys are written so diffusers 0.26 and >= 0.27 read the same structure.
    unet = I2VGenXLUNet(
        sample_size=16, block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=EMBED_DIM, attention_head_dim=head_dim, num_attention_heads=head_dim,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=EMBED_DIM, intermediate_size=2 * EMBED_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=EMBED_DIM,
    ))
    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=EMBED_DIM, intermediate_size=2 * EMBED_DIM, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=EMBED_DIM,
    ))
    for frozen in (text_encoder, image_encoder):
        frozen.eval().requires_grad_(False)
    return unet, vae, text_encoder, image_encoder


def load_networks(folder: Path, head_dim: int = ATTENTION_HEAD_DIM):
    """(unet, vae, text_encoder, image_encoder) of a folder written by `save_folder`, to train further.

    A UNet saved with another head width is re-headed to `head_dim`: every weight keeps its
    shape except the input temporal transformer's, whose inner width follows the heads; that one
    starts as the identity (zero output projection) so the re-headed UNet begins near the old one.
    """
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    unet = I2VGenXLUNet.from_pretrained(folder, subfolder="unet")
    if unet.config.attention_head_dim != head_dim:
        reheaded = I2VGenXLUNet.from_config({**unet.config, "attention_head_dim": head_dim,
                                             "num_attention_heads": head_dim})
        kept = {k: v for k, v in unet.state_dict().items() if not k.startswith("transformer_in.")}
        missing, unexpected = reheaded.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith("transformer_in.") for k in missing):
            raise RuntimeError(f"re-heading changed more than transformer_in: {unexpected + missing}")
        torch.nn.init.zeros_(reheaded.transformer_in.proj_out.weight)
        torch.nn.init.zeros_(reheaded.transformer_in.proj_out.bias)
        unet = reheaded
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").eval().requires_grad_(False)
    return unet, vae, text_encoder, image_encoder


def save_folder(out: Path, unet, vae, text_encoder, image_encoder) -> None:
    """Write the diffusers layout of ali-vilab/i2vgen-xl (safetensors only), replacing `out` atomically."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    unet.save_pretrained(staging / "unet", safe_serialization=True)
    vae.save_pretrained(staging / "vae", safe_serialization=True)
    for component in ("unet", "vae"):  # a resumed model remembers the folder it came from; ship no paths
        config_file = staging / component / "config.json"
        config = json.loads(config_file.read_text())
        config.pop("_name_or_path", None)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
    image_encoder.save_pretrained(staging / "image_encoder", safe_serialization=True)
    write_tokenizer(staging / "tokenizer")
    for name, config_file, config in (("feature_extractor", "preprocessor_config.json", CLIP_IMAGE_CONFIG),
                                      ("scheduler", "scheduler_config.json", SCHEDULER_CONFIG)):
        (staging / name).mkdir()
        (staging / name / config_file).write_text(json.dumps(config, indent=2) + "\n")
    (staging / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    keep = [p for p in out.iterdir() if p.suffix == ".md"] if out.exists() else []
    for note in keep:
        shutil.copy(note, staging / note.name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def clip_batch(first_seed: int, count: int, num_frames: int) -> tuple[torch.Tensor, list[str]]:
    """Clips first_seed .. first_seed+count-1: frames [B, F, H, W, 3] and captions."""
    clips = [world.generate(first_seed + i, num_frames=num_frames) for i in range(count)]
    return torch.from_numpy(np.stack([c[0] for c in clips])), [c[1] for c in clips]


def vae_latents(vae, pixels_bchw: torch.Tensor) -> torch.Tensor:
    """Posterior means [N, 4, h, w] (unscaled) of frames in -1..1."""
    return vae.encode(pixels_bchw).latent_dist.mean


def train_vae(vae, args, log) -> dict:
    """Stage 1: reconstruction (MSE + L1) with a light KL term, on single frames of random clips."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.vae_lr, total_steps=args.vae_steps,
                                                   pct_start=0.05)
    rng = np.random.default_rng(args.seed)
    vae.to(args.device).train()
    losses = []
    for step in range(args.vae_steps):
        frames, _ = clip_batch(args.seed * 10_000_000 + step * args.vae_batch, args.vae_batch, args.frames)
        pick = torch.from_numpy(rng.integers(0, args.frames, size=args.vae_batch))
        pixels = frames[torch.arange(args.vae_batch), pick].permute(0, 3, 1, 2).to(args.device) * 2 - 1  # [B, 3, H, W]
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # KL summed over a sample's latents, per pixel value like the reconstruction terms
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels) + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} loss {np.mean(losses[-50:]):.5f}")
    vae.eval().requires_grad_(False)
    # unit-variance latents, as Stable Diffusion's 0.18215 was chosen; measured on held-out clips
    with torch.no_grad():
        frames, _ = clip_batch(HELD_OUT_SEED + 500_000, 32, args.frames)
        pixels = frames.flatten(0, 1).permute(0, 3, 1, 2).to(args.device) * 2 - 1
        latents = vae_latents(vae, pixels)
        recon = vae.decode(latents).sample
        psnr = 10 * math.log10(4 / F.mse_loss(recon, pixels).item())  # range -1..1 has peak-to-peak 2
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=round(scaling, 5))
    log(f"vae done: held-out reconstruction PSNR {psnr:.2f} dB, scaling_factor {vae.config.scaling_factor}")
    return {"vae_final_loss": float(np.mean(losses[-50:])), "vae_psnr_db": psnr,
            "scaling_factor": vae.config.scaling_factor}


def condition_batch(backbone: I2VGenXLBackbone, frames: torch.Tensor, captions: list[str], rng):
    """UNet conditioning of a batch through the engine: (text [B,77,D], image embeddings [B,1,D],
    image latents [B,4,F,h,w]), with the conditioning dropout of the module docstring."""
    text, embeddings, image_latents = [], [], []
    num_frames = frames.shape[1]
    for clip, caption in zip(frames, captions):
        draw = rng.random()
        if draw < 0.1:
            prompt, unconditional = "", False  # the source row of inversion and sampling
        elif draw < 0.2:
            prompt, unconditional = ("" if rng.random() < 0.5 else NEGATIVE_PROMPT), True  # the CFG negative row
        else:
            prompt, unconditional = caption, False
        row = backbone.condition(clip[:1], prompt, num_frames=num_frames, fps=FPS, unconditional=unconditional)
        # clone: rows come out of inference mode and cannot enter an autograd graph as they are
        text.append(row.text_embeddings.clone())
        embeddings.append(row.image_embeddings.clone())
        image_latents.append(row.image_latents.clone())
    device = backbone.device
    return torch.cat(text).to(device), torch.cat(embeddings).to(device), torch.cat(image_latents).to(device)


def train_unet(unet, backbone: I2VGenXLBackbone, args, log, save) -> dict:
    """Stage 2: v-prediction on uniformly drawn timesteps of the zero-terminal-SNR schedule."""
    alphas_cumprod = backbone.schedule.alphas_cumprod  # [1000]; alphas_cumprod[999] == 0 (pure noise)
    device = backbone.device
    ema = copy.deepcopy(unet.to(device)).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = min(100, args.unet_steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.unet_steps)))))
    first_step = args.resume_from_step  # data and noise continue where an earlier run stopped
    generator = torch.Generator().manual_seed(args.seed + first_step)
    rng = np.random.default_rng(args.seed + 1 + first_step)
    # dropout is 0 everywhere in this UNet and it has no batch norm: eval mode is the same math, faster
    unet.eval()
    losses, start = [], time.time()
    for step in range(args.unet_steps):
        first_seed = args.seed * 10_000_000 + 5_000_000 + (first_step + step) * args.batch
        frames, captions = clip_batch(first_seed, args.batch, args.frames)  # [B, F, H, W, 3]
        with torch.no_grad():
            pixels = frames.flatten(0, 1).permute(0, 3, 1, 2).to(device) * 2 - 1
            x0 = vae_latents(backbone.vae, pixels) * backbone.vae_scaling_factor  # [B*F, 4, h, w]
            x0 = x0.unflatten(0, (args.batch, args.frames)).permute(0, 2, 1, 3, 4)  # [B, 4, F, h, w]
            text, embeddings, image_latents = condition_batch(backbone, frames, captions, rng)
        # drawn on the CPU so a seed gives the same run on any device
        t = torch.randint(0, len(alphas_cumprod), (args.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1, 1).to(device)
        t = t.to(device)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        prediction = unet(noisy, t, fps=torch.full((args.batch,), FPS, device=device), image_latents=image_latents,
                          image_embeddings=embeddings, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(live, 1 - decay)
        losses.append(loss.item())
        if step % 25 == 0 or step == args.unet_steps - 1:
            elapsed = time.time() - start
            log(f"unet step {step} loss {np.mean(losses[-100:]):.5f} lr {schedule.get_last_lr()[0]:.2e} "
                f"{elapsed / (step + 1):.2f} s/step, {elapsed / 60:.1f} min")
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.unet_steps:
            save(ema)
            log(f"checkpoint at step {step + 1}")
    unet.load_state_dict(ema.state_dict())
    return {"unet_final_loss": float(np.mean(losses[-100:])), "unet_steps": args.unet_steps,
            "unet_loss_first_100": float(np.mean(losses[:100]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--vae-batch", type=int, default=12)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--attention-head-dim", type=int, default=ATTENTION_HEAD_DIM,
                        help="width of every attention head; a resumed UNet with another width is re-headed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda for a longer run on a GPU")
    parser.add_argument("--resume-from-step", type=int, default=0,
                        help="continue the UNet in --out, trained for this many steps (the VAE is kept)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{(time.time() - started) / 60:6.1f} min] {message}", flush=True)

    if args.resume_from_step:
        unet, vae, text_encoder, image_encoder = load_networks(args.out, args.attention_head_dim)
        stats = {}
    else:
        unet, vae, text_encoder, image_encoder = build_networks(args.seed, args.attention_head_dim)
        log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
            f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params")
        stats = train_vae(vae, args, log)
    vae_minutes = (time.time() - started) / 60
    backbone = I2VGenXLBackbone(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(args.out), image_encoder=image_encoder,
        clip_image_config=CLIP_IMAGE_CONFIG, scheduler_config=SCHEDULER_CONFIG, device=torch.device(args.device),
        dtype=torch.float32,
    ).to(args.device)

    def save(averaged_unet) -> None:  # CPU copies: the shipped weights must not remember a device
        save_folder(args.out, *(copy.deepcopy(m).cpu() for m in (averaged_unet, vae, text_encoder, image_encoder)))

    stats.update(train_unet(unet, backbone, args, log, save))
    save(unet)
    minutes = (time.time() - started) / 60
    log(f"done in {minutes:.1f} min; wrote {args.out}")
    write_training_note(args, argv, stats, vae_minutes, minutes)


def _tokenizer(out: Path):
    from transformers import CLIPTokenizer

    folder = out.with_name(out.name + ".tokenizer")
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    shutil.rmtree(folder)
    return tokenizer


def write_training_note(args, argv: list[str], stats: dict, vae_minutes: float, minutes: float) -> None:
    """Record the run in TRAINING.md beside the weights; a resumed run appends its own section."""
    import diffusers
    import transformers

    command = "python -m anyv2v_core.toy.train " + " ".join(argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    first = args.resume_from_step
    section = [
        "",
        f"## UNet steps {first} to {first + stats['unet_steps']}" + ("" if first else " (from scratch, VAE included)"),
        "",
        f"- command: `OMP_WAIT_POLICY=PASSIVE {command}`",
        f"- settings: {json.dumps(settings)}",
        f"- wall time: {minutes:.1f} min" + (f" ({vae_minutes:.1f} min VAE)" if not first else "")
        + f", {args.threads} threads on a 2-core CPU shared with other jobs (load average at the end: "
        f"{os.getloadavg()[0]:.1f})",
    ]
    if not first:
        section.append(f"- VAE: final loss {stats['vae_final_loss']:.5f}, held-out reconstruction PSNR "
                       f"{stats['vae_psnr_db']:.2f} dB, scaling_factor {stats['scaling_factor']}")
    section += [
        f"- UNet: {stats['unet_steps']} steps x batch {args.batch}; v-prediction MSE "
        f"{stats['unet_loss_first_100']:.4f} (first 100 steps) -> {stats['unet_final_loss']:.4f} (last 100)",
        f"- versions: torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}",
    ]
    note = args.out / "TRAINING.md"
    header = [
        "# How these weights were trained",
        "",
        f"Seed {args.seed}; clips from `anyv2v_core/toy/world.py`, {args.frames} frames, 64x64, fps {FPS}. "
        "See the docstring of `anyv2v_core/toy/train.py` for the objective and the conditioning.",
    ]
    previous = note.read_text().rstrip("\n").split("\n") if first and note.exists() else header
    note.write_text("\n".join(previous + section) + "\n")


if __name__ == "__main__":
    main()
