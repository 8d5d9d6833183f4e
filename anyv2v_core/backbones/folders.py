"""Reading a model folder without loading a weight: where it comes from, what it declares, whether
its component folders are complete and safe to load.

Below both the loader (`loading.py`) and the backbones that check their own folders (SEINE's
SD-1.4 parts, Wan's configs): it imports neither.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelLoadError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("AnyV2V")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# config file of each weightless component folder (the others hold config.json and weights)
CONFIG_FILES = {"tokenizer": "tokenizer_config.json", "feature_extractor": "preprocessor_config.json",
                "image_processor": "preprocessor_config.json", "scheduler": "scheduler_config.json"}


def resolve_source(source: str | os.PathLike, *, fp16_weights_only: bool = False) -> Path:
    """A local folder, or a Hugging Face repo id downloaded (safetensors and configs only).

    `fp16_weights_only` downloads just the `*.fp16.safetensors` weights where the repo has them
    (I2VGen-XL: 5 GB instead of 15 GB with its fp32 copies); repos without them download whole.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; pass the model folder that contains model_index.json")
        return path
    text = str(source)
    if not REPO_ID.match(text):
        raise ModelLoadError(f"model folder {path} does not exist; pass a diffusers model folder or a repo id like ali-vilab/i2vgen-xl")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(f"{text} is not a local folder and HF_HUB_OFFLINE=1 forbids downloading it; "
                             "download it once (huggingface-cli download) and pass the folder")
    import huggingface_hub

    configs = ["*.json", "*.txt", "*.model"]
    try:
        weights = ["*.safetensors"]
        if fp16_weights_only and any(f.endswith(".fp16.safetensors") for f in huggingface_hub.list_repo_files(text)):
            weights = ["*.fp16.safetensors"]
        logger.info("downloading %s (%s and configs) from the Hugging Face Hub", text, weights[0])
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=configs + weights))
    except Exception as error:  # the hub raises many types; the user needs one message
        raise ModelLoadError(f"could not download {text}: {error}") from None


def read_model_index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} has no model_index.json: it is not a diffusers model folder "
                             "(download the whole repository, e.g. huggingface-cli download ali-vilab/i2vgen-xl --local-dir ...)")
    try:
        return json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{index_file} is not valid JSON ({error}); download it again") from None


def pick_variant(folder: Path, variant: str | None, dtype: torch.dtype, denoiser: str = "unet") -> str | None:
    """Resolve variant="auto": the fp16 files where they are all the folder has (the recommended
    download) or where half precision is wanted anyway; else the full-precision files."""
    if variant != "auto":
        return variant
    weights = folder / denoiser / "diffusion_pytorch_model"
    has_full = any(Path(f"{weights}{suffix}").is_file() for suffix in (".safetensors", ".safetensors.index.json"))
    has_fp16 = any(Path(f"{weights}.fp16{suffix}").is_file() for suffix in (".safetensors", ".safetensors.index.json"))
    return "fp16" if has_fp16 and (dtype.itemsize == 2 or not has_full) else None


def check_components(folder: Path, components: dict[str, str | None], *, variant: str | None, allow_pickle: bool) -> bool:
    """Validate the component folders (component -> weight file stem, None for a weightless one such
    as the tokenizer); returns True when the weights are safetensors."""
    problems, pickled = [], []
    for component, stem in components.items():
        sub = folder / component
        if not sub.is_dir():
            problems.append(f"{component}/ is missing")
            continue
        if stem is None:
            if not (sub / CONFIG_FILES[component]).is_file():
                problems.append(f"{component}/{CONFIG_FILES[component]} is missing")
            continue
        if not (sub / "config.json").is_file():
            problems.append(f"{component}/config.json is missing")
        names = [stem + (f".{variant}" if variant else "")]
        safetensors = any((sub / f"{name}.safetensors").is_file() or (sub / f"{name}.safetensors.index.json").is_file()
                          for name in names)
        if safetensors:
            continue
        if any((sub / f"{name}{suffix}").is_file() for name in names for suffix in PICKLE_SUFFIXES):
            pickled.append(component)
        else:
            wanted = f"{names[0]}.safetensors"
            problems.append(f"{component}/{wanted} is missing" + (" (drop --variant?)" if variant else ""))
    if problems:
        raise ModelLoadError(f"model folder {folder} is incomplete: {'; '.join(problems)}; download the missing files")
    if pickled and not allow_pickle:
        raise ModelLoadError(
            f"{', '.join(pickled)} in {folder} have only pickle weights (.bin), which can run code when loaded; "
            "convert them to safetensors, or opt in with allow_pickle=True (CLI: --allow-pickle) if you trust the files"
        )
    return not pickled
