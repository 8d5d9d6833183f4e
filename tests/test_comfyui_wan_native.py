"""The native Wan path's promises (issue 21), observed in ComfyUI's own Python: the pack's Wan nodes
run on a real ComfyUI MODEL (a tiny Wan 2.1 I2V file loaded by `comfy.sd`, its shift patched by the
core ModelSamplingSD3 node) and leave it as they found it after a success, an error and a cancel
(no hook, no wrapper, no option, no patch left: whatever the mechanism of the injection); rows whose
prompts have different token counts batch with each row's own tokens; and the diffusion model is
run at ComfyUI's sigmas, in its own time units (timestep = sigma * 1000 inside `apply_model`).

A script runs under COMFYUI_PYTHON (as `.ci/run` sets it) and prints what it observed as JSON; the
VAE is a small deterministic stand-in (ComfyUI builds Wan's only at its real size, and the VAE is
not what these promises are about); the CONDITIONINGs and the CLIP vision output are tensors of
Wan's shapes, as tests/comfyui_test_nodes makes them.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO_ROOT, skip_unless_ci
from test_comfyui_host import COMFYUI_DIR, COMFYUI_PYTHON

pytestmark = pytest.mark.comfyui_host

STEPS, SHIFT = 3, 5.0
PROMPT_TOKENS = {"source": 1, "negative": 12, "positive": 7}  # different lengths in one batch

SCRIPT = r"""
import importlib.util, json, sys
import torch
from comfy.cli_args import args
args.cpu = True  # before comfy.model_management is imported: it would look for a GPU
import comfy.clip_vision, comfy.model_management, comfy.samplers, comfy.sd
from comfy_extras.nodes_model_advanced import ModelSamplingSD3

repo, model_path, steps, shift, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), json.loads(sys.argv[5])
spec = importlib.util.spec_from_file_location("anyv2v_pack", f"{repo}/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules["anyv2v_pack"] = pack
spec.loader.exec_module(pack)
nodes = {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
torch.manual_seed(0)


class StandInVAE:
    # Wan 2.1's latent layout: 16 channels, 8x smaller, 1 + (F - 1) / 4 latent frames, reported as ComfyUI's VAE
    # object reports its layout
    projection = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    latent_channels = 16

    def spacial_compression_encode(self):
        return 8

    def temporal_compression_decode(self):
        return 4

    def encode(self, pixels):  # [F, H, W, 3] -> [1, 16, F', H/8, W/8]
        frames = pixels[::4] if pixels.shape[0] > 1 else pixels
        pooled = torch.nn.functional.avg_pool2d(frames.movedim(-1, 1), 8)  # [F', 3, h, w]
        return torch.einsum("fchw,cd->dfhw", pooled, self.projection)[None]

    def decode(self, latents):  # [1, 16, F', h, w] -> [1, F, H, W, 3]
        frames = latents[0, :3].movedim(0, -1).repeat_interleave(4, 0)[: (latents.shape[2] - 1) * 4 + 1]
        return frames.repeat_interleave(8, 1).repeat_interleave(8, 2).sigmoid()[None]


def conditioning(length, seed):
    text = torch.zeros(1, 512 + length if length > 512 else length, 4096)
    text[:, :length] = torch.randn(1, length, 4096, generator=torch.Generator().manual_seed(seed)) * 0.1
    return [[text, {}]]


def fingerprint(patcher):
    # everything a node could leave on a MODEL: module hooks and forwards, options, patches, wrappers
    def shape(value):
        if isinstance(value, dict):
            return {str(key): shape(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [shape(item) for item in value]
        return f"{type(value).__name__}@{id(value)}"

    modules = [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), "forward" in vars(m))
               for name, m in patcher.model.named_modules()]
    state = {name: shape(getattr(patcher, name)) for name in
             ("model_options", "patches", "object_patches", "object_patches_backup", "backup", "wrappers",
              "callbacks", "attachments", "additional_models", "injections", "hook_patches") if hasattr(patcher, name)}
    torch_globals = [len(torch.nn.modules.module._global_forward_hooks),
                     len(torch.nn.modules.module._global_forward_pre_hooks)]
    return {"modules": modules, "patcher": state, "torch": torch_globals}


def changes(old, new, path=""):
    # the paths where two fingerprints differ
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new))
                for change in changes(old.get(key), new.get(key), f"{path}/{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [change for index, (a, b) in enumerate(zip(old, new)) for change in changes(a, b, f"{path}[{index}]")]
    return [] if old == new else [f"{path}: {old} -> {new}"]


def plain_output(patcher):
    # one plain call of the MODEL, as any core sampler makes it
    comfy.model_management.load_models_gpu([patcher])
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 2, 4, 4, generator=generator)
    concat = torch.randn(1, 20, 2, 4, 4, generator=generator)
    clip = torch.randn(1, 257, 1280, generator=generator) * 0.1
    return patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=conditioning(5, 3)[0][0], c_concat=concat,
                                     clip_fea=clip)


(model,) = ModelSamplingSD3().patch(comfy.sd.load_diffusion_model(model_path), shift)
vae = StandInVAE()
source = torch.rand(9, 64, 64, 3, generator=torch.Generator().manual_seed(4))
edited = source[:1].flip(-1)
vision = comfy.clip_vision.Output()
vision["penultimate_hidden_states"] = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(5)) * 0.1
texts = {name: conditioning(length, seed) for seed, (name, length) in enumerate(tokens.items())}
sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)]

