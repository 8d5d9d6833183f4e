"""Checks of the native Wan path (nodes/comfy_wan.py) and of BackbonePatcher inside ComfyUI's own
Python, in-process: ComfyUI's model management, ModelPatcher and WanModel are the real ones (the
snapshot in ../shared/comfyui), the nodes are called as ComfyUI calls them.

The ComfyUI environment has no pytest: tests/test_comfyui_native.py runs this file under
COMFYUI_PYTHON once (`python tests/comfyui_native_checks.py COMFYUI_DIR`), which prints one JSON
line {check name: "ok" or the failure's traceback}, and turns each check into a test. Importing this
file needs no ComfyUI (the test file reads CHECKS from it).

Models: tiny random Wan diffusion models in ComfyUI's single-file layout (the core loader's code
path, `load_diffusion_model_state_dict`), and tiny random Wan VAEs of ComfyUI's own VAE classes
(ComfyUI's VAE object builds them only at their real size: the real-size network is built on the
meta device for its keys, then replaced by a small one of the same class). The encoders are tensors
of Wan's shapes, as tests/comfyui_test_nodes makes them.

The stand-in device (anyv2v_core.testing.device_standin) plays the GPU: the MODEL's load device is the
stand-in, so ComfyUI's load_models_gpu moves its weights there and every CPU tensor that meets them
raises as on CUDA; the VAE stays on the CPU (as with --cpu-vae).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE, FRAMES, STEPS = 64, 9, 3
KINDS = ("wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v")
CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


# ---------------------------------------------------------------------------------------------- setup


def start_comfyui(comfyui_dir: str):
    """ComfyUI on the CPU in this process, and the pack imported as ComfyUI imports it (a package)."""
    sys.path.insert(0, comfyui_dir)
    sys.path.insert(0, str(REPO))
    os.chdir(comfyui_dir)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: it would look for a GPU
    spec = importlib.util.spec_from_file_location("anyv2v", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    sys.modules["anyv2v"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["anyv2v"])


def pack(module: str):
    return importlib.import_module(f"anyv2v.nodes.{module}")


def tiny_model(kind: str, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of a tiny random Wan transformer, loaded as UNETLoader loads a file."""
    import comfy.sd
    from anyv2v_core.testing.tiny_models import original_wan_state_dict, tiny_wan_transformer

    return comfy.sd.load_diffusion_model_state_dict(
        original_wan_state_dict(tiny_wan_transformer(kind, seed=seed, comfyui_dims=True)))


def tiny_vae(version: str):
    """A ComfyUI VAE object whose network is a small random network of the Wan VAE class of `version`."""
    import torch

    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2
    import comfy.model_patcher
    import comfy.sd

    module, z_dim = (comfy.ldm.wan.vae, 16) if version == "wan2.1" else (comfy.ldm.wan.vae2_2, 48)
    config = dict(z_dim=z_dim, dim_mult=[1, 2, 4, 4], attn_scales=[], temperal_downsample=[False, True, True],
                  dropout=0.0)
    with torch.device("meta"):  # the real size, for the keys that make ComfyUI pick this VAE class
        keys = module.WanVAE(dim=96 if version == "wan2.1" else 160, num_res_blocks=2, **config).state_dict()
        vae = comfy.sd.VAE(sd=dict(keys))
    network = module.WanVAE(dim=8, num_res_blocks=1, **config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            value = (torch.ones(tensor.shape) if name.endswith("gamma") else
                     torch.randn(tensor.shape, generator=generator) * (0.0 if name.endswith("bias") else 0.2))
            tensor.copy_(value)
    vae.first_stage_model = network.eval().to(vae.vae_dtype)
    vae.patcher = comfy.model_patcher.ModelPatcher(network, load_device=vae.device, offload_device=vae.device)
    return vae


def text(seed: int):
    import torch

    tokens = torch.zeros(1, 512, 4096)
    tokens[:, :6] = torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(seed)) * 0.1
    return [[tokens, {}]]


