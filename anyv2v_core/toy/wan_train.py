"""Train the toy Wan shipped in `anyv2v_core/toy/wan_weights/` (a Wan 2.2 TI2V-layout diffusers folder).

    python -m anyv2v_core.toy.wan_train --out anyv2v_core/toy/wan_weights --work /tmp/wan_toy_run

Clips come from the flow world (`world.make_flow_scene`: 9 frames at 32x32, one shape, 16
velocities), generated on the fly from seeds below `HELD_OUT_SEED` (the evaluation's are above).
Everything is diffusers' own Wan classes, so `load_backbone` runs the folder like a real Wan 2.2 TI2V:
1. an `AutoencoderKLWan` (causal 3D VAE: 4x spatial, 4x temporal compression, 8 latent channels)
   trained on single frames (3 steps in 4: many background colours per step, cheap) and whole
   clips (1 in 4: the temporal path) for reconstruction (MSE + L1 of the posterior mean's decoding); `latents_mean` / `latents_std`
   are then measured on held-out clips, as the real VAEs' are;
2. a `WanTransformer3DModel` (6 blocks, width 128) trained with Wan's rectified-flow objective in
   the TI2V layout: latent frame 0 (the first video frame) stays clean with timestep 0 on its
   tokens, the other latent frames are (1 - sigma) x0 + sigma noise, the target is noise - x0,
   sigma uniform in (0, 1). The prompt is always the empty one: the toy's first frame says what
   the clip looks like, nothing says how it moves (a frozen random UMT5 embeds that prompt, one
   encoding broadcast over the batch, which is the same arithmetic as a batch of equal prompts).
The saved transformer is an exponential moving average of the trained one. The run is
resumable: `--work` holds the training state (written every `--checkpoint-every` steps, with a
complete loadable folder at `--out`) and `loss.csv`; the same command continues where it stopped.
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

from .components import WAN_SCHEDULER_CONFIG, tiny_umt5, write_character_tokenizer  # noqa: E402
from . import world  # noqa: E402
from .train import HELD_OUT_SEED  # noqa: E402  (evaluation clips use seeds >= this; training never does)

WAN_WEIGHTS = Path(__file__).resolve().parent / "wan_weights"  # the shipped run (TRAINING.md there)
LATENT_CHANNELS = 8
FLOW_SHIFT = 1.0  # the toy's sigma shift (schedule.json and the engine's toy defaults)
MODEL_INDEX = {
    "_class_name": "WanPipeline", "expand_timesteps": True, "anyv2v_toy": True,
    "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def build_networks(seed: int, *, width: int = 128, blocks: int = 6):
    """Freshly initialised (transformer, vae, text_encoder); the same seed gives the same weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], scale_factor_spatial=4, scale_factor_temporal=4,
                           latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS)
    # The decoder RMS-normalises its first features: with the default biases these start as a constant
    # far larger than the initial latents' contribution, and the decoder ignores its input for hundreds
    # of steps (measured). Zero biases make its first features linear in the latents.
    with torch.no_grad():
        for conv in (vae.post_quant_conv, vae.decoder.conv_in):
            conv.bias.zero_()
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=width // 32, attention_head_dim=32, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=16, freq_dim=64, ffn_dim=2 * width, num_layers=blocks)
    torch.manual_seed(seed + 2)
    return transformer, vae, tiny_umt5().eval().requires_grad_(False)


def clip_batch(first_seed: int, count: int) -> torch.Tensor:
    """Pixels [B, 3, F, H, W] in -1..1 of flow-world clips first_seed .. first_seed + count - 1."""
    clips = np.stack([world.render(world.make_flow_scene(first_seed + i)) for i in range(count)])
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3) * 2 - 1


