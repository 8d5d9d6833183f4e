"""SEINE backbone against the reference AnyV2V run on the tiny oracle model: conditioning,
DDIM inversion (checked in segments), and the DDPM PnP edit replayed with the shipped noise."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from anyv2v_core.backbones.families import SEINE
from anyv2v_core.backbones.seine import load_seine
from anyv2v_core.errors import ModelLoadError
from conftest import oracle_path

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


@pytest.mark.parametrize("start, end", [(0, 1), (1, 21), (981, 997)])
def test_inversion_segments(backbone, inversion_data, start, end):
    """From a shipped latent, DDIM-invert up to the next shipped timestep (10 steps at most)."""
    saved = dict(zip(inversion_data["saved_latents_timesteps"].tolist(), inversion_data["saved_latents"]))
    saved[0] = inversion_data["latent_at_0"]
    row = backbone.condition(torch.zeros(1, 64, 128, 3), "", num_frames=8, fps=8)
    row.masked_latents = inversion_data["masked_src_video_latent"]  # the reference's exact conditioning
    schedule = backbone.schedule
    latents = saved[start]
    for step in [step for step in schedule.inversion_steps(500, 50) if start < step.end <= end]:
        latents = step.invert(latents, lambda x, time, level: backbone.predict(x, time, [row]))
    assert_close(latents, saved[end])


def test_layout_detection(oracle, tmp_path):
    assert SEINE.find_layout(oracle / "model") is None  # the oracle names its file seine_ema.safetensors
    (tmp_path / "seine.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="stable-diffusion-v1-4"):
        SEINE.find_layout(tmp_path)
    sd = tmp_path / "stable-diffusion-v1-4"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet" / "config.json").write_text("{}")
    (sd / "vae").mkdir()
    assert SEINE.find_layout(tmp_path) == (sd, tmp_path / "seine.safetensors")


def test_pickled_checkpoint_needs_permission(oracle, tmp_path):
    state = load_file(str(oracle / "model" / "seine_ema.safetensors"))
    torch.save({"ema": state}, tmp_path / "seine.pt")
    sd = oracle / "model" / "stable-diffusion-v1-4"
    with pytest.raises(ModelLoadError, match="pickle"):
        load_seine(sd, tmp_path / "seine.pt")
    backbone = load_seine(sd, tmp_path / "seine.pt", allow_pickle=True)
    assert torch.equal(backbone.unet.conv_in.weight, state["conv_in.weight"])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("start, num_steps", [(0, 3), (23, 2), (47, 3)])
def test_ddpm_edit_replays_reference(backbone, oracle, source_frames, inversion_data, edit_data, start, num_steps):
    """The reference's edit (DDPM, cfg 4, PnP 0.2/0.2/0.5), replayed with its own noise in segments:
    the first steps (every injection on), the end of the temporal window (t=500), the last steps."""
    from anyv2v_core.injection import InjectionSettings
    from anyv2v_core.inversion import Inversion
    from anyv2v_core.sampling import sample_edit

    saved = dict(zip(inversion_data["saved_latents_timesteps"].tolist(), inversion_data["saved_latents"]))
    source = backbone.condition(source_frames[:1], "", num_frames=8, fps=8)
    source.masked_latents = inversion_data["masked_src_video_latent"]
    inversion = Inversion(latents={t: saved[t] for t in backbone.schedule.timesteps(50)}, source_condition=source,
                          source_first_frame=source_frames[:1], backbone_name=backbone.name, num_frames=8, fps=8,
                          inversion_steps=500, sampling_steps=50)
    edited = read_png(oracle / "pipeline" / "edited_first_frame.png")[None]

    calls = []  # (timestep, UNet input latents) of every call; the last one is recorded, not run
    predict = backbone.predict

    def recording_predict(latents, timestep, rows):
        calls.append((timestep, latents.clone()))
        if len(calls) > num_steps:
            raise _Stop
        return predict(latents, timestep, rows)

    backbone.predict = recording_predict
    try:
        # (the reference's x_T is its inverted latent at 997, see README: x_t[0] here)
        x_0 = sample_edit(backbone, inversion, edited, prompt=EDIT_PROMPT, negative_prompt="", cfg=4.0,
                          injection=InjectionSettings(0.2, 0.2, 0.5), sampler="ddpm", start_index=start,
                          initial_latents=edit_data["x_t"][start], noise=edit_data["noise"][start:])
    except _Stop:
        x_0 = None
    finally:
        del backbone.predict
    timesteps = edit_data["timesteps"].tolist()
    assert [t for t, _ in calls] == timesteps[start : start + len(calls)]
    for i, (t, batch) in enumerate(calls, start=start):
        rows = 3 if t >= 500 else 2  # the source row runs while temporal injection is on (980..500)
        assert batch.shape[0] == rows
        if rows == 3:  # DDPM: the source row is the inverted latent at t + 1
            assert torch.equal(batch[0], saved[t + 1][0])
        assert_close(batch[-1:], edit_data["x_t"][i])
    if start + num_steps == len(timesteps):
        assert_close(x_0, edit_data["x_0"])


def test_seeded_ddpm_and_ddim_samplers_are_replayable(backbone, source_frames, inversion_data):
    """The last two steps with each sampler: DDPM is the backbone's default and follows its seed,
    DDIM is deterministic and runs at the inversion's timesteps."""
    from anyv2v_core.inversion import Inversion
    from anyv2v_core.sampling import sample_edit

    saved = dict(zip(inversion_data["saved_latents_timesteps"].tolist(), inversion_data["saved_latents"]))
    source = backbone.condition(source_frames[:1], "", num_frames=8, fps=8)
    inversion = Inversion(latents={t: saved[t] for t in backbone.schedule.timesteps(50)}, source_condition=source,
                          source_first_frame=source_frames[:1], backbone_name=backbone.name, num_frames=8, fps=8,
                          inversion_steps=500, sampling_steps=50)
    timesteps = []
    predict = backbone.predict
    backbone.predict = lambda latents, t, rows: timesteps.append(t) or predict(latents, t, rows)
    try:
        def run(**kwargs):
            return sample_edit(backbone, inversion, source_frames[:1], prompt=EDIT_PROMPT, negative_prompt="",
                               cfg=4.0, start_index=48, **kwargs)

        assert backbone.sampler == "ddpm"
        first, again, other = run(seed=3), run(seed=3), run(seed=4)
        assert timesteps == [20, 0] * 3
        assert torch.equal(first, again) and not torch.allclose(first, other)
        timesteps.clear()
        ddim = run(sampler="ddim")
        assert timesteps == [21, 1]
        assert torch.equal(ddim, run(sampler="ddim", seed=4))
    finally:
        del backbone.predict