def clip_vision(seed: int):
    import torch

    import comfy.clip_vision

    output = comfy.clip_vision.Output()
    output["penultimate_hidden_states"] = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(seed)) * 0.1
    return output


def models(kind: str) -> dict:
    """The AnyV2VWanModel inputs for `kind`: MODEL, VAE and, for A14B, the low-noise MODEL."""
    inputs = {"model": tiny_model(kind), "vae": tiny_vae("wan2.2" if kind == "wan2.2-ti2v" else "wan2.1")}
    if kind == "wan2.2-i2v-a14b":
        inputs["model_low_noise"] = tiny_model(kind, seed=1)
    return inputs


def edit(kind: str, inputs: dict, *, attention_tau: float = 0.5, order: str = "2 (midpoint, recommended)",
         window_length: int = 0, frames: int = FRAMES) -> dict:
    """The three native nodes and CaptureFeatures, as the example workflow wires them (and as ComfyUI
    runs a prompt: in inference mode); the sampler's LATENT. `window_length` 5 (overlap 4): two
    windows of 2 latent frames over the 3."""
    import torch

    with torch.inference_mode():
        return edit_nodes(kind, inputs, attention_tau=attention_tau, order=order, window_length=window_length,
                          frames=frames)


def edit_nodes(kind: str, inputs: dict, *, attention_tau: float, order: str, window_length: int, frames: int) -> dict:
    from anyv2v_core.testing.tiny_models import moving_square_video

    wan, injection = pack("wan"), pack("injection")
    source = moving_square_video(frames, SIZE)
    vision = {"clip_vision_output": clip_vision(0)} if kind == "wan2.1-i2v" else {}
    (backbone,) = wan.AnyV2VWanModel().build(inputs["model"], inputs["vae"], "all", "batched",
                                             model_low_noise=inputs.get("model_low_noise"))
    inversion, _ = wan.AnyV2VFlowInvertVideo().invert(backbone, source, SIZE, SIZE, "stretch", frames, 16, STEPS, order,
                                                      window_length, 4, empty_prompt=text(0), **vision)
    (features,) = injection.CaptureFeatures().plan(inversion, 0.0, 0.0, 0.0, 0, attention_tau=attention_tau)
    latent, _ = wan.AnyV2VWanSampler().sample(backbone, features, text(1), text(2), source[:1].flip(-1), 5.0, **vision)
    return latent


@contextlib.contextmanager
def standin_gpu(inputs: dict):
    """The stand-in device as the MODELs' load device (ComfyUI's memory queries answered for it);
    every model back on the CPU afterwards."""
    import torch

    import comfy.model_management as model_management
    from anyv2v_core.testing.device_standin import StandInDevice

    free_memory = model_management.get_free_memory

    def free_on_standin(device=None, torch_free_too=False):
        if device is not None and torch.device(device).type == "meta":
            return (64 * 2**30, 64 * 2**30) if torch_free_too else 64 * 2**30
        return free_memory(device, torch_free_too)

    model_management.get_free_memory = free_on_standin
    try:
        with StandInDevice() as gpu:
            for name in ("model", "model_low_noise"):
                if name in inputs:
                    inputs[name].load_device = gpu.device
            try:
                yield gpu
            finally:
                model_management.unload_all_models()
    finally:
        model_management.get_free_memory = free_memory


# ---------------------------------------------------------------------------------------------- device placement


def check_standin_run_equals_the_cpu_run(kind: str, **settings) -> None:
    import torch

    from anyv2v_core.testing.device_standin import OnStandIn

    cpu = edit(kind, models(kind), **settings)["samples"]
    inputs = models(kind)
    with standin_gpu(inputs) as gpu:
        device = edit(kind, inputs, **settings)["samples"]
        assert gpu.bytes_to_device > 0, "nothing ran on the stand-in device"
    assert not isinstance(device, OnStandIn) and device.device.type == "cpu", "the LATENT stayed on the device"
    torch.testing.assert_close(device, cpu, rtol=0, atol=1e-5)
    assert float(cpu.abs().mean()) > 0.01


