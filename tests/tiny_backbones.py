"""A tiny model of every backbone family the loader builds (`backbones.families.BACKBONES`), and a clip each
one takes: the one registry that tests running over all backbones iterate over, so a family
added to the loader is covered without anyone remembering it (`test_device_placement.py` fails
for a family missing here).

I2VGen-XL and the Wan layouts are written in-process (`anyv2v_core.testing.tiny_models`); ConsistI2V and
SEINE load their parity oracles' tiny models from ../shared/oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anyv2v_core.backbones.base import Backbone
from anyv2v_core.testing.tiny_models import build_tiny_i2vgenxl, build_tiny_wan
from anyv2v_core.windows import ContextWindows
from conftest import oracle_path


@dataclass(frozen=True)
class TinyBackbone:
    """How to get a tiny model of one family, and a short clip with temporal windows it takes."""

    build: Callable[[Path], Path]  # writes the tiny model under a scratch folder; returns what `load` reads
    load: Callable[[Path], Backbone]  # that model in fp32 on the CPU
    size: int  # working size (square)
    num_frames: int
    windows: ContextWindows  # at least two windows over the frames the model generates, where it can


def _load_folder(folder: Path) -> Backbone:
    from anyv2v_core.loading import load_backbone

    return load_backbone(folder, dtype="fp32")


def _consisti2v(_: Path) -> Path:
    return oracle_path("anyv2v-consisti2v") / "model"


def _seine(_: Path) -> Path:
    return oracle_path("anyv2v-seine") / "model"


def _load_seine(model: Path) -> Backbone:
    from anyv2v_core.backbones.seine import load_seine

    return load_seine(model / "stable-diffusion-v1-4", model / "seine_ema.safetensors")


def _wan(kind: str) -> Callable[[Path], Path]:
    return lambda root: build_tiny_wan(root / kind, kind)


# UNets: 4 frames in windows of 3 overlapping 1 (ConsistI2V generates 3 frames after its first: one
# window). Wan: windows of 5 video frames overlapping 4 are 2 latent frames overlapping 1; 9 frames
# are 3 latent frames (2 windows), TI2V's 13 frames 3 generated latent frames after the first (2 windows).
UNET_WINDOWS = ContextWindows(3, 1)
WAN_WINDOWS = ContextWindows(5, 4)
TINY_BACKBONES: dict[str, TinyBackbone] = {
    "i2vgen-xl": TinyBackbone(lambda root: build_tiny_i2vgenxl(root / "i2vgen-xl"), _load_folder, 32, 4, UNET_WINDOWS),
    "consisti2v": TinyBackbone(_consisti2v, _load_folder, 32, 4, UNET_WINDOWS),
    "seine": TinyBackbone(_seine, _load_seine, 32, 4, UNET_WINDOWS),
    "wan2.1-i2v": TinyBackbone(_wan("wan2.1-i2v"), _load_folder, 32, 9, WAN_WINDOWS),
    "wan2.2-i2v-a14b": TinyBackbone(_wan("wan2.2-i2v-a14b"), _load_folder, 32, 9, WAN_WINDOWS),
    "wan2.2-ti2v": TinyBackbone(_wan("wan2.2-ti2v"), _load_folder, 32, 13, WAN_WINDOWS),
}
