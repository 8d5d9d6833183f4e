"""Inversions on disk (`inversion_store.py`) and editing from a given inversion (`edit(inversion=...)`):
a loaded inversion gives bit-identical edits; keys and row fields of any kind the engine uses come
back with their types; what would not come back as it was is refused before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anyv2v_core.backbones.i2vgen_xl import I2VGenXLRow
from anyv2v_core.backbones.seine import SeineRow
from anyv2v_core.errors import AnyV2VError
from anyv2v_core.inversion import Inversion
from anyv2v_core.inversion_store import load_inversion, save_inversion
from anyv2v_core.pipeline import edit, invert_source
from anyv2v_core.plan import EditSettings
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.windows import ContextWindows

SOURCE = moving_square_video(6)
EDITED = SOURCE[:1].flip(-1)
SETTINGS = EditSettings(size_wh=(32, 32), inversion_steps=8, steps=4)


def test_a_loaded_inversion_edits_bit_identically(tiny_backbone, tmp_path):
    inversion = invert_source(tiny_backbone, SOURCE, SETTINGS)
    loaded = load_inversion(save_inversion(tmp_path / "inversion.safetensors", inversion))

    assert list(loaded.latents) == list(inversion.latents)
    assert all(torch.equal(loaded.latents[key], inversion.latents[key]) for key in inversion.latents)
    fresh = edit(tiny_backbone, SOURCE, EDITED, prompt="a blue square", settings=SETTINGS)
    from_memory = edit(tiny_backbone, SOURCE, EDITED, prompt="a blue square", settings=SETTINGS, inversion=inversion)
    from_disk = edit(tiny_backbone, SOURCE, EDITED, prompt="a blue square", settings=SETTINGS, inversion=loaded)
    assert torch.equal(from_memory.frames, fresh.frames) and torch.equal(from_memory.latents, fresh.latents)
    assert torch.equal(from_disk.frames, fresh.frames) and torch.equal(from_disk.latents, fresh.latents)


def synthetic_inversion(source_condition, latents, windows=None) -> Inversion:
    return Inversion(latents=latents, source_condition=source_condition, source_first_frame=torch.rand(1, 32, 32, 3),
                     backbone_name="test", num_frames=4, fps=8, inversion_steps=8, sampling_steps=4, windows=windows)


@pytest.mark.parametrize("row", [
    I2VGenXLRow(text_embeddings=torch.randn(1, 77, 16), image_embeddings=torch.randn(1, 1, 16),
                image_latents=torch.randn(1, 4, 4, 4, 4), fps=8),
    SeineRow(text_embeddings=torch.randn(1, 77, 16, dtype=torch.float16), mask=torch.ones(1, 1, 4, 4, 4),
             masked_latents=torch.randn(1, 4, 4, 4, 4)),
], ids=["i2vgen-xl row", "seine row, half-precision text"])
def test_keys_and_fields_come_back_with_their_types(tmp_path, row):
    latents = {0.25: torch.randn(1, 4, 4, 4, 4), 1.0: torch.randn(1, 4, 4, 4, 4), 7: torch.randn(1, 4, 4, 4, 4)}
    inversion = synthetic_inversion(row, latents, windows=ContextWindows(4, 1))
    loaded = load_inversion(save_inversion(tmp_path / "inversion.safetensors", inversion))

    assert [(key, type(key)) for key in loaded.latents] == [(0.25, float), (1.0, float), (7, int)]
    assert loaded.windows == ContextWindows(4, 1)
    assert type(loaded.source_condition) is type(row)
    for field in dataclasses.fields(row):
        saved, back = getattr(row, field.name), getattr(loaded.source_condition, field.name)
        if isinstance(saved, torch.Tensor):
            assert back.dtype == saved.dtype and torch.equal(back, saved), field.name
        else:
            assert type(back) is type(saved) and back == saved, field.name
    assert {name: getattr(loaded, name) for name in ("backbone_name", "num_frames", "fps", "sampling_steps")} == \
        {"backbone_name": "test", "num_frames": 4, "fps": 8, "sampling_steps": 4}


@dataclasses.dataclass
class OutsideRow:  # a row class from outside the package: a file could not name it safely
    text_embeddings: torch.Tensor


@pytest.mark.parametrize("condition, message", [
    (OutsideRow(torch.zeros(1, 77, 16)), "not a top-level class of anyv2v_core"),
    (I2VGenXLRow(torch.zeros(1, 77, 16), torch.zeros(1, 1, 16), torch.zeros(1, 4, 4, 4, 4), fps={8}),
     "inversion.source_condition.fps: a set"),
    (I2VGenXLRow(torch.nn.Parameter(torch.zeros(1, 77, 16)), torch.zeros(1, 1, 16), torch.zeros(1, 4, 4, 4, 4), 8),
     "a Parameter would load back as a plain tensor"),
], ids=["class outside the package", "set value", "tensor subclass"])
def test_what_would_not_come_back_is_refused_before_writing(tmp_path, condition, message):
    inversion = synthetic_inversion(condition, {1: torch.zeros(1, 4, 4, 4, 4)})
    with pytest.raises(AnyV2VError, match=message):
        save_inversion(tmp_path / "inversion.safetensors", inversion)
    assert list(tmp_path.iterdir()) == []


def test_an_inversion_for_other_settings_is_refused(tiny_backbone):
    inversion = invert_source(tiny_backbone, SOURCE, SETTINGS)
    other = dataclasses.replace(SETTINGS, steps=2)
    with pytest.raises(AnyV2VError, match=r"sampling steps 4 \(asked: 2\)"):
        edit(tiny_backbone, SOURCE, EDITED, prompt="x", settings=other, inversion=inversion)


def test_a_file_that_is_not_an_inversion_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2)}, tmp_path / "latents.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AnyV2VError, match="not an AnyV2V inversion file"):
        load_inversion(tmp_path / "latents.safetensors")
    with pytest.raises(AnyV2VError, match="could not read the inversion file"):
        load_inversion(tmp_path / "junk.safetensors")
