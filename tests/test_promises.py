"""Promises of the engine and the nodes that an outside audit found unpinned (issue 21), each held
by what the code observably does: the model times the denoiser receives, the tensors still alive
in memory, where the weights are when a network runs, what a node returns. Each test names the
mutation of `benchmarks/mutation.py` that it catches.
"""

from __future__ import annotations

import json
import weakref
from fractions import Fraction

import pytest
import torch

from anyv2v_core.errors import AnyV2VError
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.inversion import invert_video
from anyv2v_core.loading import load_backbone
from anyv2v_core.sampling import sample_edit
from anyv2v_core.testing.tiny_models import build_tiny_wan, moving_square_video
from anyv2v_core.video import write_image, write_video
from test_nodes import load_pack

WAN_SIZE, WAN_FRAMES = 32, 5  # 2 latent frames


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "wan2.1-i2v", "wan2.1-i2v")


@pytest.fixture(scope="module")
def wan(wan_folder):
    torch.set_num_threads(1)
    return load_backbone(wan_folder, dtype="fp32")


@pytest.fixture
def model_times(monkeypatch):
    """Every model time (timestep / 1000, i.e. the sigma) a Wan transformer receives while the test runs."""
    from diffusers import WanTransformer3DModel

    seen: list[float] = []
    forward = WanTransformer3DModel.forward

    def recording(self, *args, **kwargs):
        seen.append(float(kwargs["timestep"].flatten()[0]) / 1000)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "forward", recording)
    return seen


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("order, per_step", [(1, 3), (2, 4)])
def test_a_finer_inversion_grid_evaluates_rising_sigmas_evenly_spaced_in_every_sampling_interval(
        wan, model_times, order, per_step):
    """Inverting at `per_step` times the sampling steps subdivides each sampling interval evenly:
    the model is evaluated at sigmas that rise steadily, order * per_step of them in each interval
    [sigma_k, sigma_k+1) of the (shifted) sampling grid, evenly spaced there.
    Mutations: finer-inversion-grid-uneven, finer-inversion-grid-out-of-order."""
    steps = 3
    frames = moving_square_video(WAN_FRAMES, WAN_SIZE)
    invert_video(wan, frames, inversion_steps=per_step * steps, sampling_steps=steps, order=order)
    coarse = wan.schedule.sigmas(steps)[::-1]  # ascending from 0 to 1; shift 3 bends it
    assert len(set(round(b - a, 4) for a, b in zip(coarse, coarse[1:]))) == steps, "the test needs a bent grid"
    points = order * per_step
    expected = [low + (high - low) * float(Fraction(j, points)) for low, high in zip(coarse, coarse[1:])
                for j in range(points)]
    assert model_times == sorted(model_times) and len(set(model_times)) == len(model_times), "sigmas must rise"
    assert model_times == pytest.approx(expected, abs=2e-6)


def invert_two_steps(backbone) -> None:
    invert_video(backbone, moving_square_video(WAN_FRAMES, WAN_SIZE), inversion_steps=2, sampling_steps=2, order=1)


SHIFT = 7.0  # sigma at s = 1/2: 7 * 0.5 / (1 + 6 * 0.5) = 0.875 (Wan 2.1's default 3 gives 0.75)


def test_the_loaders_shift_reaches_the_sigmas_the_transformer_receives(wan_folder, model_times):
    """Mutation: loader-shift-ignored."""
    invert_two_steps(load_backbone(wan_folder, dtype="fp32", shift=SHIFT))
    assert model_times == [0.0, 0.875]
    model_times.clear()
    invert_two_steps(load_backbone(wan_folder, dtype="fp32"))
    assert model_times == [0.0, 0.75]


@pytest.fixture
def wan_edit_inputs(wan_folder, tmp_path):
    frames = moving_square_video(WAN_FRAMES, WAN_SIZE)
    return {"model": str(wan_folder), "video": str(write_video(tmp_path / "source.mp4", frames, fps=16)),
            "edited_first_frame": str(write_image(tmp_path / "first.png", frames[0].flip(-1))), "prompt": "a square",
            "size": f"{WAN_SIZE}x{WAN_SIZE}", "steps": 2, "inversion_steps": 2, "inversion_order": 1, "shift": SHIFT}


