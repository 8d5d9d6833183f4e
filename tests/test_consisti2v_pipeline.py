"""AnyV2V on ConsistI2V against the reference run (oracle `pipeline_parity`): text and VAE
conditioning, DDIM inversion (100 steps; the first 22 are run to keep the file fast), the
injected edit (50 steps from index 4, cfg 35, windows 0.2/0.2/0.5) from the reference's
inverted latents, and the decoded video.

With cfg 35 on random weights the edit latents grow to |x| ~ 130, so errors are relative to the
largest reference value: tight for inversion and the first steps (1e-5 .. 1e-4), looser for the final latents (2e-4).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from anyv2v_core.backbones.consisti2v import ConsistI2VBackbone
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.inversion import Inversion, invert_video
from anyv2v_core.sampling import sample_edit
from conftest import oracle_path

PROMPT = "a blue square moving over a colorful gradient"


# The reference's float32 VAE encodings were made on another CPU: summation order alone moves them by
# ~1e-6 of their range across CPU families (1.2e-6 on an AMD EPYC), so latents are compared at 5e-6.
ENCODING_TOLERANCE = 5e-6


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def read_image(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


@pytest.fixture(scope="module")
def oracle():
    torch.set_num_threads(1)
    return oracle_path("anyv2v-consisti2v")


@pytest.fixture(scope="module")
def reference(oracle):
    return load_file(str(oracle / "pipeline_parity.safetensors"))


@pytest.fixture(scope="module")
def backbone(oracle):
    return ConsistI2VBackbone.from_folder(oracle / "model")


@pytest.fixture(scope="module")
def source_frames(oracle):
    return torch.stack([read_image(path) for path in sorted((oracle / "source_frames").glob("*.png"))])


@pytest.fixture(scope="module")
def edited_first_frame(oracle):
    return read_image(oracle / "edited_first_frame.png")[None]


@pytest.fixture(scope="module")
def inversion(backbone, reference, source_frames):
    """The reference's inversion as an `Inversion`, so the edit is checked on exactly the
    reference's input (our own inversion is checked in `test_inversion_matches_reference`)."""
    latents = reference["inversion.latents_at_sampling_timesteps"][:, :, 1:]  # the state: frames 1..F-1
    timesteps = reference["inversion.sampling_timesteps"].tolist()
    return Inversion(
        latents={t: latents[k : k + 1].clone() for k, t in enumerate(timesteps)},
        source_condition=backbone.condition(source_frames[:1], "", num_frames=len(source_frames), fps=8),
        source_first_frame=source_frames[:1],
        backbone_name=backbone.name,
        num_frames=len(source_frames),
        fps=8,
        inversion_steps=100,
        sampling_steps=50,
    )


