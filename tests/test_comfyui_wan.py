"""AnyV2V on Wan MODELs in a real ComfyUI server: the two example workflows, parity with ComfyUI's own
sampler, a plain KSampler untouched by an AnyV2V run, cancel, and bad input.

Tiny random Wan diffusion models are written in ComfyUI's single-file layout under
models/diffusion_models and loaded by the core UNETLoader; the Wan 2.1 and 2.2 VAEs are random at
their real size (ComfyUI builds them only at that size) and loaded by the core VAELoader. ComfyUI
builds the UMT5 text encoder and the CLIP vision encoder only at their published sizes (5.7 B and
632 M parameters), so the workflows' CLIPTextEncode and CLIPVisionEncode are replaced by test nodes
of the same output types and shapes (tests/comfyui_test_nodes). Runs where test_comfyui_host.py runs.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT, skip_unless_ci
from test_comfyui_host import (COMFYUI_DIR, COMFYUI_PYTHON, ComfyServer, comfyui_folders, node_id, running_comfyui,
                               saved_files)

pytestmark = pytest.mark.comfyui_host

SIZE, FRAMES, STEPS = 64, 9, 3  # 64: FirstFrameEditor's smallest working size
MODELS = {"wan2.1-i2v": "anyv2v-tiny-wan21-i2v.safetensors", "wan2.2-ti2v": "anyv2v-tiny-wan22-ti2v.safetensors",
          "wan2.1-t2v": "anyv2v-tiny-wan21-t2v.safetensors"}
VAES = {"wan2.1": "anyv2v-random-wan21-vae.safetensors", "wan2.2": "anyv2v-random-wan22-vae.safetensors"}
NO_INJECTION = {"conv_tau": 0.0, "spatial_tau": 0.0, "temporal_tau": 0.0, "attention_tau": 0.0}

# a random Wan VAE at its real size, in ComfyUI's layout: built on the meta device for the shapes
VAE_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from comfy.cli_args import args
args.cpu = True  # before comfy.model_management is imported: it would look for a GPU
import comfy.ldm.wan.vae as wan21, comfy.ldm.wan.vae2_2 as wan22
version, path = sys.argv[1:]
module, dim, z_dim = (wan21, 96, 16) if version == "wan2.1" else (wan22, 160, 48)
with torch.device("meta"):
    vae = module.WanVAE(dim=dim, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True], dropout=0.0)
generator = torch.Generator().manual_seed(0)
state = {}
for key, value in vae.state_dict().items():
    state[key] = (torch.ones(value.shape) if key.endswith("gamma") else
                  torch.randn(value.shape, generator=generator) * (0.0 if key.endswith("bias") else 0.05))
    state[key] = state[key].to(torch.float16)
save_file(state, path)
"""


@pytest.fixture(scope="module")
def wan_server(tmp_path_factory):
    if not COMFYUI_DIR:
        skip_unless_ci("COMFYUI_DIR is not set (path to a ComfyUI checkout to test the pack in)")
    root = tmp_path_factory.mktemp("comfyui_wan")
    base = comfyui_folders(root, test_nodes=True)
    add_tiny_wan_models(base)
    config = root / "extra_model_paths.yaml"
    config.write_text(f"anyv2v_wan_test:\n    custom_nodes: {root / 'custom_nodes'}\n")
    with running_comfyui(root, base, config) as server:
        yield server