@check
def wan21_i2v_runs_on_the_device_with_the_cpu_latents():
    check_standin_run_equals_the_cpu_run("wan2.1-i2v")


@check
def wan21_i2v_in_windows_at_order_1_runs_on_the_device_with_the_cpu_latents():
    from anyv2v_core.windows import ContextWindows

    inputs = models("wan2.1-i2v")
    (backbone,) = pack("wan").AnyV2VWanModel().build(inputs["model"], inputs["vae"], "all", "batched")
    assert backbone.backbone.latent_windows(ContextWindows(5, 4)) == ContextWindows(2, 1)  # in latent frames
    check_standin_run_equals_the_cpu_run("wan2.1-i2v", window_length=5, order="1 (euler)")


@check
def wan22_a14b_expert_switch_runs_on_the_device_with_the_cpu_latents():
    check_standin_run_equals_the_cpu_run("wan2.2-i2v-a14b")


@check
def wan22_ti2v_clean_first_frame_runs_on_the_device_with_the_cpu_latents():
    check_standin_run_equals_the_cpu_run("wan2.2-ti2v")


@check
def wan22_ti2v_windows_put_the_clean_first_frame_in_the_first_window_only():
    """A later temporal window starts mid-video: the clean first frame (timestep 0) goes in front of the
    window that starts the video only. 13 frames: 3 generated latent frames, windows [0, 2) and [1, 3)."""
    inputs, calls = models("wan2.2-ti2v"), []  # per diffusion model call: latent frames in, frames at timestep 0

    def spy(module, args):
        x, timestep = args[0], args[1]  # timestep [B, F]: one per latent frame (WAN22.process_timestep)
        if timestep.max() > 0:  # not the inversion's first evaluation, at the clean end
            calls.append((x.shape[2], int((timestep[0] == 0).sum())))

    handle = inputs["model"].model.diffusion_model.register_forward_pre_hook(spy)
    try:
        edit("wan2.2-ti2v", inputs, order="1 (euler)", window_length=5, frames=13)
    finally:
        handle.remove()
    assert set(calls) == {(3, 1), (2, 0)}, sorted(set(calls))


# ---------------------------------------------------------------------------------------------- ComfyUI's protocol


