"""A tiny random-weight I2VGen-XL written as a diffusers folder, built in-process for tests and
benchmarks (no download needed).

Same block structure as the real model (so the default injection layers exist), a few hundred
kB of weights, the real scheduler config, a byte-level CLIP tokenizer with no merges.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

MODEL_INDEX = {
    "_class_name": "I2VGenXLPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "I2VGenXLUNet"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE tokenizers (GPT-2, CLIP) use for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def byte_level_vocab() -> dict[str, int]:
    """<|startoftext|>=0, <|endoftext|>=1, then the 256 byte symbols and their </w> forms (no merges:
    every character is one token)."""
    symbols = byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab[symbol] = len(vocab)
    return vocab


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))


def build_tiny_i2vgenxl(folder: Path, *, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = I2VGenXLUNet(
        sample_size=8, block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4, num_attention_heads=4,
    )
    # diffusers zero-initialises output layers; random values make every layer matter in the tests
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0, 0.05)
    unet.save_pretrained(folder / "unet")
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        sample_size=32,
    )
    vae.save_pretrained(folder / "vae")
    text = CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(vision).save_pretrained(folder / "image_encoder")
    write_tokenizer(folder / "tokenizer")
    (folder / "feature_extractor").mkdir(exist_ok=True)
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "CLIPImageProcessor",
    }))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return folder


def moving_square_video(num_frames: int = 6, size: int = 32, *, colour=(0.9, 0.1, 0.1)) -> torch.Tensor:
    """A square moving diagonally over a gradient, [F, size, size, 3] in 0..1."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    background = torch.stack([xs, ys, torch.full_like(xs, 0.4)], dim=-1)
    frames = background.repeat(num_frames, 1, 1, 1)
    side = size // 4
    for i in range(num_frames):
        top = left = 2 + 2 * i
        frames[i, top : top + side, left : left + side] = torch.tensor(colour)
    return frames
