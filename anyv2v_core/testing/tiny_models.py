"""Tiny random-weight models written as diffusers folders, built in-process for tests and
benchmarks (no download needed): I2VGen-XL, and the three Wan image-to-video layouts.

Same block structure as the real models (so the default injection layers exist), a few hundred
kB of weights, the real scheduler configs, tokenizers with one token per character (these come
from `anyv2v_core.toy.components`, which the toy models share).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..toy.components import (
    MODEL_INDEX, SCHEDULER_CONFIG, WAN_SCHEDULER_CONFIG, WAN_TEXT_DIM, tiny_umt5, write_character_tokenizer,
    write_tokenizer)


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


WAN_KINDS = ("wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v")
WAN_TEXT_TO_VIDEO = "wan2.1-t2v"  # a text-to-video transformer, only for tests of what is refused


def _randomise_zeros(module: torch.nn.Module) -> None:
    """diffusers zero-initialises some output layers; random values make every layer matter in tests."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0, 0.05)


def tiny_wan_transformer(kind: str, *, seed: int, comfyui_dims: bool = False):
    """A tiny WanTransformer3DModel of `kind`. `comfyui_dims`: the widths ComfyUI assumes when it reads
    a Wan file (128 per head, 256 time frequencies, 4096-wide text, 1280-wide CLIP image tokens,
    the Wan VAEs' 16 / 48 latent channels), so that its UNETLoader builds the same network."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    image_input = kind == "wan2.1-i2v"
    if comfyui_dims:
        latent_channels = 48 if kind == "wan2.2-ti2v" else 16
        dims = dict(num_attention_heads=1, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=256,
                    num_layers=2, image_dim=1280 if image_input else None, added_kv_proj_dim=128 if image_input else None)
    else:
        latent_channels = 8 if kind == "wan2.2-ti2v" else 16
        dims = dict(num_attention_heads=2, attention_head_dim=12, text_dim=WAN_TEXT_DIM, freq_dim=16, ffn_dim=32,
                    num_layers=4, image_dim=16 if image_input else None, added_kv_proj_dim=24 if image_input else None)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), out_channels=latent_channels,
        # I2V: noisy latents + 4 mask channels + first-frame video latents; TI2V, T2V: the latents alone
        in_channels=latent_channels if kind in ("wan2.2-ti2v", WAN_TEXT_TO_VIDEO) else 2 * latent_channels + 4, **dims)
    _randomise_zeros(transformer)
    return transformer


# diffusers' Wan transformer names -> the original Wan (and ComfyUI) names; first match wins
WAN_ORIGINAL_NAMES = (
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn1.norm_q", "self_attn.norm_q"), ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"), ("attn2.norm_q", "cross_attn.norm_q"), ("attn2.norm_k", "cross_attn.norm_k"),
    ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
    ("norm2.", "norm3."),  # the cross-attention norm: norm2 in diffusers, norm3 in the original
    ("scale_shift_table", "modulation"),
)


def original_wan_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A diffusers Wan transformer's weights under the original Wan key names, the single-file
    layout ComfyUI's Load Diffusion Model reads."""
    state = {}
    for key, value in transformer.state_dict().items():
        name = "head.modulation" if key == "scale_shift_table" else key
        for diffusers_name, original_name in WAN_ORIGINAL_NAMES:
            if diffusers_name in name and name != "head.modulation":
                name = name.replace(diffusers_name, original_name)
                break
        state[name] = value.detach().clone().contiguous()
    return state


def write_tiny_comfyui_wan(path: Path, kind: str = "wan2.1-i2v", *, seed: int = 0) -> Path:
    """A tiny Wan diffusion model file in ComfyUI's single-file layout (models/diffusion_models)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_wan_state_dict(tiny_wan_transformer(kind, seed=seed, comfyui_dims=True)), str(path))
    return path


def build_tiny_wan(folder: Path, kind: str = "wan2.1-i2v", *, seed: int = 0) -> Path:
    """A tiny random Wan diffusers folder of `kind` (see WAN_KINDS): Wan 2.1 I2V (CLIP image input,
    36-channel transformer), Wan 2.2 I2V A14B (two experts built from different seeds, boundary
    0.9), Wan 2.2 TI2V (a patchifying VAE with 16x spatial compression, expand_timesteps)."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if kind not in WAN_KINDS:
        raise ValueError(f"kind must be one of {WAN_KINDS}, got {kind!r}")
    folder.mkdir(parents=True, exist_ok=True)
    tiny_wan_transformer(kind, seed=seed).save_pretrained(folder / "transformer")
    model_index = {"_class_name": "WanImageToVideoPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                   "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                   "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    if kind == "wan2.2-i2v-a14b":
        tiny_wan_transformer(kind, seed=seed + 1).save_pretrained(folder / "transformer_2")
        model_index.update(boundary_ratio=0.9, transformer_2=["diffusers", "WanTransformer3DModel"])
    torch.manual_seed(seed)
    if kind == "wan2.2-ti2v":
        model_index.update(_class_name="WanPipeline", expand_timesteps=True)
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                               scale_factor_spatial=16, latents_mean=[0.1 * i - 0.3 for i in range(8)],
                               latents_std=[0.5 + 0.1 * i for i in range(8)])
    else:
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               latents_mean=[0.05 * i - 0.4 for i in range(16)],
                               latents_std=[0.8 + 0.1 * i for i in range(16)])
    vae.save_pretrained(folder / "vae")
    tiny_umt5().save_pretrained(folder / "text_encoder")
    write_character_tokenizer(folder / "tokenizer")
    if kind == "wan2.1-i2v":
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=32, patch_size=16)
        CLIPVisionModel(vision).save_pretrained(folder / "image_encoder")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            folder / "image_processor")
        model_index.update(image_encoder=["transformers", "CLIPVisionModel"],
                           image_processor=["transformers", "CLIPImageProcessor"])
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(WAN_SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(json.dumps(model_index))
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
