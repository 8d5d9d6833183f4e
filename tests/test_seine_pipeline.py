"""SEINE backbone against the reference AnyV2V run on the tiny oracle model: conditioning,
DDIM inversion (checked in segments), and the DDPM PnP edit replayed with the shipped noise."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from anyv2v_core.backbones.seine import find_seine_layout, load_seine
from anyv2v_core.errors import ModelLoadError
from tests.conftest import oracle_path

EDIT_PROMPT = "a magenta square sliding over a gradient"


@pytest.fixture(scope="module")
def oracle():
    return oracle_path("anyv2v-seine")


@pytest.fixture(scope="module")
def backbone(oracle):
    model = oracle / "model"
    return load_seine(model / "stable-diffusion-v1-4", model / "seine_ema.safetensors", dtype=torch.float32)


@pytest.fixture(scope="module")
def inversion_data(oracle):
    return load_file(str(oracle / "pipeline_inversion.safetensors"))


@pytest.fixture(scope="module")
def edit_data(oracle):
    return load_file(str(oracle / "pipeline_edit.safetensors"))


def read_png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


@pytest.fixture(scope="module")
def source_frames(oracle):
    return torch.stack([read_png(oracle / "pipeline" / "source_frames" / f"{i:05d}.png") for i in range(8)])


def assert_close(actual, expected, rel=1e-4):
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= rel, f"relative L2 error {error:.3g}"


def test_conditioning_matches_reference(backbone, oracle, source_frames, inversion_data, edit_data):
    assert_close(backbone.encode_video(source_frames), inversion_data["latent_at_0"], rel=1e-5)
    source = backbone.condition(source_frames[:1], "", num_frames=8, fps=8)
    assert torch.equal(source.mask, inversion_data["mask"])
    assert_close(source.masked_latents, inversion_data["masked_src_video_latent"], rel=1e-5)
    edited = read_png(oracle / "pipeline" / "edited_first_frame.png")[None]
    cond = backbone.condition(edited, EDIT_PROMPT, num_frames=8, fps=8)
    assert_close(cond.masked_latents, edit_data["masked_edited_video_latent"], rel=1e-5)
    texts = torch.cat([backbone.encode_prompt(""), cond.text_embeddings, backbone.encode_prompt("")])
    assert_close(texts, edit_data["text_embeddings_inv_cond_uncond"], rel=1e-5)


def test_schedule_matches_reference(backbone, inversion_data):
    schedule = backbone.schedule
    assert schedule.inversion_timesteps(500) == sorted(inversion_data["ddim_timesteps"].tolist())
    assert schedule.alpha(-1) == pytest.approx(float(schedule.alphas_cumprod[0]))  # first inversion step
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=0, atol=0)


@pytest.mark.parametrize("start, end", [(0, 1), (1, 21), (481, 501), (981, 997)])
def test_inversion_segments(backbone, inversion_data, start, end):
    """From a shipped latent, DDIM-invert up to the next shipped timestep (10 steps at most)."""
    saved = dict(zip(inversion_data["saved_latents_timesteps"].tolist(), inversion_data["saved_latents"]))
    saved[0] = inversion_data["latent_at_0"]
    row = backbone.condition(torch.zeros(1, 64, 128, 3), "", num_frames=8, fps=8)
    row.masked_latents = inversion_data["masked_src_video_latent"]  # the reference's exact conditioning
    schedule = backbone.schedule
    latents = saved[start]
    for t in [t for t in schedule.inversion_timesteps(500) if start < t <= end]:
        model_output = backbone.predict(latents, t, [row])
        latents = schedule.ddim_move(model_output, latents, *schedule.inversion_alphas(t, 500))
    assert_close(latents, saved[end])


def test_layout_detection(oracle, tmp_path):
    assert find_seine_layout(oracle / "model") is None  # the oracle names its file seine_ema.safetensors
    (tmp_path / "seine.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="stable-diffusion-v1-4"):
        find_seine_layout(tmp_path)
    sd = tmp_path / "stable-diffusion-v1-4"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet" / "config.json").write_text("{}")
    (sd / "vae").mkdir()
    assert find_seine_layout(tmp_path) == (sd, tmp_path / "seine.safetensors")


def test_pickled_checkpoint_needs_permission(oracle, tmp_path):
    state = load_file(str(oracle / "model" / "seine_ema.safetensors"))
    torch.save({"ema": state}, tmp_path / "seine.pt")
    sd = oracle / "model" / "stable-diffusion-v1-4"
    with pytest.raises(ModelLoadError, match="pickle"):
        load_seine(sd, tmp_path / "seine.pt")
    backbone = load_seine(sd, tmp_path / "seine.pt", allow_pickle=True)
    assert torch.equal(backbone.unet.conv_in.weight, state["conv_in.weight"])