class UNetCalls:
    """Records the positional inputs (and the output) of every UNet call while installed."""

    def __init__(self, unet):
        self.unet, self.inputs, self.outputs = unet, [], []

    def __enter__(self):
        self.handles = [
            self.unet.register_forward_pre_hook(lambda m, args: self.inputs.append([a for a in args])),
            self.unet.register_forward_hook(lambda m, args, out: self.outputs.append(out)),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def run_edit(backbone, inversion, edited_first_frame, progress=None):
    return sample_edit(
        backbone, inversion, edited_first_frame, prompt=PROMPT, negative_prompt=backbone.defaults.negative_prompt,
        injection=InjectionSettings(conv_tau=0.2, spatial_tau=0.2, temporal_tau=0.5),
        cfg=backbone.defaults.cfg, start_index=backbone.defaults.start_index, progress=progress,
    )


@pytest.fixture(scope="module")
def edit(backbone, inversion, edited_first_frame):
    with UNetCalls(backbone.unet) as calls:
        latents = run_edit(backbone, inversion, edited_first_frame)
    return latents, calls


def test_text_and_first_frame_conditioning_match_reference(backbone, reference, source_frames, edited_first_frame):
    for name, prompt in (("editing_prompt", PROMPT), ("empty_prompt", ""),
                         ("negative_prompt", backbone.defaults.negative_prompt)):
        ids = backbone.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        assert torch.equal(ids, reference[f"text.{name}.input_ids"]), name
        assert relative_error(backbone.encode_prompt(prompt), reference[f"text.{name}.embeds"]) < 1e-5, name
    video = backbone.encode_video(source_frames)  # VAE posterior mean * 0.18215
    assert relative_error(video, reference["encode.video_latents_at_0"]) < ENCODING_TOLERANCE
    edited = backbone.encode_video(edited_first_frame)[:, :, 0]
    assert relative_error(edited, reference["encode.edited_first_frame_latent"]) < ENCODING_TOLERANCE


class Stop(Exception):
    pass


def stop_after(steps):
    def progress(done, total):
        if done == steps:
            raise Stop

    return progress


def test_inversion_matches_reference(backbone, source_frames, reference):
    """The first 22 of the 100 inversion steps (t = 1 ... 211; the whole run is 100 UNet calls).
    The latents after step k are the UNet input of step k + 1."""
    expected = reference["inversion.latents_at_sampling_timesteps"]  # [50, C, F, h, w], frame 0 = clean first frame
    timesteps = reference["inversion.sampling_timesteps"].tolist()
    with UNetCalls(backbone.unet) as calls, pytest.raises(Stop):
        invert_video(backbone, source_frames, inversion_steps=100, sampling_steps=50, progress=stop_after(22))
    targets = reference["inversion.all_timesteps_ascending"].tolist()
    assert [int(args[1]) for args in calls.inputs] == targets[:22]
    first_frame = reference["encode.source_first_frame_latent"]
    assert all(relative_error(args[3][:, :, 0], first_frame) < ENCODING_TOLERANCE for args in calls.inputs)  # source first frame
    # the sampling state is frames 1..F-1: the first frame is conditioning, never inverted
    assert relative_error(calls.inputs[0][0], reference["encode.video_latents_at_0"][:, :, 1:]) < ENCODING_TOLERANCE
    checked = 0
    for k, t in enumerate(timesteps):
        step = targets.index(t) + 1
        if step < len(calls.inputs):
            assert relative_error(calls.inputs[step][0][0], expected[k, :, 1:]) < 1e-5, t
            checked += 1
    assert checked == 11


def test_edit_first_step_is_the_reference_batch(edit, reference):
    """Rows [source, uncond, cond]. Reference quirk: all three first-frame rows are the *edited*
    first frame, the source row included."""
    _, calls = edit
    sample, timestep, text, first_frames, frame_stride = calls.inputs[0]
    assert int(timestep) == int(reference["pnp.step0_unet_input.timestep"]) == 901
    assert frame_stride == int(reference["pnp.step0_unet_input.frame_stride"])
    assert relative_error(sample, reference["pnp.step0_unet_input.sample"]) < 1e-4
    assert relative_error(text, reference["pnp.step0_unet_input.encoder_hidden_states"]) < 1e-5
    assert torch.equal(first_frames[0], first_frames[1]) and torch.equal(first_frames[1], first_frames[2])
    assert relative_error(first_frames, reference["pnp.step0_unet_input.first_frame_latents"]) < ENCODING_TOLERANCE
    assert relative_error(calls.outputs[0], reference["pnp.step0_unet_output"]) < 1e-4  # injection active


def test_edit_latents_match_reference(edit, reference):
    latents, calls = edit
    timesteps = reference["pnp.timesteps_used"].tolist()
    assert [int(args[1]) for args in calls.inputs] == timesteps
    # batch sizes: the source row is dropped once the last window (temporal, until t=501) ends
    assert [args[0].shape[0] for args in calls.inputs] == [3 if t >= 501 else 2 for t in timesteps]
    for step, t in enumerate((901, 881, 861), start=1):  # the cond row of the next call
        assert relative_error(calls.inputs[step][0][-1:], reference[f"pnp.latents_after_step_t{t}"]) < 1e-4, t
    # output = the edited first frame's latent, then the sampled frames
    assert relative_error(latents, reference["pnp.final_latents_with_first_frame"]) < 2e-4


def test_edited_video_matches_reference(backbone, edit, reference):
    latents, _ = edit
    frames = backbone.decode(latents)  # [F, H, W, 3]
    expected_u8 = reference["pnp.video_u8"][0].permute(1, 2, 3, 0)
    ours_u8 = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    assert (ours_u8.int() - expected_u8.int()).abs().max() <= 1
    assert relative_error(frames[1].permute(2, 0, 1), reference["pnp.video_float_frame1"][0]) < 2e-4


def test_corrected_variant_conditions_the_source_row_on_the_source_first_frame(
    backbone, inversion, edited_first_frame, reference
):
    backbone.source_branch_first_frame = "source"
    try:
        with UNetCalls(backbone.unet) as calls, pytest.raises(Stop):
            run_edit(backbone, inversion, edited_first_frame, progress=stop_after(1))
    finally:
        backbone.source_branch_first_frame = "edited"
    first_frames = calls.inputs[0][3]
    assert relative_error(first_frames[0, :, 0], reference["encode.source_first_frame_latent"][0]) < ENCODING_TOLERANCE
    assert relative_error(first_frames[1:, :, 0], reference["encode.edited_first_frame_latent"].expand(2, -1, -1, -1)) < ENCODING_TOLERANCE
