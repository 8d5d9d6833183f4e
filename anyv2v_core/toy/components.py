"""The parts of a small model folder that are not trained: the real I2VGen-XL and Wan scheduler
configs, I2VGen-XL's model index, tokenizers with one token per character, and Wan's frozen tiny
UMT5 text encoder. The toy models (`train.py`, `wan_train.py`) are written with them, and so are
the tests' tiny random models (`anyv2v_core.testing.tiny_models`).
"""

from __future__ import annotations

import json
from pathlib import Path

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


WAN_TEXT_DIM = 16
WAN_SCHEDULER_CONFIG = {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000,
                        "prediction_type": "flow_prediction", "use_flow_sigmas": True}


def write_character_tokenizer(folder: Path, max_length: int = 512) -> None:
    """A fast tokenizer with one token per printable ASCII character and </s> at the end, as
    `AutoTokenizer` loads Wan's UMT5 tokenizer (pad 0, </s> 1, unk 2)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)
    fast.save_pretrained(folder)


def tiny_umt5():
    """A random UMT5 encoder, WAN_TEXT_DIM wide, for the character tokenizer's 98 ids."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=98, d_model=WAN_TEXT_DIM, d_kv=8, d_ff=32, num_layers=2,
                                       num_heads=2, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0))
