"""What the nodes use from ComfyUI, imported lazily and guarded.

The pack must import (and its unit tests must run) without ComfyUI: every function here falls
back to plain behaviour when `comfy` / `folder_paths` are absent: the CPU, no progress bar,
no model folders unless a test sets them.
"""

from __future__ import annotations

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


# Files that make a folder a model: a diffusers pipeline, or a SEINE checkpoint (its SD-1.4 parts beside it)
MODEL_MARKERS = ("model_index.json", "seine.safetensors", "seine.pt")


def is_model_folder(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, marker)) for marker in MODEL_MARKERS)


def list_diffusers_models() -> list[str]:
    """Model folders relative to their diffusers root, found the way core DiffusersLoader finds them."""
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


def free_memory_for_heavy_work() -> None:
    """Ask ComfyUI to unload its own models and release cached blocks before an AnyV2V step."""
    model_management = _model_management()
    if model_management:
        model_management.unload_all_models()
        model_management.soft_empty_cache()


@contextmanager
def on_compute_device(handle) -> Iterator:
    """The handle's backbone running on ComfyUI's device under its offload policy for the block;
    back on the offload device afterwards (also after an error or a cancel) unless the user chose
    to keep it loaded."""
    backbone = handle.backbone
    if handle.offload == "comfyui":  # a ComfyUI MODEL: its own model management places it at every call
        yield backbone
        return
    free_memory_for_heavy_work()
    device = compute_device()
    current = getattr(backbone, "offloader", None)
    if current is None or (current.policy, current.device) != (handle.offload, device):
        # set_offload first returns every weight to the CPU: skip it when the model is already set up
        logger.info("running %s on %s (offload: %s)", backbone.name, device, handle.offload)
        backbone.set_offload(handle.offload, device)
    try:
        yield backbone
    finally:
        if not handle.keep_loaded:
            backbone.to(offload_device())  # also removes the offload policy's hooks
        model_management = _model_management()
        if model_management:
            model_management.soft_empty_cache()


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