def add_tiny_wan_models(base: Path, source: str = "source.mp4", edited_frame: str = "edited_first_frame.png") -> None:
    """The tiny Wan models and random VAEs under ComfyUI's base folder `base`, a moving-square source clip and an
    edited first frame in its input folder as `source` and `edited_frame`."""
    from anyv2v_core.testing.tiny_models import moving_square_video, write_tiny_comfyui_wan
    from anyv2v_core.video import write_image, write_video

    for folder in ("models/diffusion_models", "models/vae"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for kind, name in MODELS.items():
        write_tiny_comfyui_wan(base / "models" / "diffusion_models" / name, kind)
    for version, name in VAES.items():
        subprocess.run([COMFYUI_PYTHON, "-c", VAE_SCRIPT, version, str(base / "models" / "vae" / name)],
                       cwd=COMFYUI_DIR, check=True, capture_output=True)
    write_video(base / "input" / source, moving_square_video(FRAMES + 2, SIZE), fps=16)
    write_image(base / "input" / edited_frame, moving_square_video(1, SIZE, colour=(0.1, 0.2, 0.9))[0])


def wan_prompt(name: str, kind: str, **settings) -> dict:
    """The example workflow `name` with the tiny model, the test encoders and tiny settings;
    `settings` = {class_type: {input: value}} on top."""
    prompt = json.loads((REPO_ROOT / "workflows" / "api" / name).read_text())
    for key, node in list(prompt.items()):
        kind_of, inputs = node["class_type"], node["inputs"]
        if kind_of in ("CLIPLoader", "CLIPVisionLoader"):
            del prompt[key]
        elif kind_of == "CLIPTextEncode":
            node.update(class_type="AnyV2VTestTextEncode", inputs={"text": inputs["text"]})
        elif kind_of == "CLIPVisionEncode":
            node.update(class_type="AnyV2VTestClipVisionEncode", inputs={"image": inputs["image"]})
    tiny = {
        "UNETLoader": {"unet_name": MODELS[kind]},
        "VAELoader": {"vae_name": VAES["wan2.2" if kind == "wan2.2-ti2v" else "wan2.1"]},
        "LoadVideo": {"file": "source.mp4"}, "LoadImage": {"image": "edited_first_frame.png"},
        "AnyV2VSelectFrames": {"every_nth": 1, "frame_count": 0},
        "FirstFrameEditor": {"width": SIZE, "height": SIZE},
        "AnyV2VFlowInvertVideo": {"width": SIZE, "height": SIZE, "frame_count": FRAMES, "steps": STEPS},
    }
    for changes in (tiny, settings):
        for class_type, values in changes.items():
            for node in prompt.values():
                if node["class_type"] == class_type:
                    node["inputs"].update(values)
    return {key: node for key, node in prompt.items() if node["class_type"] != "SaveImage"}


def add_nodes(prompt: dict, nodes: dict) -> dict:
    """`prompt` with `nodes` ({id: (class_type, inputs)}) added."""
    return {**prompt, **{key: {"class_type": class_type, "inputs": inputs} for key, (class_type, inputs) in nodes.items()}}


def saved_latents(server: ComfyServer, seen: dict, prefix: str) -> torch.Tensor:
    from safetensors.torch import load_file

    files = [item for item in saved_files(seen["history"], "latents")
             if item["filename"].startswith(prefix.split("/")[-1])]
    assert len(files) == 1, seen["history"]["outputs"]
    path = server.output_dir / files[0]["subfolder"] / files[0]["filename"]
    return load_file(str(path))["latent_tensor"]


def saved_video_shape(server: ComfyServer, seen: dict) -> tuple[int, int, int]:
    from anyv2v_core.video import read_frames

    (item,) = [item for item in saved_files(seen["history"]) if item["filename"].endswith(".mp4")]
    frames, _ = read_frames(server.output_dir / item["subfolder"] / item["filename"])
    return tuple(frames.shape[:3])


def run_ok(server: ComfyServer, prompt: dict, **kwargs) -> dict:
    seen = server.run(prompt, **kwargs)
    assert seen["error"] is None, f"execution error: {seen['error']}\n{server.log_tail()}"
    return seen


# ---------------------------------------------------------------------------------------------- workflows


def test_wan21_workflow_runs_and_a_new_prompt_reuses_the_inversion(wan_server):
    prompt = wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-i2v")
    first = run_ok(wan_server, prompt)
    assert saved_video_shape(wan_server, first) == (FRAMES, SIZE, SIZE)
    assert first["progress"] > 0
    prompt[node_id(prompt, "AnyV2VWanSampler")]["inputs"]["positive"] = ["7", 0]  # another prompt: the negative's
    second = run_ok(wan_server, prompt)
    assert node_id(prompt, "AnyV2VFlowInvertVideo") in second["cached"], second["cached"]
    assert node_id(prompt, "AnyV2VWanSampler") not in second["cached"]
    assert saved_video_shape(wan_server, second) == (FRAMES, SIZE, SIZE)


def test_wan22_ti2v_workflow_runs(wan_server):
    seen = run_ok(wan_server, wan_prompt("anyv2v_wan22_ti2v.json", "wan2.2-ti2v"))
    assert saved_video_shape(wan_server, seen) == (FRAMES, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------- parity


def parity_prompt(shift: float) -> dict:
    """Our sampler without injection (order 1) beside ComfyUI's own: SamplerCustomAdvanced with euler,
    BasicScheduler's simple sigmas of the same patched MODEL, CFGGuider over WanImageToVideo's
    conditioning of the same edited frame, and the inverted latent as its noise. (DisableNoise would
    start a flow model from (1 - sigma_max) * latent = 0 at sigma_max = 1, so the start latent
    enters as the NOISE; everything else is ComfyUI's.)"""
    prompt = wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-i2v", ModelSamplingSD3={"shift": shift},
                        CaptureFeatures=NO_INJECTION, AnyV2VFlowInvertVideo={"order": "1 (euler)"})
    invert, sampler = node_id(prompt, "AnyV2VFlowInvertVideo"), node_id(prompt, "AnyV2VWanSampler")
    model, cfg = ["2", 0], prompt[sampler]["inputs"]["cfg"]
    return add_nodes(prompt, {
        "100": ("SaveLatent", {"samples": [sampler, 0], "filename_prefix": f"parity/anyv2v_{shift}"}),
        "101": ("WanImageToVideo", {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 0], "width": SIZE,
                                    "height": SIZE, "length": FRAMES, "batch_size": 1, "start_image": ["14", 0],
                                    "clip_vision_output": ["16", 0]}),
        "102": ("CFGGuider", {"model": model, "positive": ["101", 0], "negative": ["101", 1], "cfg": cfg}),
        "103": ("KSamplerSelect", {"sampler_name": "euler"}),
        "104": ("BasicScheduler", {"model": model, "scheduler": "simple", "steps": STEPS, "denoise": 1.0}),
        "105": ("SamplerCustomAdvanced", {"noise": [invert, 1], "guider": ["102", 0], "sampler": ["103", 0],
                                          "sigmas": ["104", 0], "latent_image": ["101", 2]}),
        "106": ("SaveLatent", {"samples": ["105", 0], "filename_prefix": f"parity/comfyui_{shift}"}),
    })


