"""Where a backbone's weights live while it runs: the offload policies.

- none: every component stays on the execution device (fastest, most memory).
- model: components live on the CPU; the first call into a component moves it to the device and
  moves every other component back, so one component is resident at a time (the UNet stays for
  the whole denoising loop, the text/image encoders leave once conditioning is computed).
- sequential: the UNet's top-level blocks are streamed to the device one at a time for their
  forward and sent back after it (lowest VRAM, slowest); the other components behave as in `model`.

Both are forward pre-hooks, so they work for every backbone without it knowing. `release()`
removes them and leaves everything on the CPU.

`guard_out_of_memory` turns an accelerator out-of-memory error in inversion, sampling or decoding
into `AnyV2VOutOfMemory`, whose message names these policies and the other options that help.
"""

from __future__ import annotations

import gc
import traceback
from contextlib import ContextDecorator

import torch

from .errors import AnyV2VError, AnyV2VOutOfMemory

OFFLOAD_POLICIES = ("none", "model", "sequential")


def _callable_children(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Direct children whose forward is called, looking through ModuleLists/ModuleDicts."""
    children = []
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            children.extend(_callable_children(child))
        else:
            children.append(child)
    return children


class Offloader:
    """Applies an offload policy to named components and keeps track of the resident one."""

    def __init__(self, components: dict[str, torch.nn.Module], device: torch.device, policy: str = "none") -> None:
        if policy not in OFFLOAD_POLICIES:
            raise AnyV2VError(f"offload policy {policy!r} is unknown; use one of {', '.join(OFFLOAD_POLICIES)}")
        self.components, self.device, self.policy = components, torch.device(device), policy
        self.resident: str | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if policy == "none":
            for module in components.values():
                module.to(self.device)
            return
        for name, module in components.items():
            module.to("cpu")
            streamed = policy == "sequential" and name == "unet"
            if streamed:
                self._stream_blocks(module)
            # the root and its direct children: a component is often entered through a method
            # (vae.encode -> quant_conv/encoder), never through its own forward
            for entry in [module, *_callable_children(module)]:
                self._handles.append(entry.register_forward_pre_hook(self._bring(name, streamed)))

    def _bring(self, name: str, streamed: bool):
        def hook(module, args):
            if self.resident == name:
                return
            for other, component in self.components.items():
                if other != name:
                    component.to("cpu")
            if streamed:  # only the UNet's own small root parameters; blocks come one at a time
                root = self.components[name]
                for tensor in [*root._parameters.values(), *root._buffers.values()]:
                    if tensor is not None:
                        tensor.data = tensor.data.to(self.device)
            else:
                self.components[name].to(self.device)
            self.resident = name
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        return hook

    def _stream_blocks(self, unet: torch.nn.Module) -> None:
        def load(module, args) -> None:
            module.to(self.device)

        def unload(module, args, output) -> None:
            module.to("cpu")

        for block in _callable_children(unet):
            self._handles.append(block.register_forward_pre_hook(load))
            self._handles.append(block.register_forward_hook(unload))

    def release(self) -> None:
        """Remove the hooks and move every component to the CPU."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.components.values():
            module.to("cpu")
        self.resident = None


# ---------------------------------------------------------------------------------------------- out of memory

OUT_OF_MEMORY_ADVICE = (
    "To lower peak memory: load the model with offload 'model' or 'sequential' (node memory mode, CLI --offload), "
    "use fp16/bf16 weights, edit fewer frames, use temporal windows (node window_length, CLI --window 16), "
    "choose a smaller working size, or decode fewer frames at once (decode chunk size 1)"
)


class OutOfMemory(AnyV2VOutOfMemory, torch.OutOfMemoryError):
    """The error `guard_out_of_memory` raises: an AnyV2VOutOfMemory that hosts also recognise as
    torch's (ComfyUI then unloads its own models too); errors.py stays free of torch."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, XPU), or a RuntimeError saying so (MPS and other backends)."""
    if isinstance(error, AnyV2VOutOfMemory):
        return False
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def release_memory() -> None:
    """Return cached accelerator blocks to the driver once the tensors of a failed step are gone."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class guard_out_of_memory(ContextDecorator):
    """Turn an out-of-memory error inside the block into `AnyV2VOutOfMemory`, after freeing memory.

    Inner context managers (the injection hooks) have already restored the model when the error
    reaches this guard. The failed step's tensors stay alive as long as the traceback's frames
    do, so their locals are cleared before the cache is emptied; the new error keeps only the
    original message.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __enter__(self) -> "guard_out_of_memory":
        return self

    def __exit__(self, error_type, error, tb) -> bool:
        if error is None or not is_out_of_memory(error):
            return False
        detail = (str(error).strip().splitlines() or ["out of memory"])[0][:300]
        traceback.clear_frames(tb)
        release_memory()
        raise OutOfMemory(f"out of memory during {self.stage} ({detail}). {OUT_OF_MEMORY_ADVICE}") from None
