"""Faults: a cancel (an exception from the progress callback) or an out-of-memory error in
inversion, in sampling and in decoding leaves the model unpatched and the next run identical to a
run that was never interrupted. Out-of-memory errors become AnyV2VOutOfMemory, naming the options
that lower peak memory, after the failed step's tensors are freed.

The interrupt steps are drawn from a seeded RNG, so a failure reproduces.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch

from anyv2v_core.errors import AnyV2VOutOfMemory
from anyv2v_core.injection import InjectionSettings, has_injection_hooks
from anyv2v_core.inversion import invert_video
from anyv2v_core.pipeline import edit
from anyv2v_core.plan import EditSettings
from anyv2v_core.sampling import sample_edit
from anyv2v_core.testing.tiny_models import moving_square_video

INVERSION_STEPS, STEPS, FRAMES = 4, 4, 5
SOURCE = moving_square_video(FRAMES, 32)
EDITED = SOURCE[:1].flip(-1)
RNG = random.Random(6)
SETTINGS = EditSettings(negative_prompt="", size_wh=(32, 32), inversion_steps=INVERSION_STEPS, steps=STEPS, cfg=5.0,
                        injection=InjectionSettings(0.5, 0.5, 1.0))


class Cancelled(Exception):
    """What ComfyUI's interrupt looks like to the engine: any exception from `progress`."""


def cancel_at(step: int):
    def progress(done: int, total: int) -> None:
        if done == step:
            raise Cancelled(step)

    return progress