def test_without_injection_the_edit_is_comfyuis_own_euler_sampler_and_follows_the_models_shift(wan_server):
    inverted = {}
    for shift in (3.0, 8.0):  # the patch must reach the inversion's and the sampler's sigmas alike
        seen = run_ok(wan_server, parity_prompt(shift))
        ours = saved_latents(wan_server, seen, f"anyv2v_{shift}")
        reference = saved_latents(wan_server, seen, f"comfyui_{shift}")
        assert ours.shape == reference.shape == (1, 16, 3, SIZE // 8, SIZE // 8)
        difference = float((ours - reference).abs().max())
        print(f"shift {shift}: max |AnyV2V without injection - SamplerCustomAdvanced euler| = {difference:.2e} "
              f"(latents up to {float(reference.abs().max()):.2f})")
        # float32 rounding of the same steps done by two loops (1.0e-5 at shift 8 on latents up to 3.2):
        # 1e-5 relative, far below what a wrong step changes
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5, msg=f"shift {shift}")
        assert ours.abs().mean() > 0.01
        inverted[shift] = ours
    assert not torch.allclose(inverted[3.0], inverted[8.0])


# ---------------------------------------------------------------------------------------------- isolation


def test_a_plain_ksampler_on_the_same_model_is_bit_identical_before_and_after_an_anyv2v_run(wan_server):
    edit = wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-i2v", CaptureFeatures={"attention_tau": 1.0})
    loaders = {key: node for key, node in edit.items() if node["class_type"] in
               ("UNETLoader", "ModelSamplingSD3", "VAELoader", "AnyV2VTestTextEncode")}

    def ksampler(prefix: str) -> dict:
        return add_nodes(loaders, {
            "200": ("AnyV2VTestAlwaysRun", {"model": ["2", 0]}),  # re-runs the sampler on the same MODEL object
            "201": ("WanImageToVideo", {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 0], "width": SIZE,
                                        "height": SIZE, "length": FRAMES, "batch_size": 1}),
            "202": ("KSampler", {"model": ["200", 0], "seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                                 "scheduler": "simple", "positive": ["201", 0], "negative": ["201", 1],
                                 "latent_image": ["201", 2], "denoise": 1.0}),
            "203": ("SaveLatent", {"samples": ["202", 0], "filename_prefix": f"isolation/{prefix}"}),
        })

    before = saved_latents(wan_server, run_ok(wan_server, ksampler("before")), "before")
    run_ok(wan_server, edit)
    after = saved_latents(wan_server, run_ok(wan_server, ksampler("after")), "after")
    assert torch.equal(before, after)


