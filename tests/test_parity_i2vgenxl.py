"""Parity with the reference AnyV2V implementation on the tiny I2VGen-XL oracle (../shared/oracle).

The oracle's float noise floor is ~3e-5 and its settings differ from each other by >= 0.17, so
1e-3 absolute both proves parity and tells the settings apart.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from anyv2v_core.cli import main as cli_main
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.inversion import invert_video
from anyv2v_core.loading import load_backbone
from anyv2v_core.sampling import sample_edit
from anyv2v_core.video import read_frames, read_image

ATOL = 1e-3
SETTINGS = ["f0.2_s0.2_t0.5", "f1.0_s1.0_t1.0", "f0.0_s0.0_t0.0", "f1.0_s0.0_t0.0", "f0.0_s1.0_t0.0", "f0.0_s0.0_t1.0"]


def taus(setting: str) -> InjectionSettings:
    conv, spatial, temporal = (float(part[1:]) for part in setting.split("_"))
    return InjectionSettings(conv_tau=conv, spatial_tau=spatial, temporal_tau=temporal)


@pytest.fixture(scope="module")
def oracle(i2vgenxl_oracle):
    return {"dir": i2vgenxl_oracle, "meta": json.loads((i2vgenxl_oracle / "oracle.json").read_text())}


@pytest.fixture(scope="module")
def backbone(oracle):
    return load_backbone(oracle["dir"] / "model")


@pytest.fixture(scope="module")
def source(oracle):
    return read_frames(oracle["dir"] / "source_frames")[0]


@pytest.fixture(scope="module")
def inversion(backbone, source, oracle):
    steps = oracle["meta"]["inversion"]["n_steps"]
    return invert_video(backbone, source, inversion_steps=steps, sampling_steps=50, fps=8)


def test_components_match_the_reference(backbone, oracle):
    ref = load_file(oracle["dir"] / "unet_parity.safetensors")
    out = backbone.unet(ref["in.sample"], 501, fps=torch.tensor([8, 8]), image_latents=ref["in.image_latents"],
                        image_embeddings=ref["in.image_embeddings"], encoder_hidden_states=ref["in.encoder_hidden_states"],
                        return_dict=False)[0]
    torch.testing.assert_close(out, ref["out.unet"], atol=1e-5, rtol=0)
    hidden = backbone.text_encoder(ref["in.text_input_ids"], output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(backbone.text_encoder.final_layer_norm(hidden), ref["out.text_clip_skip1"], atol=1e-5, rtol=0)
    torch.testing.assert_close(backbone.image_encoder(ref["in.clip_pixel_values"]).image_embeds, ref["out.image_embeds"],
                               atol=1e-5, rtol=0)


def test_video_latents_and_inversion_match(backbone, source, inversion, oracle):
    ref = load_file(oracle["dir"] / "inversion.safetensors")
    torch.testing.assert_close(backbone.encode_video(source), ref["video_latents_x0"], atol=1e-4, rtol=0)
    for index, t in enumerate(ref["timesteps"].tolist()):
        if t in inversion.latents:
            torch.testing.assert_close(inversion.latents[t][0], ref["inverted_latents"][index], atol=ATOL, rtol=0)
    # only the 50 sampling timesteps are kept, not all 100 inversion steps
    assert sorted(inversion.latents) == sorted(oracle["meta"]["edit_common"]["timesteps"])


def test_first_step_conditioning_rows_match(backbone, inversion, oracle):
    """The batch [source, uncond, cond] at t=981: image latents and CLIP embeddings row by row."""
    ref = load_file(oracle["dir"] / "edit_pnp_f0.2_s0.2_t0.5.safetensors")
    edited = read_image(oracle["dir"] / "edited_first_frame.png")
    common = oracle["meta"]["edit_common"]
    rows = [inversion.source_condition,
            backbone.condition(edited, common["negative_prompt"], unconditional=True, num_frames=8, fps=8),
            backbone.condition(edited, common["prompt"], num_frames=8, fps=8)]
    torch.testing.assert_close(torch.cat([r.image_latents for r in rows]), ref["unet_step0_in.image_latents"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([r.image_embeddings for r in rows]), ref["unet_step0_in.image_embeddings"],
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([r.text_embeddings for r in rows]), ref["unet_step0_in.encoder_hidden_states"],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("setting", SETTINGS)
def test_edit_matches_the_reference(backbone, inversion, oracle, setting):
    ref = load_file(oracle["dir"] / f"edit_pnp_{setting}.safetensors")
    common = oracle["meta"]["edit_common"]
    edited = read_image(oracle["dir"] / "edited_first_frame.png")
    latents = sample_edit(backbone, inversion, edited, prompt=common["prompt"], negative_prompt=common["negative_prompt"],
                          injection=taus(setting), cfg=common["cfg"], start_index=common["ddim_init_latents_t_idx"])
    torch.testing.assert_close(latents[0], ref["final_latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(backbone.decode(latents), ref["frames"], atol=ATOL, rtol=0)


def test_cli_reproduces_the_default_setting(oracle, tmp_path):
    common = oracle["meta"]["edit_common"]
    out, latents_file = tmp_path / "edited.mp4", tmp_path / "latents.safetensors"
    status = cli_main([
        "edit", "--model", str(oracle["dir"] / "model"), "--video", str(oracle["dir"] / "source_frames"),
        "--edited-first-frame", str(oracle["dir"] / "edited_first_frame.png"), "--prompt", common["prompt"],
        "--out", str(out), "--inversion-steps", "100", "--size", "64x64", "--device", "cpu", "--dtype", "fp32",
        "--save-latents", str(latents_file),
    ])
    assert status == 0 and out.stat().st_size > 0
    saved = load_file(latents_file)
    ref = load_file(oracle["dir"] / "edit_pnp_f0.2_s0.2_t0.5.safetensors")
    torch.testing.assert_close(saved["latents"][0], ref["final_latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(saved["inverted_start"][0], ref["init_latents"], atol=ATOL, rtol=0)
    frames, _ = read_frames(out)
    assert frames.shape == (8, 64, 64, 3)