def save_folder(out: Path, transformer, vae, text_encoder) -> None:
    """Write the diffusers folder (safetensors only), replacing `out` atomically; notes (*.md, *.csv) are kept."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        copy.deepcopy(module).cpu().save_pretrained(staging / name, safe_serialization=True)
        config_file = staging / name / "config.json"
        if config_file.is_file():  # ship no paths of the machine that trained it
            config = json.loads(config_file.read_text())
            config.pop("_name_or_path", None)
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_character_tokenizer(staging / "tokenizer")
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**WAN_SCHEDULER_CONFIG, "flow_shift": FLOW_SHIFT}, indent=2) + "\n")
    (staging / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    for note in (out.iterdir() if out.exists() else ()):
        if note.suffix in (".md", ".csv"):
            shutil.copy(note, staging / note.name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Warm-up, then cosine decay to a tenth: a multiplier of the base learning rate."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))


class Run:
    """The resumable state of a training run, kept in `work/state.pt`."""

    def __init__(self, args) -> None:
        self.args, self.work = args, Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.transformer, self.vae, self.text_encoder = build_networks(args.seed, width=args.width,
                                                                      blocks=args.blocks)
        self.ema = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=args.lr, weight_decay=0.01)
        self.vae_step = self.step = 0
        self.vae_done = False
        self.minutes = 0.0  # of earlier sessions of this run
        state_file = self.work / "state.pt"
        if state_file.is_file():
            state = torch.load(state_file, weights_only=True)  # state dicts, numbers and lists only
            for name in ("transformer", "ema", "vae", "vae_optimizer", "optimizer"):
                getattr(self, name).load_state_dict(state[name])
            self.vae_step, self.step, self.vae_done, self.minutes = (state["vae_step"], state["step"],
                                                                     state["vae_done"], state["minutes"])
            if self.vae_done:
                self.vae.register_to_config(latents_mean=state["latents_mean"], latents_std=state["latents_std"])
            self.log(f"resumed at VAE step {self.vae_step}, transformer step {self.step}")

    def elapsed_minutes(self) -> float:
        return self.minutes + (time.time() - self.started) / 60

    def log(self, message: str) -> None:
        print(f"[{self.elapsed_minutes():6.1f} min] {message}", flush=True)

    def record(self, stage: str, step: int, loss: float) -> None:
        with open(self.work / "loss.csv", "a") as file:
            file.write(f"{stage},{step},{loss:.6f},{self.elapsed_minutes():.2f}\n")

    def save_state(self) -> None:
        state = {name: getattr(self, name).state_dict()
                 for name in ("transformer", "ema", "vae", "vae_optimizer", "optimizer")}
        state.update(vae_step=self.vae_step, step=self.step, vae_done=self.vae_done, minutes=self.elapsed_minutes(),
                     latents_mean=list(self.vae.config.latents_mean), latents_std=list(self.vae.config.latents_std))
        torch.save(state, self.work / "state.pt.partial")
        os.replace(self.work / "state.pt.partial", self.work / "state.pt")

    # ------------------------------------------------------------------------------------------ stage 1

    def train_vae(self) -> None:
        args, vae = self.args, self.vae
        vae.train()
        losses = []
        while self.vae_step < args.vae_steps:
            if self.vae_step % args.vae_clip_every == 0:  # whole clips train the temporal path
                pixels = clip_batch(args.seed * 10_000_000 + self.vae_step * args.vae_frame_batch, args.vae_batch)
            else:  # single frames, many per step: cheap, and many background colours per batch
                clips = clip_batch(args.seed * 10_000_000 + self.vae_step * args.vae_frame_batch, args.vae_frame_batch)
                pick = torch.arange(args.vae_frame_batch) % clips.shape[2]
                pixels = clips[torch.arange(args.vae_frame_batch), :, pick].unsqueeze(2)  # [B, 3, 1, H, W]
            # the posterior mean, as the engine encodes (a sample at the initial unit variance buries the signal)
            latents = vae.encode(pixels).latent_dist.mean
            recon = vae.decode(latents, return_dict=False)[0]
            loss = F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels)
            for group in self.vae_optimizer.param_groups:
                group["lr"] = args.vae_lr * cosine_lr(self.vae_step, args.vae_steps, 20)
            self.vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_optimizer.step()
            losses.append(loss.item())
            self.vae_step += 1
            self.record("vae", self.vae_step, losses[-1])
            if self.vae_step % 20 == 0:
                self.log(f"vae step {self.vae_step} loss {np.mean(losses[-20:]):.5f}")
            if self.vae_step % args.checkpoint_every == 0:
                self.save_state()
        vae.eval().requires_grad_(False)
        with torch.no_grad():  # held-out clips: the ceiling of every reconstruction and the latent statistics
            pixels = clip_batch(HELD_OUT_SEED + 700_000, args.vae_eval_clips)
            latents = vae.encode(pixels).latent_dist.mean  # [32, C, F', h, w]
            recon = vae.decode(latents, return_dict=False)[0]
        self.vae_psnr = 10 * math.log10(4 / F.mse_loss(recon, pixels).item())  # -1..1 has peak-to-peak 2
        mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                               latents_std=[round(float(v), 5) for v in std])
        self.vae_done = True
        self.save_state()
        self.log(f"vae done: held-out reconstruction PSNR {self.vae_psnr:.2f} dB")

    # ------------------------------------------------------------------------------------------ stage 2

    def normalised_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, F', h, w] as `WanBackbone.encode_video` gives them (posterior mean, per-channel normalised)."""
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1)
        with torch.no_grad():
            return (self.vae.encode(pixels).latent_dist.mean - mean) / std

    def train_transformer(self, text: torch.Tensor) -> None:
        args, transformer = self.args, self.transformer
        transformer.train()
        generator = torch.Generator().manual_seed(args.seed + self.step)  # a resumed run draws new noise
        losses = []
        while self.step < args.steps:
            first_seed = args.seed * 10_000_000 + 5_000_000 + self.step * args.batch
            x0 = self.normalised_latents(clip_batch(first_seed, args.batch))  # [B, C, F', h, w]
            generated = x0[:, :, 1:]
            sigma = torch.rand(args.batch, generator=generator).view(-1, 1, 1, 1, 1)
            noise = torch.randn(generated.shape, generator=generator)
            noisy = torch.cat([x0[:, :, :1], (1 - sigma) * generated + sigma * noise], dim=2)
            tokens_per_frame = (x0.shape[3] // 2) * (x0.shape[4] // 2)
            per_token = (sigma.view(-1, 1, 1) * 1000).expand(-1, x0.shape[2], tokens_per_frame).clone()
            per_token[:, 0] = 0  # the clean first frame, as WanTI2VBackbone.predict sets it
            velocity = transformer(hidden_states=noisy, timestep=per_token.flatten(1), encoder_hidden_states=text,
                                   return_dict=False)[0][:, :, 1:]
            loss = F.mse_loss(velocity, noise - generated)
            for group in self.optimizer.param_groups:
                group["lr"] = args.lr * cosine_lr(self.step, args.steps, 100)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            self.optimizer.step()
            decay = min(args.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for averaged, live in zip(self.ema.parameters(), transformer.parameters()):
                    averaged.lerp_(live, 1 - decay)
            losses.append(loss.item())
            self.step += 1
            self.record("transformer", self.step, losses[-1])
            if self.step % 25 == 0:
                self.log(f"transformer step {self.step} loss {np.mean(losses[-100:]):.5f} "
                         f"lr {self.optimizer.param_groups[0]['lr']:.2e}")
            if self.step % args.checkpoint_every == 0 or self.step == args.steps:
                self.save_state()
                save_folder(Path(args.out), self.ema, self.vae, self.text_encoder)
                self.log(f"checkpoint at step {self.step}")


def empty_prompt_embedding(text_encoder, out: Path) -> torch.Tensor:
    """[1, 512, 16]: the empty prompt as `WanBackbone.encode_prompt` embeds it (tokenizer of the folder)."""
    from transformers import AutoTokenizer

    from ..backbones.wan import TEXT_TOKENS

    folder = out.with_name(out.name + ".tokenizer")
    write_character_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shutil.rmtree(folder)
    tokens = tokenizer("", padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt")
    length = int(tokens.attention_mask.sum())
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    embeddings = torch.zeros_like(hidden)
    embeddings[:, :length] = hidden[:, :length]
    return embeddings


def write_training_note(out: Path, work: Path, argv: list[str], threads: int) -> None:
    """TRAINING.md beside the weights: the command, the loss curve (means over tenths of each stage,
    from `work/loss.csv`, which is copied beside it) and the versions."""
    import diffusers
    import transformers

    rows = [line.split(",") for line in (work / "loss.csv").read_text().splitlines()]
    lines = ["# How these weights were trained", "",
             "Flow-world clips (`anyv2v_core/toy/world.py`, `make_flow_scene`: 9 frames at 32x32), generated on the",
             "fly; the objective and the layout are in the docstring of `anyv2v_core/toy/wan_train.py`.", "",
             f"    OMP_WAIT_POLICY=PASSIVE python -m anyv2v_core.toy.wan_train {' '.join(argv)}", "",
             f"{threads} torch thread(s) on a 2-core CPU shared with other jobs; the run is resumable (the same command",
             f"continues from `--work`). Wall time: {float(rows[-1][3]):.1f} min. Versions: torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}, transformers {transformers.__version__}.", "",
             "Loss curve (`loss.csv` has every step: stage, step, loss, minutes):", "",
             "| stage | steps | mean loss | minutes at the end |", "|---|---|---|---|"]
    for stage in ("vae", "transformer"):
        stage_rows = [r for r in rows if r[0] == stage]
        for part in np.array_split(np.arange(len(stage_rows)), min(10, len(stage_rows))):
            chunk = [stage_rows[i] for i in part]
            lines.append(f"| {stage} | {chunk[0][1]}-{chunk[-1][1]} | {np.mean([float(r[2]) for r in chunk]):.4f} | "
                         f"{float(chunk[-1][3]):.1f} |")
    shutil.copy(work / "loss.csv", out / "loss.csv")
    (out / "TRAINING.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    parser.add_argument("--work", type=Path, required=True, help="training state and loss log (resumes from it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--vae-batch", type=int, default=4, help="whole clips in a VAE step of clips")
    parser.add_argument("--vae-frame-batch", type=int, default=16, help="single frames in the other VAE steps")
    parser.add_argument("--vae-clip-every", type=int, default=4, help="every Nth VAE step trains on whole clips")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-eval-clips", type=int, default=32, help="held-out clips for the latent statistics")
    parser.add_argument("--steps", type=int, default=2000, help="transformer steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(args)
    run.log(f"transformer {sum(p.numel() for p in run.transformer.parameters()) / 1e6:.2f}M params, "
            f"vae {sum(p.numel() for p in run.vae.parameters()) / 1e6:.2f}M params")
    if not run.vae_done:
        run.train_vae()
    run.train_transformer(empty_prompt_embedding(run.text_encoder, Path(args.out)))
    write_training_note(Path(args.out), Path(args.work), argv, args.threads)
    run.log(f"done: {run.step} transformer steps; wrote {args.out}")


if __name__ == "__main__":
    main()