def test_the_cli_shift_reaches_the_sigmas_the_transformer_receives(wan_edit_inputs, model_times, tmp_path):
    """Inversion (0, 0.875) and sampling (1, 0.875) at the shifted sigmas. Mutation: cli-shift-dropped."""
    from anyv2v_core.cli import main

    argv = ["edit", "--out", str(tmp_path / "edited.mp4")]
    for key, value in wan_edit_inputs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    assert sorted(set(model_times)) == [0.0, 0.875, 1.0]


def test_a_batch_jobs_shift_reaches_the_sigmas_the_transformer_receives(wan_edit_inputs, model_times, tmp_path):
    """Mutation: cli-shift-dropped (the batch reads its job lines with the CLI's parser and options)."""
    from anyv2v_core.batch.runner import run_batch

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(wan_edit_inputs) + "\n")
    summary = run_batch(jobs, tmp_path / "out", inversion_cache=None, stream=None)
    assert (summary.done, summary.failed) == (1, 0)
    assert sorted(set(model_times)) == [0.0, 0.875, 1.0]


# ---------------------------------------------------------------------------------------------- memory


def test_rows_one_at_a_time_hold_one_blocks_source_query_and_key_at_most_and_none_after_it(wan):
    """The memory promise of rows one at a time (on Wan 14B every block's source Q/K together would be
    tens of GB): the source row's injected Q/K tensors stay alive only until the edit rows of their
    own block have run. Watched with weak references: nothing here keeps them alive.
    Mutation: one-row-source-outputs-kept."""
    frames = moving_square_video(WAN_FRAMES, WAN_SIZE)
    inversion = invert_video(wan, frames, inversion_steps=2, sampling_steps=2)
    modules = dict(wan.denoiser.named_modules())
    attentions = [modules[name] for name in wan.injection_layers.attention]
    source_outputs: list[tuple[int, weakref.ref]] = []  # (block index, the source row's Q or K)
    calls: dict[torch.nn.Module, int] = {}
    held_while_edit_rows_ran, alive_at_block_start = [], []

    def watch(block: int):
        def record(module, args, output) -> None:
            row = calls.get(module, 0) % 3  # each block runs rows 0 (source), 1, 2 one after another
            calls[module] = calls.get(module, 0) + 1
            if row == 0:
                source_outputs.append((block, weakref.ref(output)))
            else:
                held_while_edit_rows_ran.append(any(b == block and ref() is not None for b, ref in source_outputs))
        return record

    def block_starts(module, args) -> None:
        alive_at_block_start.append(sum(ref() is not None for _, ref in source_outputs))

    handles = []
    for index, attention in enumerate(attentions):
        handles += [attention.to_q.register_forward_hook(watch(index)), attention.to_k.register_forward_hook(watch(index))]
    handles += [block.register_forward_pre_hook(block_starts) for block in wan.row_blocks()]
    wan.one_row_at_a_time = True
    try:
        sample_edit(wan, inversion, frames[:1].flip(-1), prompt="a square", negative_prompt="", cfg=3.0,
                    injection=InjectionSettings(attention_tau=1.0))
    finally:
        wan.one_row_at_a_time = False
        for handle in handles:
            handle.remove()
    assert source_outputs and all(held_while_edit_rows_ran), "the edit rows must find their block's source Q/K"
    assert alive_at_block_start and max(alive_at_block_start) == 0, "a block's source Q/K outlived the block"
    assert all(ref() is None for _, ref in source_outputs), "source Q/K alive after sampling"


