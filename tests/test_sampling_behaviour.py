"""What inversion and injected sampling do to the denoiser, observed from outside through public entry
points (`invert_video`, `sample_edit`): the timesteps and samples it receives, the rows it runs, and
which of its features the source row overwrites. Oracle-free invariants beside the parity tests."""

import pytest
import torch
from diffusers import DDIMInverseScheduler

from anyv2v_core.injection import InjectionSettings
from anyv2v_core.inversion import invert_video
from anyv2v_core.sampling import sample_edit
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.toy.components import SCHEDULER_CONFIG
from anyv2v_core.windows import ContextWindows
from spies import DenoiserCalls, OverwrittenFeatures, injected_names

PROMPT, NEGATIVE = "a blue square", "blurry"


def leading_timesteps(steps: int) -> list[int]:
    """The 1000-step schedule's "leading" timesteps with offset 1, descending: 981, 961, ..., 1 for 50."""
    return [1 + k * (1000 // steps) for k in reversed(range(steps))]


@pytest.fixture(scope="module")
def source():
    torch.set_num_threads(1)
    return moving_square_video(num_frames=4, size=16)


@pytest.fixture(scope="module")
def edited(source):
    return source[:1].flip(-1)


def edit(backbone, inversion, edited_first_frame, **settings):
    return sample_edit(backbone, inversion, edited_first_frame, prompt=PROMPT, negative_prompt=NEGATIVE, cfg=5.0,
                       **settings)


class Stop(Exception):
    pass


def stop_after(steps: int):
    def progress(done, total):
        if done == steps:
            raise Stop

    return progress


# ---------------------------------------------------------------------------------------------- inversion


def test_inversion_runs_the_denoiser_at_each_target_from_the_clean_latents(tiny_backbone, source):
    with DenoiserCalls(tiny_backbone.denoiser) as calls:
        invert_video(tiny_backbone, source, inversion_steps=20, sampling_steps=10)
    assert calls.timesteps == list(range(1, 1000, 50))  # the targets, ascending: 1, 51, ..., 951
    torch.testing.assert_close(calls.samples[0], tiny_backbone.encode_video(source), atol=0, rtol=0)


def test_inversion_equals_diffusers_inverse_ddim(tiny_backbone, source):
    """The reference inverts with diffusers' DDIMInverseScheduler: the same UNet under it gives our latents."""
    inversion = invert_video(tiny_backbone, source, inversion_steps=20, sampling_steps=10)
    scheduler = DDIMInverseScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    row = tiny_backbone.condition(source[:1], "", num_frames=len(source), fps=8)
    latents = tiny_backbone.encode_video(source)
    expected = {}
    for t in scheduler.timesteps:
        latents = scheduler.step(tiny_backbone.predict(latents, int(t), [row]), t, latents).prev_sample
        expected[int(t)] = latents
    assert sorted(inversion.latents) == leading_timesteps(10)[::-1]
    for t, latent in inversion.latents.items():
        torch.testing.assert_close(latent, expected[t], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def inversion(tiny_backbone, source):
    return invert_video(tiny_backbone, source, inversion_steps=20, sampling_steps=10)


@pytest.mark.parametrize("start_index", [0, 3])
def test_sampling_starts_from_the_inverted_latent_at_the_start_timestep(tiny_backbone, inversion, edited, start_index):
    with DenoiserCalls(tiny_backbone.denoiser) as calls, pytest.raises(Stop):
        edit(tiny_backbone, inversion, edited, start_index=start_index, progress=stop_after(1))
    start = leading_timesteps(10)[start_index]
    assert calls.timesteps == [start]
    (sample,) = calls.samples  # [source, uncond, cond]: all three rows are the inverted latent at the start
    for row in sample:
        torch.testing.assert_close(row[None], inversion.latent_at(start), atol=0, rtol=0)


def test_the_negative_row_has_no_image_embedding(tiny_backbone, inversion, edited):
    """I2VGen-XL's classifier-free guidance drops the image: the row with the negative prompt gets an
    all-zero CLIP image embedding, every other row a real one."""
    with DenoiserCalls(tiny_backbone.denoiser) as calls:
        edit(tiny_backbone, inversion, edited, injection=InjectionSettings(0.2, 0.2, 0.2))
    negative_text = tiny_backbone.encode_prompt(NEGATIVE)
    assert {call["image_embeddings"].shape[0] for call in calls.kwargs} == {2, 3}  # with and without the source row
    for call in calls.kwargs:
        negative = [torch.equal(text, negative_text[0]) for text in call["encoder_hidden_states"]]
        assert sum(negative) == 1
        for is_negative, embedding in zip(negative, call["image_embeddings"]):
            assert bool((embedding == 0).all()) == is_negative


def test_injection_overwrites_exactly_the_convs_and_the_attention_queries_and_keys(tiny_backbone, inversion, edited):
    """Every step of the conv and spatial windows (3 of 10 steps) overwrites the residual conv and Q, K of
    the spatial and temporal self-attentions; the temporal window's further steps only the temporal Q, K.
    V is never overwritten, nor anything else."""
    layers = tiny_backbone.injection_layers
    with OverwrittenFeatures(tiny_backbone.denoiser) as seen:
        edit(tiny_backbone, inversion, edited, injection=InjectionSettings(conv_tau=0.3, spatial_tau=0.3,
                                                                           temporal_tau=0.6))
    everything = injected_names(layers, "conv", "spatial", "temporal")
    assert all(".to_v" not in name for name in everything) and len(everything) == 1 + 2 * 2 * 8
    assert seen.rows == [3] * 6 + [2] * 4  # the source row runs while any window is open
    assert seen.calls == [everything] * 3 + [injected_names(layers, "temporal")] * 3


def test_tau_windows_truncate_fractional_step_counts(tiny_backbone, source, edited):
    """The reference's window is int(steps * tau): 50 x 0.15 = 7.5 -> 7 steps, 50 x 0.35 = 17.5 -> 17
    (the node offers taus in steps of 0.05, so such products are common)."""
    inversion = invert_video(tiny_backbone, source, inversion_steps=50, sampling_steps=50)
    with OverwrittenFeatures(tiny_backbone.denoiser) as seen:
        edit(tiny_backbone, inversion, edited, injection=InjectionSettings(conv_tau=0.15, spatial_tau=0.35,
                                                                           temporal_tau=0.0))
    layers = tiny_backbone.injection_layers
    assert seen.calls == [injected_names(layers, "conv", "spatial")] * 7 + [injected_names(layers, "spatial")] * 10


def test_windowed_inversion_and_sampling_run_every_step_in_windows_each_with_the_source_row(tiny_backbone):
    """8 frames in windows of 4 sharing 2: each inversion and sampling step calls the denoiser once per
    window ([0, 4), [2, 6), [4, 8)) with at most 4 frames, and while injection is on every window's batch
    starts with the source row: the inverted latent's frames of that window."""
    video = moving_square_video(num_frames=8, size=16)
    windows = ContextWindows(length=4, overlap=2)
    with DenoiserCalls(tiny_backbone.denoiser) as inverting:
        inversion = invert_video(tiny_backbone, video, inversion_steps=10, sampling_steps=5, windows=windows)
    with DenoiserCalls(tiny_backbone.denoiser) as sampling:
        edit(tiny_backbone, inversion, video[:1].flip(-1), injection=InjectionSettings(0.4, 0.4, 0.6))
    timesteps = leading_timesteps(5)
    assert inverting.timesteps == [t for t in range(1, 1000, 100) for _ in range(3)]
    assert sampling.timesteps == [t for t in timesteps for _ in range(3)]
    assert all(sample.shape[2] <= 4 for sample in inverting.samples + sampling.samples)
    for step, t in enumerate(timesteps[:3]):  # int(5 * 0.6) = 3 steps with injection
        inverted = inversion.latent_at(t)[0]
        starts = []
        for sample in sampling.samples[3 * step : 3 * step + 3]:
            assert sample.shape[0] == 3, "a window ran without the source row"
            frames = sample.shape[2]
            starts += [s for s in range(9 - frames) if torch.equal(sample[0], inverted[:, s : s + frames])]
        assert starts == [0, 2, 4], f"step {step}: the source rows are the inverted frames at {starts}"