reference = plain_output(model)
before = fingerprint(model)  # loaded by ComfyUI (its own backups of the patched objects included)
received = {"timesteps": [], "contexts": []}


def spy(module, args, kwargs):
    received["timesteps"] += [float(t) for t in kwargs.get("t", args[1] if len(args) > 1 else None).flatten()]
    context = kwargs.get("context", args[2] if len(args) > 2 else None)
    for row in context:
        used = int((row.abs().sum(-1) > 0).nonzero().max()) + 1
        received["contexts"].append([used, int(row.shape[0]), float(row[used:].abs().sum())])


def edit(cfg=5.0):
    (backbone,) = nodes["AnyV2VWanModel"].build(model, vae, "all", "batched")
    inversion, _ = nodes["AnyV2VFlowInvertVideo"].invert(backbone, source, 64, 64, "stretch", 9, 16, steps, "1 (euler)",
                                                        0, 0, empty_prompt=texts["source"], clip_vision_output=vision)
    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.0, 0.0, 0.0, 0, attention_tau=1.0)
    return nodes["AnyV2VWanSampler"].sample(backbone, features, texts["positive"], texts["negative"], edited, cfg,
                                            clip_vision_output=vision)


report = {"sigmas": sigmas}
diffusion_model = model.model.diffusion_model
handle = diffusion_model.register_forward_pre_hook(spy, with_kwargs=True)
try:
    latent, fps = edit()
finally:
    handle.remove()
report["edit"] = {"finite": bool(torch.isfinite(latent["samples"]).all()), "fps": fps}
report["received"] = received
report["after success"] = changes(before, fingerprint(model))

calls = [0]


def fail_in_the_second_block(module, args):
    calls[0] += 1
    if calls[0] == 4:
        raise RuntimeError("a failure inside the diffusion model")


handle = diffusion_model.blocks[1].register_forward_pre_hook(fail_in_the_second_block)
try:
    edit(cfg=4.0)
    report["error"] = "no error"
except RuntimeError as error:
    report["error"] = str(error)
finally:
    handle.remove()
report["after error"] = changes(before, fingerprint(model))


def cancel_after_some_calls(module, args, output):
    calls[0] += 1
    if calls[0] == 6:
        comfy.model_management.interrupt_current_processing(True)  # what the Cancel button does


calls[0] = 0
handle = diffusion_model.register_forward_hook(cancel_after_some_calls)
try:
    edit(cfg=3.0)
    report["cancel"] = "not cancelled"
except comfy.model_management.InterruptProcessingException:
    report["cancel"] = "cancelled"
finally:
    handle.remove()
    comfy.model_management.interrupt_current_processing(False)
report["after cancel"] = changes(before, fingerprint(model))
report["plain output unchanged"] = bool(torch.equal(plain_output(model), reference))
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if not (COMFYUI_DIR and COMFYUI_PYTHON):
        skip_unless_ci("COMFYUI_DIR and COMFYUI_PYTHON are not set (a ComfyUI checkout and its Python)")
    from anyv2v_core.testing.tiny_models import write_tiny_comfyui_wan

    model = write_tiny_comfyui_wan(tmp_path_factory.mktemp("native") / "tiny-wan21-i2v.safetensors", "wan2.1-i2v")
    result = subprocess.run([COMFYUI_PYTHON, "-c", SCRIPT, str(REPO_ROOT), str(model), str(STEPS), str(SHIFT),
                             json.dumps(PROMPT_TOKENS)], cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("REPORT "))


def test_the_model_is_left_as_it_was_after_a_success_an_error_and_a_cancel(report):
    """Mutation: native-injection-left-on-the-model."""
    assert report["edit"] == {"finite": True, "fps": 16.0}
    assert report["error"] == "a failure inside the diffusion model" and report["cancel"] == "cancelled"
    assert {case: report[f"after {case}"] for case in ("success", "error", "cancel")} == \
        {"success": [], "error": [], "cancel": []}
    assert report["plain output unchanged"]


def test_rows_of_different_prompt_lengths_batch_with_each_rows_own_tokens(report):
    """Every context row the diffusion model receives is one CONDITIONING's tokens first, then zeros
    (up to the longest row's count where rows batch). Mutation: native-prompt-padding-misplaced."""
    contexts = report["received"]["contexts"]
    assert contexts and {used for used, _, _ in contexts} == set(PROMPT_TOKENS.values())
    assert max(width for _, width, _ in contexts) == max(PROMPT_TOKENS.values())
    assert all(after == 0.0 for _, _, after in contexts)


def test_the_diffusion_model_runs_at_comfyuis_sigmas_in_its_own_time_units(report):
    """Order 1 over ComfyUI's "simple" sigmas of the shift-patched MODEL: the inversion evaluates
    sigma 0 and the inner sigmas, sampling the sigmas from sigma_max; the diffusion model gets them
    as ComfyUI's model_sampling turns sigmas into time (x 1000). Mutation: native-time-in-model-units."""
    sigmas = report["sigmas"]
    assert sigmas[0] == 1.0 and 0.5 < sigmas[1] < 1.0  # the shift bent the grid (5: 0.909 at 2/3)
    seen = sorted(set(round(t / 1000, 5) for t in report["received"]["timesteps"]))
    assert seen == sorted(set(round(s, 5) for s in sigmas))