def hook_state(backbone) -> dict:
    """Every hook and attention processor on every network of the backbone."""
    state = {}
    for component, network in backbone.modules().items():
        for name, module in network.named_modules():
            hooks = (tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
            if any(hooks):
                state[f"{component}.{name}"] = hooks
        if hasattr(network, "attn_processors"):
            state[f"{component}.processors"] = {name: type(p) for name, p in network.attn_processors.items()}
    return state


@pytest.fixture(scope="module")
def reference(tiny_backbone):
    """An uninterrupted run: the inversion, the sampled latents, the decoded frames."""
    torch.set_num_threads(1)
    inversion = invert_video(tiny_backbone, SOURCE, inversion_steps=INVERSION_STEPS, sampling_steps=STEPS)
    latents = sample_edit(tiny_backbone, inversion, EDITED, prompt="a square", negative_prompt="",
                          injection=SETTINGS.injection, cfg=5.0)
    return inversion, latents, tiny_backbone.decode(latents)


def sample(backbone, inversion, progress=None):
    return sample_edit(backbone, inversion, EDITED, prompt="a square", negative_prompt="",
                       injection=SETTINGS.injection, cfg=5.0, progress=progress)


def assert_same_inversion(a, b):
    assert a.latents.keys() == b.latents.keys()
    assert all(torch.equal(a.latents[t], b.latents[t]) for t in a.latents)


def test_cancel_during_inversion(tiny_backbone, reference):
    clean = hook_state(tiny_backbone)
    step = RNG.randint(1, INVERSION_STEPS)
    with pytest.raises(Cancelled):
        invert_video(tiny_backbone, SOURCE, inversion_steps=INVERSION_STEPS, sampling_steps=STEPS,
                     progress=cancel_at(step))
    assert hook_state(tiny_backbone) == clean
    assert_same_inversion(invert_video(tiny_backbone, SOURCE, inversion_steps=INVERSION_STEPS, sampling_steps=STEPS),
                          reference[0])


def test_cancel_during_sampling(tiny_backbone, reference):
    inversion, latents, _ = reference
    clean = hook_state(tiny_backbone)
    for step in sorted(RNG.sample(range(1, STEPS + 1), 2)):  # one inside the injection window or both
        with pytest.raises(Cancelled):
            sample(tiny_backbone, inversion, progress=cancel_at(step))
        assert not has_injection_hooks(tiny_backbone.unet)
        assert hook_state(tiny_backbone) == clean
    assert torch.equal(sample(tiny_backbone, inversion), latents)


def test_cancel_during_decoding(tiny_backbone, reference):
    _, latents, frames = reference
    clean = hook_state(tiny_backbone)
    step = RNG.randint(1, FRAMES)
    with pytest.raises(Cancelled):
        tiny_backbone.decode(latents, progress=cancel_at(step))
    assert hook_state(tiny_backbone) == clean
    assert torch.equal(tiny_backbone.decode(latents), frames)


def test_cancel_anywhere_in_a_whole_edit(tiny_backbone, reference):
    """pipeline.edit counts inversion steps, sampling steps and decoded frames in one progress."""
    total = INVERSION_STEPS + STEPS + FRAMES
    seen = []
    expected = edit(tiny_backbone, SOURCE, EDITED, prompt="a square", settings=SETTINGS,
                    progress=lambda done, all_steps: seen.append((done, all_steps)))
    assert seen == [(done, total) for done in range(1, total + 1)]
    assert torch.equal(expected.frames, reference[2])
    clean = hook_state(tiny_backbone)
    step = RNG.randint(1, total)
    with pytest.raises(Cancelled):
        edit(tiny_backbone, SOURCE, EDITED, prompt="a square", settings=SETTINGS, progress=cancel_at(step))
    assert hook_state(tiny_backbone) == clean
    assert torch.equal(edit(tiny_backbone, SOURCE, EDITED, prompt="a square", settings=SETTINGS).frames, expected.frames)


# ---------------------------------------------------------------------------------------------- out of memory


@pytest.fixture
def cuda_cache(monkeypatch):
    """Pretend CUDA is initialised, and record empty_cache calls (the tests run on the CPU)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    return calls


def out_of_memory_at(backbone, monkeypatch, method: str, call: int, freed: list):
    """Make `backbone.<method>` raise torch.OutOfMemoryError on its `call`-th call, holding a tensor
    the way a failed step holds its activations; a weak reference to it goes to `freed`."""
    original = getattr(backbone, method)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            activations = torch.ones(256, 256)
            freed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.6 GiB total)")
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, method, failing)


ADVICE = ("offload 'model' or 'sequential'", "fp16/bf16", "fewer frames", "temporal windows", "smaller working size")


@pytest.mark.parametrize("stage", ["inversion", "sampling", "decoding"])
def test_out_of_memory(tiny_backbone, reference, monkeypatch, cuda_cache, stage):
    inversion, latents, frames = reference
    clean = hook_state(tiny_backbone)
    freed = []
    if stage == "decoding":  # the VAE decoder fails on a random chunk
        decoder = tiny_backbone.vae
        out_of_memory_at(decoder, monkeypatch, "decode", RNG.randint(1, FRAMES), freed)
        run = lambda: tiny_backbone.decode(latents)  # noqa: E731
    else:
        out_of_memory_at(tiny_backbone, monkeypatch, "predict",
                         RNG.randint(1, INVERSION_STEPS if stage == "inversion" else STEPS), freed)
        run = {"inversion": lambda: invert_video(tiny_backbone, SOURCE, inversion_steps=INVERSION_STEPS,
                                                 sampling_steps=STEPS),
               "sampling": lambda: sample(tiny_backbone, inversion)}[stage]
    with pytest.raises(AnyV2VOutOfMemory) as raised:
        run()
    message = str(raised.value)
    assert f"out of memory during {stage}" in message and "Tried to allocate 20.00 GiB" in message
    assert all(option in message for option in ADVICE), message
    assert isinstance(raised.value, torch.OutOfMemoryError)  # ComfyUI's executor then unloads its models too
    assert raised.value.__cause__ is None  # the traceback of the failed step is not kept alive...
    gc.collect()
    assert freed and freed[0]() is None, "...so its tensors are freed before the cache is emptied"
    assert cuda_cache, "torch.cuda.empty_cache() was not called"
    assert not has_injection_hooks(tiny_backbone.unet) and hook_state(tiny_backbone) == clean

    monkeypatch.undo()  # the memory is back: the rerun equals an uninterrupted run
    if stage == "inversion":
        assert_same_inversion(run(), inversion)
    else:
        assert torch.equal(run(), latents if stage == "sampling" else frames)


def test_other_backends_out_of_memory_and_other_errors(tiny_backbone, reference, monkeypatch):
    """MPS reports memory exhaustion as a RuntimeError; any other error passes through unchanged."""
    inversion = reference[0]
    for error, expected in [(RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"), AnyV2VOutOfMemory),
                            (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), RuntimeError)]:
        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(tiny_backbone, "predict", failing)
        with pytest.raises(expected) as raised:
            sample(tiny_backbone, inversion)
        assert (raised.value is error) == (expected is RuntimeError)
        assert not has_injection_hooks(tiny_backbone.unet)


def test_cli_reports_out_of_memory_in_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from anyv2v_core import cli
    from anyv2v_core.video import write_image, write_video

    write_video(tmp_path / "in.mp4", SOURCE, 8)
    write_image(tmp_path / "edited.png", EDITED[0])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("anyv2v_core.backbones.i2vgen_xl.I2VGenXLBackbone.predict", out_of_memory)
    status = cli.main(["edit", "--model", str(tiny_model_dir), "--video", str(tmp_path / "in.mp4"),
                       "--edited-first-frame", str(tmp_path / "edited.png"), "--prompt", "a square",
                       "--out", str(tmp_path / "out.mp4"), "--size", "32x32", "--steps", "2", "--inversion-steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 3 and err[-1].startswith("error: out of memory during inversion") and "--offload" in err[-1]
    assert not (tmp_path / "out.mp4").exists()


def test_comfyui_cancel_during_the_sampler_nodes_decoding(tiny_backbone, reference, monkeypatch):
    """InjectedSampler checks ComfyUI's interrupt flag at every sampling step, before decoding and
    after every decoded chunk; a cancel while decoding leaves the model clean, the rerun identical."""
    import sys

    from test_nodes import load_pack

    load_pack()
    host, nodes = sys.modules["anyv2v_pack.nodes.host"], sys.modules["anyv2v_pack.nodes"]
    inversion, latents, frames = reference
    handle = nodes.loaders.BackboneHandle(backbone=tiny_backbone, offload="none", keep_loaded=True, source="tiny")
    source = nodes.inversion.SourceInversion(inversion=inversion, resize="stretch", source_wh=(32, 32))
    features = nodes.injection.FeaturePlan(source=source, injection=SETTINGS.injection, start_index=0, layer_overrides={})
    checks = []

    def interrupt_while_decoding(limit):
        def check_interrupted():
            checks.append(1)
            if len(checks) == limit:
                raise Cancelled(limit)
        return check_interrupted

    def run():
        return nodes.sampling.InjectedSampler().sample(handle, features, EDITED, "a square", "", 5.0, 1, "auto", 0)

    clean = hook_state(tiny_backbone)
    decode_check = STEPS + 1 + RNG.randint(1, FRAMES)  # sampling steps, the check before decoding, a decoded frame
    monkeypatch.setattr(host, "check_interrupted", interrupt_while_decoding(decode_check))
    with pytest.raises(Cancelled):
        run()
    assert hook_state(tiny_backbone) == clean
    checks.clear()
    monkeypatch.setattr(host, "check_interrupted", interrupt_while_decoding(0))
    assert torch.equal(run()[0], frames) and len(checks) == STEPS + 1 + FRAMES