@check
def each_phase_loads_each_expert_for_its_rows_and_predicts_between_pre_run_and_cleanup():
    """A14B on the stand-in: the inversion (one row) and the sampler (three rows) each call
    load_models_gpu for each expert when it takes over, sized for that phase's batch; every model
    call runs inside that expert's pre_run / cleanup, with the MODEL's APPLY_MODEL wrappers (merged
    by ComfyUI's prepare_model_patcher) and ComfyUI's cond_or_uncond labels."""
    import comfy.model_management as model_management
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    inputs = models("wan2.2-i2v-a14b")
    experts = {id(inputs["model"]): "high", id(inputs["model_low_noise"]): "low"}
    events = []
    for patcher in (inputs["model"], inputs["model_low_noise"]):
        name = experts[id(patcher)]
        patcher.add_callback(CallbacksMP.ON_PRE_RUN, lambda p, name=name: events.append(("pre_run", name)))
        patcher.add_callback(CallbacksMP.ON_CLEANUP, lambda p, name=name: events.append(("cleanup", name)))

        def recorded(executor, x, t, c_concat, c_crossattn, control, transformer_options, *args, name=name, **kwargs):
            events.append(("call", name, tuple(transformer_options["cond_or_uncond"]), x.shape[0]))
            args = (c_concat, c_crossattn, control, transformer_options, *args)
            return executor(x, t, *args, **kwargs)

        patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "anyv2v-test", recorded)
    load_models_gpu = model_management.load_models_gpu

    def recorded_load(models, memory_required=0, **kwargs):
        if id(models[0]) in experts:  # not the VAE's
            events.append(("load", experts[id(models[0])], memory_required))
        return load_models_gpu(models, memory_required=memory_required, **kwargs)

    model_management.load_models_gpu = recorded_load
    try:
        with standin_gpu(inputs):
            edit("wan2.2-i2v-a14b", inputs, attention_tau=0.5)
    finally:
        model_management.load_models_gpu = load_models_gpu

    def memory(name, rows):  # latent frames (9 - 1) / 4 + 1 = 3 at 64 / 8 = 8
        patcher = inputs["model"] if name == "high" else inputs["model_low_noise"]
        return patcher.model.memory_required([rows, 16, 3, SIZE // 8, SIZE // 8])

    loads = [event for event in events if event[0] == "load"]
    # inversion from sigma 0: low then high; sampling from sigma 1: high then low
    assert loads == [("load", "low", memory("low", 1)), ("load", "high", memory("high", 1)),
                     ("load", "high", memory("high", 3)), ("load", "low", memory("low", 3))], loads
    active = None
    for event in events:
        if event[0] == "pre_run":
            assert active is None, events
            active = event[1]
        elif event[0] == "cleanup":
            assert active == event[1], events
            active = None
        elif event[0] == "call":
            assert active == event[1], f"a model call outside its expert's pre_run / cleanup: {events}"
    assert active is None, "the last expert was not cleaned up"
    labels = {event[2] for event in events if event[0] == "call"}
    # inversion: the source row (cond); sampling: source, negative, positive, then negative, positive
    assert labels == {(0,), (0, 1, 0), (1, 0)}, labels


@check
def rows_one_at_a_time_size_the_sampler_for_one_row():
    import comfy.model_management as model_management

    inputs = models("wan2.1-i2v")
    wan = pack("wan")
    loads = []
    load_models_gpu = model_management.load_models_gpu

    def recorded_load(models, memory_required=0, **kwargs):
        if models[0] is inputs["model"]:  # not the VAE's
            loads.append(memory_required)
        return load_models_gpu(models, memory_required=memory_required, **kwargs)

    build = wan.AnyV2VWanModel.build
    wan.AnyV2VWanModel.build = lambda self, *args, **kwargs: build(self, *args[:3], wan.ROW_MODES[1], **kwargs)
    model_management.load_models_gpu = recorded_load
    try:
        edit("wan2.1-i2v", inputs)
    finally:
        model_management.load_models_gpu = load_models_gpu
        wan.AnyV2VWanModel.build = build
    one_row = inputs["model"].model.memory_required([1, 16, 3, SIZE // 8, SIZE // 8])
    assert loads == [one_row, one_row], loads


# ---------------------------------------------------------------------------------------------- what is refused


def refusal(kind: str, inputs: dict, pattern: str) -> None:
    import re

    from anyv2v_core.errors import AnyV2VError

    wan = pack("wan")
    encoded = []
    vae = inputs["vae"]
    vae.encode = lambda *args: encoded.append(1)
    try:
        wan.AnyV2VWanModel().build(inputs["model"], vae, "all", "batched",
                                   model_low_noise=inputs.get("model_low_noise"))
    except AnyV2VError as error:
        assert re.search(pattern, str(error)), str(error)
    else:
        raise AssertionError(f"{kind}: accepted, expected a refusal matching {pattern!r}")
    assert not encoded, "the VAE encoded before the refusal"


@check
def a14b_without_its_low_noise_model_is_refused():
    inputs = models("wan2.2-i2v-a14b")
    del inputs["model_low_noise"]
    refusal("wan2.2-i2v-a14b", inputs, r"model_low_noise: this is Wan 2\.2 I2V A14B.*low-noise")
    inputs = models("wan2.1-i2v")
    inputs["model_low_noise"] = tiny_model("wan2.1-i2v", seed=1)
    refusal("wan2.1-i2v", inputs, r"model_low_noise: only Wan 2\.2 I2V A14B")


@check
def a_vae_of_the_other_wan_family_is_refused_naming_the_right_file():
    inputs = models("wan2.2-ti2v")
    inputs["vae"] = tiny_vae("wan2.1")
    refusal("wan2.2-ti2v", inputs, r"vae: this VAE makes 16-channel latents.*load wan2\.2_vae\.safetensors")
    inputs = models("wan2.1-i2v")
    inputs["vae"] = tiny_vae("wan2.2")
    refusal("wan2.1-i2v", inputs, r"vae: this VAE makes 48-channel latents.*load wan_2\.1_vae\.safetensors")


@check
def guidance_patches_are_refused_by_name():
    inputs = models("wan2.1-i2v")
    patched = inputs["model"].clone()
    patched.set_model_sampler_cfg_function(lambda args: args["cond"])
    patched.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
    refusal("wan2.1-i2v", {**inputs, "model": patched},
            r"model: this MODEL carries sampler_cfg_function, sampler_post_cfg_function")


@check
def a_torch_compiled_model_is_refused():
    """TorchCompileModel's own helper (the node's code path); torch.compile compiles lazily, at the first call."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    inputs = models("wan2.2-i2v-a14b")
    compiled = inputs["model_low_noise"].clone()
    set_torch_compile_wrapper(compiled, backend="inductor")
    refusal("wan2.2-i2v-a14b", {**inputs, "model_low_noise": compiled}, r"model_low_noise: .*TorchCompileModel")


# ---------------------------------------------------------------------------------------------- nothing left behind


def model_state(patcher) -> dict:
    """What a run could leave on a user's MODEL: hooks and instance attributes of every module, the
    patcher's options / wrappers / callbacks, its current patcher mark."""
    modules = {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), "forward" in m.__dict__)
               for name, m in patcher.model.named_modules()}

    def shape(value):
        if isinstance(value, dict):
            return {key: shape(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [shape(item) for item in value]
        return id(value)

    return {"modules": modules, "options": shape(patcher.model_options), "wrappers": shape(patcher.wrappers),
            "callbacks": shape(patcher.callbacks), "current_patcher": getattr(patcher.model, "current_patcher", None)}


def runs_leave_the_model_as_it_was(inputs: dict) -> None:
    """A run, a failing run and a cancelled run each leave every MODEL as it was."""
    import comfy.model_management as model_management
    from comfy.patcher_extension import WrappersMP

    patchers = [inputs[name] for name in ("model", "model_low_noise") if name in inputs]
    before = [model_state(patcher) for patcher in patchers]
    edit("wan2.2-i2v-a14b", inputs, attention_tau=1.0)
    assert [model_state(patcher) for patcher in patchers] == before, "a successful run left something on the MODEL"

    class Failure(Exception):
        pass

    for ending in ("error", "cancel"):
        calls = []

        def fail_mid_sampling(executor, *args, **kwargs):
            calls.append(1)
            if len(calls) == 8:  # within the sampler, with injection and the rows' patches in place
                if ending == "error":
                    raise Failure
                model_management.interrupt_current_processing(True)
            return executor(*args, **kwargs)

        trapped = [patcher.clone() for patcher in patchers]  # clones share the MODEL's modules, not its wrappers
        for patcher in trapped:
            patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "anyv2v-test-ending", fail_mid_sampling)
        traps = dict(zip(("model", "model_low_noise"), trapped))
        try:
            edit("wan2.2-i2v-a14b", {**inputs, **traps}, attention_tau=1.0)
        except (Failure, model_management.InterruptProcessingException):
            pass
        else:
            raise AssertionError(f"the {ending} did not stop the run")
        finally:
            model_management.interrupt_current_processing(False)
        for patcher, state in zip(trapped, before):
            after = model_state(patcher)
            assert after["modules"] == state["modules"], f"after an {ending}: hooks or patches left on the MODEL's modules"
            assert after["current_patcher"] is None, f"after an {ending}: the MODEL was not cleaned up"


@check
def a_run_an_error_and_a_cancel_leave_no_hook_or_patch_on_the_model():
    runs_leave_the_model_as_it_was(models("wan2.2-i2v-a14b"))


@check
def the_leftover_check_catches_a_planted_hook_left_behind():
    """The check above fails when a removal is skipped (a planted slip: hook handles not removed)."""
    import torch.utils.hooks

    remove = torch.utils.hooks.RemovableHandle.remove
    torch.utils.hooks.RemovableHandle.remove = lambda self: None
    try:
        runs_leave_the_model_as_it_was(models("wan2.2-i2v-a14b"))
    except AssertionError as error:
        assert "left something on the MODEL" in str(error) or "hooks or patches left" in str(error), str(error)
    else:
        raise AssertionError("the leftover check passed with hooks left on the MODEL")
    finally:
        torch.utils.hooks.RemovableHandle.remove = remove


@check
def auto_memory_counts_what_comfyui_can_unload_and_keeps_its_reserve():
    """The budget of the memory mode "auto" under ComfyUI: free memory, plus what loaded models hold
    on the device (ComfyUI unloads them on demand), minus ComfyUI's inference reserve."""
    import comfy.model_management as model_management

    inputs = models("wan2.1-i2v")
    with standin_gpu(inputs) as gpu:
        nothing_loaded = pack("host").available_device_memory(gpu.device)
        assert nothing_loaded == 64 * 2**30 - int(model_management.minimum_inference_memory()), nothing_loaded
        model_management.load_models_gpu([inputs["model"]])
        assert inputs["model"].loaded_size() > 0
        with_model = pack("host").available_device_memory(gpu.device)
        assert with_model == nothing_loaded + inputs["model"].loaded_size(), (with_model, nothing_loaded)


# ---------------------------------------------------------------------------------------------- BackbonePatcher


@check
def backbone_patcher_follows_newer_comfyuis_calls():
    """Against the snapshot's ModelPatcher: a negative extra_memory shrinks the loaded model (newer
    load_models_gpu asks that way), partially_load / partially_unload take newer keyword arguments
    (force_patch_weights, and any later ones), clone() fails with a message."""
    import tempfile

    import torch

    from anyv2v_core.testing.device_standin import StandInDevice
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.testing.tiny_models import build_tiny_i2vgenxl

    with tempfile.TemporaryDirectory() as folder:
        backbone = load_backbone(build_tiny_i2vgenxl(Path(folder) / "tiny-i2vgenxl"))
    with StandInDevice() as gpu:
        backbone.set_offload("none", gpu.device)
        patcher = pack("host")._patcher_class()(backbone, gpu.device, torch.device("cpu"))
        before = patcher.loaded_size()
        loaded = patcher.partially_load(gpu.device, 1e32, force_patch_weights=False, future_argument=1)
        assert loaded == patcher.loaded_size() - before and patcher.loaded_size() > 0, loaded
        shrink = patcher.loaded_size() // 3
        change = patcher.partially_load(gpu.device, -shrink)
        assert change <= -shrink and patcher.loaded_size() <= patcher.model_size() - shrink, change
        patcher.partially_load(gpu.device, 1e32)
        loaded = patcher.loaded_size()
        freed = patcher.partially_unload(torch.device("cpu"), loaded, force_patch_weights=False, future_argument=1)
        assert freed > 0 and patcher.loaded_size() == loaded - freed, (freed, loaded, patcher.loaded_size())
    # clone() (a MODEL patch node, or newer ComfyUI calling the class with new arguments) is refused by name
    from anyv2v_core.errors import AnyV2VError

    try:
        patcher.clone()
    except AnyV2VError as error:
        assert "cannot be cloned" in str(error), str(error)
    else:
        raise AssertionError("BackbonePatcher.clone() did not refuse")


# ---------------------------------------------------------------------------------------------- runner


def main() -> None:
    start_comfyui(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    chosen = sys.argv[2:] or list(CHECKS)
    results = {}
    for name in chosen:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except BaseException:  # ComfyUI's interrupt is a BaseException in newer versions
            results[name] = traceback.format_exc()
        print(f"{name}: {'ok' if results[name] == 'ok' else 'FAILED'}", file=sys.stderr, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