def test_edit_starts_from_the_noisiest_saved_latent(backbone, source_frames, inversion_data):
    """SEINE's reference starts its edit from the inverted latent at t=997, beyond the first step's 981."""
    from anyv2v_core.inversion import Inversion
    from anyv2v_core.plan import start_level
    from anyv2v_core.sampling import sample_edit

    assert start_level(backbone, 500, 50) == 997
    assert start_level(backbone, 100, 50) == 991
    assert start_level(backbone, 500, 50, start_index=3) == 921
    saved = dict(zip(inversion_data["saved_latents_timesteps"].tolist(), inversion_data["saved_latents"]))
    source = backbone.condition(source_frames[:1], "", num_frames=8, fps=8)
    inversion = Inversion(latents=saved, source_condition=source, source_first_frame=source_frames[:1],
                          backbone_name=backbone.name, num_frames=8, fps=8, inversion_steps=500, sampling_steps=50)
    first_inputs = []

    def stop_at_first_call(latents, timestep, rows):
        first_inputs.append(latents[-1:].clone())
        raise _Stop

    backbone.predict = stop_at_first_call
    try:
        with pytest.raises(_Stop):
            sample_edit(backbone, inversion, source_frames[:1], prompt=EDIT_PROMPT, negative_prompt="", cfg=4.0)
    finally:
        del backbone.predict
    assert torch.equal(first_inputs[0], saved[997])
