"""What the nodes use from ComfyUI, imported lazily and guarded.

The pack must import (and its unit tests must run) without ComfyUI: every function here falls
back to plain behaviour when `comfy` / `folder_paths` are absent: the CPU, no progress bar,
no model folders unless a test sets them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger("AnyV2V")

NO_MODEL = "(no diffusers model found)"  # combo placeholder when the diffusers folders are empty


def download_hint(repo: str, name: str, include: str) -> str:
    """How to get a model into ComfyUI/models/diffusers, for error messages and tooltips."""
    return (f"download it with `hf download {repo} --include {include} --local-dir ComfyUI/models/diffusers/{name}`, "
            "then refresh the browser tab (press r) and pick it")


def _model_management():
    try:
        import comfy.model_management as model_management
    except ImportError:
        return None
    return model_management


# ---------------------------------------------------------------------------------------------- model folders


def diffusers_roots() -> list[str]:
    """ComfyUI's `diffusers` model folders (models/diffusers plus extra_model_paths.yaml entries)."""
    try:
        import folder_paths
    except ImportError:
        return []
    return list(folder_paths.get_folder_paths("diffusers"))


def is_model_folder(folder: str) -> bool:
    from anyv2v_core.backbones.families import MODEL_MARKERS

    return any(os.path.isfile(os.path.join(folder, marker)) for marker in MODEL_MARKERS)


def list_diffusers_models() -> list[str]:
    """Model folders relative to their diffusers root (those holding one of the backbone families'
    `MODEL_MARKERS`), found the way core DiffusersLoader finds them."""
    from anyv2v_core.backbones.families import MODEL_MARKERS

    found = []
    for root in diffusers_roots():
        if not os.path.isdir(root):
            continue
        for folder, subfolders, files in os.walk(root, followlinks=True):
            if any(marker in files for marker in MODEL_MARKERS):
                found.append(os.path.relpath(folder, root).replace(os.sep, "/"))
                subfolders.clear()  # a model's component folders hold no further models
    return sorted(set(found))


def model_options() -> list[str]:
    return list_diffusers_models() or [NO_MODEL]


def resolve_model_folder(name: str, hint: str) -> str:
    """Absolute folder of a listed model; refuses names that leave the configured folders.

    Raises ValueError with an actionable message ending in `hint` (how to get the model).
    """
    if not name or name == NO_MODEL:
        raise ValueError(f"no model is in ComfyUI's diffusers folders; {hint}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or ".." in parts:  # C:x on Windows drops the root
        raise ValueError(f"model {name!r} must be a folder inside ComfyUI's diffusers model folders, not a path out of them")
    roots = diffusers_roots()
    for root in roots:
        root = os.path.abspath(root)
        folder = os.path.normpath(os.path.join(root, *parts))
        if os.path.commonpath([root, folder]) == root and is_model_folder(folder):
            return folder
    where = ", ".join(roots) or "(none configured)"
    raise ValueError(f"model {name!r} is not a model folder (one with a model_index.json) in the diffusers "
                     f"folders ({where}); {hint}")


def model_class_name(folder: str) -> str | None:
    """The pipeline class a diffusers folder declares in model_index.json (None if unreadable)."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as file:
            return json.load(file).get("_class_name")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- devices and memory


def compute_device():
    """ComfyUI's torch device (the GPU, or the CPU under --cpu); the CPU without ComfyUI."""
    import torch

    model_management = _model_management()
    return model_management.get_torch_device() if model_management else torch.device("cpu")


def offload_device():
    import torch

    model_management = _model_management()
    return model_management.unet_offload_device() if model_management else torch.device("cpu")


def weight_dtype(choice: str, device, half_dtypes):
    """The loader's dtype: "auto" asks ComfyUI which half precision `device` should run (its
    --force-fp32 / --force-fp16 flags, its list of GPUs whose fp16 is broken, bf16 only where it is
    native), in the backbone family's order of preference (`Backbone.half_dtypes`); float32 if
    neither. Other choices, and "auto" without ComfyUI, go to the engine as they are."""
    import torch

    model_management = _model_management()
    if choice != "auto" or model_management is None:
        return choice
    allowed = {torch.float16: model_management.should_use_fp16(device),
               torch.bfloat16: model_management.should_use_bf16(device)}
    return next((half for half in half_dtypes if allowed.get(half)), torch.float32)


def free_device_memory(bytes_needed: int) -> None:
    """Ask ComfyUI to make `bytes_needed` free on its device, unloading only as many of its models
    (and ours) as that takes."""
    model_management = _model_management()
    if model_management:
        model_management.free_memory(bytes_needed, model_management.get_torch_device())


def release_cached_memory() -> None:
    model_management = _model_management()
    if model_management:
        model_management.soft_empty_cache()


def available_device_memory(device) -> int | None:
    """Accelerator bytes an edit may count on; None where there is no device memory to fit (the CPU,
    or without ComfyUI a device torch cannot measure). Under ComfyUI: what is free now, plus what its
    loaded models hold on the device (it unloads them on demand), minus the memory it keeps for
    inference (--reserve-vram included); without it, CUDA's free memory less the engine's reserve."""
    from anyv2v_core.memory import available_memory, standalone_available_memory

    model_management = _model_management()
    if model_management is None:
        return standalone_available_memory(device)
    if device.type == "cpu":
        return None
    unloadable = sum(loaded.model_loaded_memory() for loaded in model_management.current_loaded_models
                     if loaded.device == device)
    return available_memory(model_management.get_free_memory(device), unloadable,
                            model_management.minimum_inference_memory())


def backbone_patcher(handle):
    """The handle's backbone as a ComfyUI model (a ModelPatcher), made on first use; None without ComfyUI."""
    if _model_management() is None:
        return None
    if handle.patcher is None:
        handle.patcher = _patcher_class()(handle.backbone, compute_device(), offload_device())
    return handle.patcher


@functools.cache
def _patcher_class():
    """Defined on first use: comfy is imported lazily."""
    import torch
    from comfy.model_patcher import ModelPatcher

    class AnyV2VBackboneModules(torch.nn.ModuleDict):
        """The backbone's networks, as the one module ComfyUI's model list holds."""

    class BackbonePatcher(ModelPatcher):
        """An AnyV2V backbone in ComfyUI's model management: ComfyUI counts its weights, frees room
        for them and the run's activations before a node runs (instead of unloading everything),
        and can evict them when it needs the memory. Every move goes through the backbone's
        offloader (host copies: nothing is copied back), so the policy's hooks stay consistent."""

        def __init__(self, backbone, load_device, offload_device):
            self.backbone = backbone  # before ModelPatcher.__init__, which asks model_size()
            super().__init__(AnyV2VBackboneModules(backbone.modules()), load_device, offload_device)

        def model_size(self):
            return self.backbone.offloader.peak_weight_bytes()

        def loaded_size(self):
            return self.backbone.offloader.resident_bytes()

        def current_loaded_device(self):
            return self.load_device if self.loaded_size() else self.offload_device

        # Newer ComfyUI passes a negative extra_memory to shrink a loaded model, and adds keyword
        # arguments to these two (force_patch_weights on partially_unload): both are taken.
        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False, **kwargs):
            if extra_memory < 0:
                return -self.partially_unload(self.offload_device, -extra_memory)
            before = self.loaded_size()
            self.backbone.offloader.load_steady()
            return self.loaded_size() - before

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False, **kwargs):
            before = self.loaded_size()
            offloader = self.backbone.offloader
            for name in sorted(offloader.weights, key=lambda n: offloader.weights[n].bytes_on(offloader.device)):
                if before - self.loaded_size() >= memory_to_free:
                    break
                offloader.offload_component(name)
            return before - self.loaded_size()

        def clone(self, *args, **kwargs):
            from anyv2v_core.errors import AnyV2VError

            raise AnyV2VError("an AnyV2V backbone is not a MODEL: it cannot be cloned or patched (LoRA, model "
                              "patches). Patch the MODEL before AnyV2V Wan Model, or use LoadI2VBackbone's output "
                              "only with the AnyV2V nodes")

        def detach(self, unpatch_all=True):
            if unpatch_all and self.loaded_size():
                logger.info("ComfyUI unloads %s (%.1f MiB)", self.backbone.name, self.loaded_size() / 2**20)
                self.backbone.offloader.offload_all()
            return self.model

    return BackbonePatcher


