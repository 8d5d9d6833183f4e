"""Whole edits (`pipeline.edit`) on every backbone: in half precision on the CPU (a dtype mismatch
shows here before a GPU user meets it), and decoded in chunks of frames (the frame-by-frame VAEs;
Wan's causal VAE decodes the whole clip)."""

from pathlib import Path

import pytest
import torch

from anyv2v_core.backbones.seine import load_seine
from anyv2v_core.loading import load_backbone
from anyv2v_core.pipeline import edit
from anyv2v_core.plan import EditSettings
from anyv2v_core.testing.tiny_models import WAN_KINDS, build_tiny_wan, moving_square_video
from conftest import oracle_path

FRAME_BY_FRAME_VAE = ("i2vgen-xl", "consisti2v", "seine")
SETTINGS = EditSettings(size_wh=(32, 32), num_frames=8, inversion_steps=4, steps=2, start_index=0)
WAN_SETTINGS = {"wan2.1-i2v": 32, "wan2.2-i2v-a14b": 32, "wan2.2-ti2v": 64}  # sizes: multiples of 16 / 32
# Mean |frame difference| from the float32 edit, about 4x what the tiny models measured (fp16 <= 0.011,
# bf16 <= 0.058 on ConsistI2V); frames of another edit differ by ~0.3.
HALF_PRECISION_TOLERANCE = {torch.float16: 0.04, torch.bfloat16: 0.2}


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny I2VGen-XL, and a folder for the tiny Wan models apart from it: other tests list the
    tiny I2VGen-XL's folder as ComfyUI's diffusers root and expect it alone there."""
    return {"i2vgen-xl": tiny_model_dir, "wan": tmp_path_factory.mktemp("wan-models")}


def load(name: str, dtype: torch.dtype, model_dirs: dict[str, Path]):
    if name == "i2vgen-xl":
        return load_backbone(model_dirs["i2vgen-xl"], dtype=dtype, device="cpu")
    if name == "consisti2v":
        return load_backbone(oracle_path("anyv2v-consisti2v") / "model", dtype=dtype, device="cpu")
    if name in WAN_KINDS:
        folder = model_dirs["wan"] / name
        if not folder.is_dir():
            build_tiny_wan(folder, name)
        return load_backbone(folder, dtype=dtype, device="cpu")
    model = oracle_path("anyv2v-seine") / "model"
    return load_seine(model / "stable-diffusion-v1-4", model / "seine_ema.safetensors", dtype=dtype)


def run_edit(backbone, settings: EditSettings = SETTINGS):
    if backbone.name in WAN_KINDS:  # Wan clips have 4k + 1 frames
        size = WAN_SETTINGS[backbone.name]
        settings = EditSettings(**{**vars(settings), "size_wh": (size, size), "num_frames": 9})
    source = moving_square_video(num_frames=settings.num_frames, size=settings.size_wh[0])
    return edit(backbone, source, source[:1].flip(-1), prompt="a square", settings=settings)


@pytest.fixture(scope="module")
def float32_edits(model_dirs):
    torch.set_num_threads(1)
    edits = {}

    def float32_edit(name: str):
        if name not in edits:
            backbone = load(name, torch.float32, model_dirs)
            edits[name] = (backbone, run_edit(backbone))
        return edits[name]

    return float32_edit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", FRAME_BY_FRAME_VAE + WAN_KINDS)
def test_half_precision_edit_is_finite_and_close_to_float32(float32_edits, model_dirs, name, dtype):
    _, expected = float32_edits(name)
    backbone = load(name, dtype, model_dirs)
    # (diffusers keeps a few of Wan's norm and modulation weights in float32)
    assert backbone.name == name and dtype in {parameter.dtype for parameter in backbone.denoiser.parameters()}
    result = run_edit(backbone)
    assert torch.isfinite(result.latents).all() and torch.isfinite(result.frames).all()
    difference = float((result.frames - expected.frames).abs().mean())
    assert difference < HALF_PRECISION_TOLERANCE[dtype], f"{name} in {dtype}: mean difference {difference:.3f}"


@pytest.mark.parametrize("name", FRAME_BY_FRAME_VAE)
def test_decoding_in_chunks_gives_the_frames_of_one_at_a_time(float32_edits, name):
    backbone, one_at_a_time = float32_edits(name)
    for chunk_size in (3, 8):
        frames = backbone.decode(one_at_a_time.latents, chunk_size)
        torch.testing.assert_close(frames, one_at_a_time.frames, atol=1e-5, rtol=0)
    chunked = run_edit(backbone, EditSettings(**{**vars(SETTINGS), "decode_chunk_size": 3}))
    torch.testing.assert_close(chunked.frames, one_at_a_time.frames, atol=1e-5, rtol=0)