def test_policy_none_moves_the_encoders_off_the_device_before_the_wan_transformer_runs(wan_folder):
    """As before a UNet (test_device_placement.py): the text and image encoders, brought in to encode
    the source's and then the edit's conditioning, have left when the transformer next runs. Each
    phase is stopped at its first transformer call: that is the moment the promise is about.
    Mutation: encoders-stay-beside-the-transformer."""
    from anyv2v_core.testing.device_standin import OnStandIn, StandInDevice

    class TransformerReached(Exception):
        pass

    def on_device(module: torch.nn.Module) -> bool:
        return any(isinstance(t, OnStandIn) for t in [*module.parameters(), *module.buffers()])

    backbone = load_backbone(wan_folder, dtype="fp32")
    frames = moving_square_video(WAN_FRAMES, WAN_SIZE)
    inversion = invert_video(backbone, frames, inversion_steps=1, sampling_steps=1, order=1)  # on the CPU
    encoders_ran_on_the_device, encoders_at_the_transformer = [], []

    def transformer_computes(module, args) -> None:
        encoders_at_the_transformer.append(on_device(backbone.text_encoder) or on_device(backbone.image_encoder))
        raise TransformerReached

    # the patch embedding is the transformer's first layer: it runs inside the transformer's forward
    handles = [backbone.transformers["transformer"].patch_embedding.register_forward_pre_hook(transformer_computes)]
    handles += [encoder.register_forward_hook(lambda module, args, output: encoders_ran_on_the_device.append(
        on_device(module))) for encoder in (backbone.text_encoder, backbone.image_encoder)]
    try:
        with StandInDevice() as gpu:
            backbone.set_offload("none", gpu.device)
            with pytest.raises(TransformerReached):
                invert_video(backbone, frames, inversion_steps=1, sampling_steps=1, order=1)
            with pytest.raises(TransformerReached):
                sample_edit(backbone, inversion, frames[:1].flip(-1), prompt="a red square", negative_prompt="blurry")
    finally:
        for handle in handles:
            handle.remove()
    assert len(encoders_ran_on_the_device) >= 3 and all(encoders_ran_on_the_device)
    assert encoders_at_the_transformer == [False, False]


def test_a_half_precision_decode_redone_in_float32_leaves_the_vae_as_it_was(tiny_model_dir):
    """Mutation: overflow-decode-converts-the-vae."""
    from anyv2v_core.backbones.vae_frames import decode_latents

    vae = load_backbone(tiny_model_dir, dtype=torch.float16).vae
    vae.decoder.conv_in.weight.data *= 1e4  # activations beyond fp16's range: the decode overflows
    before = {key: value.clone() for key, value in vae.state_dict().items()}
    latents = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    frames = decode_latents(vae, latents, scaling_factor=0.18215, device=torch.device("cpu"))
    assert torch.isfinite(frames).all()  # it was redone in float32
    after = vae.state_dict()
    assert vae.dtype == torch.float16 and {value.dtype for value in after.values()} == {torch.float16}
    assert all(torch.equal(after[key], value) for key, value in before.items())


# ---------------------------------------------------------------------------------------------- frames


def test_select_frames_from_a_later_start_keeps_every_nth_up_to_the_count_at_the_matching_fps():
    """Mutation: select-frames-count-from-zero."""
    select = load_pack().NODE_CLASS_MAPPINGS["AnyV2VSelectFrames"]().select
    video = torch.arange(20, dtype=torch.float32).view(20, 1, 1, 1).expand(20, 2, 2, 3) / 20  # frame i holds i / 20
    frames, fps = select(video, 24.0, 5, 2, 3)
    assert (frames[:, 0, 0, 0] * 20).round().tolist() == [5, 7, 9] and fps == 12.0
    frames, fps = select(video, 30.0, 14, 3, 5)  # runs out of frames: what remains
    assert (frames[:, 0, 0, 0] * 20).round().tolist() == [14, 17] and fps == 10.0


def test_a_frame_count_of_zero_is_refused_at_every_entry_never_read_as_all_frames(wan_edit_inputs, tmp_path, capsys):
    """Mutations: prepare-frames-zero-means-all, edit-settings-zero-frames-means-all."""
    from anyv2v_core.batch.jobs import read_jobs
    from anyv2v_core.cli import main
    from anyv2v_core.plan import EditSettings
    from anyv2v_core.video import prepare_frames

    with pytest.raises(AnyV2VError, match="frame count 0 is too small"):
        prepare_frames(moving_square_video(6), size_wh=(32, 32), num_frames=0)
    with pytest.raises(AnyV2VError, match="frame count must be an integer >= 1"):
        EditSettings(num_frames=0)
    argv = ["edit", "--out", str(tmp_path / "edited.mp4"), "--frames", "0"]
    for key, value in wan_edit_inputs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 2
    assert "frame count must be an integer >= 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "edited.mp4").exists()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({**wan_edit_inputs, "frames": 0}) + "\n")
    valid, failures = read_jobs(jobs)
    assert not valid and [f.error for f in failures] == ["frame count must be an integer >= 1 (got 0)"]
    assert "4k + 1" in load_pack().NODE_CLASS_MAPPINGS["AnyV2VFlowInvertVideo"].VALIDATE_INPUTS(frame_count=0)