def interrupt_mid_node(server, node: str):
    """An `on_message` hook that interrupts the run once, at `node`'s first progress message before its last.
    Newer ComfyUI throttles progress (messages at least 100 ms and 0.5 % apart, the first and the last always
    sent), so a hook waiting for one given value may never fire on a fast tiny model."""
    interrupted = []

    def hook(kind: str, data: dict) -> None:
        if kind == "progress" and data.get("node") == node and data["value"] < data["max"] and not interrupted:
            interrupted.append(data["value"])
            server.post("/interrupt", {})

    return hook


def test_the_interrupt_hook_fires_once_on_throttled_progress():
    """Newer ComfyUI's throttling may leave only the first and the last progress message of a node."""
    posts = []
    hook = interrupt_mid_node(SimpleNamespace(post=lambda path, body: posts.append(path)), "20")
    for value in (1, 4):  # what throttling leaves of 4 steps
        hook("progress", {"node": "18", "value": value, "max": 4})  # another node: not this one
        hook("progress", {"node": "20", "value": value, "max": 4})
    assert posts == ["/interrupt"]


def test_cancel_mid_sampling_then_the_same_edit_gives_identical_frames(wan_server):
    prompt = wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-i2v", AnyV2VFlowInvertVideo={"steps": 4})
    sampler = node_id(prompt, "AnyV2VWanSampler")
    prompt = add_nodes(prompt, {"300": ("SaveLatent", {"samples": [sampler, 0], "filename_prefix": "cancel/edit"})})
    reference = saved_latents(wan_server, run_ok(wan_server, prompt), "edit")
    prompt[sampler]["inputs"]["cfg"] = 4.5  # a new sampler run, on the cached inversion

    cancelled = wan_server.run(prompt, on_message=interrupt_mid_node(wan_server, sampler))
    assert cancelled["interrupted"], cancelled
    prompt[sampler]["inputs"]["cfg"] = 5.0  # the reference's settings again: nothing may have changed
    prompt["300"]["inputs"]["filename_prefix"] = "cancel/again"
    rerun = run_ok(wan_server, prompt)
    assert sampler not in rerun["cached"]
    assert torch.equal(saved_latents(wan_server, rerun, "again"), reference)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_naming_the_input_and_the_server_stays_up(wan_server):
    base = wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-i2v")
    invert = node_id(base, "AnyV2VFlowInvertVideo")

    status, answer = wan_server.post_prompt(wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-i2v",
                                                       AnyV2VFlowInvertVideo={"frame_count": 8}), uuid.uuid4().hex)
    assert status == 400, answer
    errors = answer["node_errors"][invert]["errors"]
    assert [error["extra_info"]["input_name"] for error in errors] == ["frame_count"]
    assert "4k + 1" in errors[0]["details"]

    runtime_cases = [
        (wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-t2v"), "AnyV2VWanModel", "model: .*text-to-video"),
        (wan_prompt("anyv2v_wan21_i2v.json", "wan2.1-i2v", AnyV2VFlowInvertVideo={"width": 40}), "AnyV2VFlowInvertVideo",
         "multiples of 16"),
        ({**base, invert: {**base[invert], "inputs": {k: v for k, v in base[invert]["inputs"].items()
                                                      if k != "clip_vision_output"}}},
         "AnyV2VFlowInvertVideo", "clip_vision_output: Wan 2.1 I2V needs"),
    ]
    sampler = node_id(base, "AnyV2VWanSampler")
    batch = json.loads(json.dumps(base))
    batch[sampler]["inputs"]["edited_first_frame"] = [node_id(base, "AnyV2VSelectFrames"), 0]
    runtime_cases.append((batch, "AnyV2VWanSampler", "edited_first_frame: one image expected, got a batch of"))
    import re

    for prompt, failing, message in runtime_cases:
        seen = wan_server.run(prompt)
        assert seen["error"] is not None, f"{failing} accepted a bad input"
        assert seen["error"]["node_type"] == failing, seen["error"]
        assert re.search(message, seen["error"]["exception_message"]), seen["error"]["exception_message"]
    assert wan_server.process.poll() is None, "the server died on a bad input"
    run_ok(wan_server, base)  # and still edits