@contextmanager
def on_compute_device(handle, *, frames: int | None = None, size_wh: tuple[int, int] | None = None, rows: int = 3,
                      decode_chunk_size: int = 1) -> Iterator:
    """The handle's backbone on ComfyUI's device for the block, for a run of `rows` batch rows of
    `frames` frames per UNet call at `size_wh` (default: the backbone's native ones).

    The memory mode's policy ("auto": the fastest that fits this run on this device) is set up,
    the backbone is loaded through ComfyUI's model management, which frees only what the weights
    and the estimated activations need, and afterwards (also after an error or a cancel) it goes
    back to the offload device unless the mode keeps it loaded (then ComfyUI may evict it later).
    """
    from anyv2v_core.memory import (
        FRAGMENTATION, activation_bytes, auto_policy, execution_device, guard_out_of_memory)

    backbone = handle.backbone
    frames, size_wh = frames or backbone.defaults.num_frames, size_wh or backbone.defaults.size_wh
    if handle.offload == "comfyui":  # a ComfyUI MODEL: loaded by ComfyUI's sampler protocol, per phase and expert
        with backbone.running(rows=rows, frames=frames, size_wh=size_wh):
            yield backbone
        return
    device = execution_device(compute_device())
    policy = handle.offload
    if policy == "auto":  # no device memory to fit (the CPU): nothing to choose, all stays where it is
        available = available_device_memory(device)
        policy = "none" if available is None else auto_policy(
            backbone, available, frames=frames, size_wh=size_wh, rows=rows, decode_chunk_size=decode_chunk_size)
    if (backbone.offloader.policy, backbone.offloader.device) != (policy, device):  # else: already set up, nothing moves
        logger.info("running %s on %s (offload: %s)", backbone.name, device, policy)
        backbone.set_offload(policy, device)
    activations = activation_bytes(backbone, frames=frames, size_wh=size_wh, rows=rows,
                                   decode_chunk_size=decode_chunk_size)
    try:
        patcher = backbone_patcher(handle)
        if patcher is not None:
            with guard_out_of_memory("setup (moving the model to the device)"):
                _model_management().load_models_gpu([patcher], memory_required=int(max(activations) * FRAGMENTATION))
        yield backbone
    finally:
        if not handle.keep_loaded:
            backbone.to(offload_device())  # no copy: the weights point back at their host copies; hooks removed
        release_cached_memory()


# ---------------------------------------------------------------------------------------------- progress and cancel


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed cancel."""
    model_management = _model_management()
    if model_management:
        model_management.throw_exception_if_processing_interrupted()


def progress_bar(total: int) -> Callable[[int, int], None]:
    """A `progress(done, total)` callable for the engine: advances a ComfyUI ProgressBar of `total`
    steps and raises on cancel (the engine restores every model patch when it does)."""
    try:
        from comfy.utils import ProgressBar
    except ImportError:
        bar = None
    else:
        bar = ProgressBar(total)

    def report(done: int, _phase_total: int) -> None:
        check_interrupted()
        if bar is not None:
            bar.update_absolute(done, total)

    return report
