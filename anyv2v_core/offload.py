"""Where a backbone's weights live while it runs: the offload policies.

Policies (components are the backbone's `modules()`: unet, vae, text_encoder, image_encoder...):
- none: every component but the conditioning encoders stays on the execution device. An encoder
  (text or image) comes in when it runs and leaves when a denoiser (the UNet, a Wan transformer)
  next runs, so it never sits beside the loop's activations (1.8 GiB of I2VGen-XL's fp16 weights).
- model: one component on the device at a time, brought in by its first call (the UNet stays for
  the whole denoising loop).
- sequential: as model, and the denoisers' (the UNet's, each Wan expert's) top-level blocks are
  streamed through the device: each block comes in for its forward and leaves after it; from the
  second call on, the next block's copy starts while this one computes (on CUDA, on a side stream).

Every weight keeps one host (CPU) copy for the module's lifetime. On a CUDA GPU the copies of the
components the policy brings in and out are pinned (page-locked, for asynchronous loads), tensor by
tensor, each pageable copy released as soon as its pinned one exists, and no more than
PINNED_HOST_FRACTION of the host's RAM in all; the components that stay on the device are not.
Offloading points the module back at that copy, so nothing is ever copied off the device, and
loading is a non-blocking copy from it. The copies stay with the modules while `Offloader`s come
and go with `Backbone.set_offload`, so a new policy or a repeated one moves only what must move.
Weights are read-only here (inference): change them through the loader, not on an offloaded model.

All policies are forward pre-hooks, so they work for every backbone without it knowing, and a
component evicted from outside (ComfyUI's model management) comes back at its next call.
`release()` removes the hooks and leaves the weights where they are; the next `Offloader` places them.

How much each policy holds on the device at its worst moment, and the fastest policy that fits a
run, are estimated in `memory.py`.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .errors import AnyV2VError
from .memory import (
    DENOISERS, ENCODERS, OFFLOAD_POLICIES, callable_children, execution_device, guard_out_of_memory, nbytes,
    policy_peaks)

logger = logging.getLogger("AnyV2V")

ROW_CACHE_SIZE = 32  # device-side row batches kept: the row sets (3 and 2 rows) of every temporal window
# page-locked memory cannot be swapped or moved: the OS and the host's own tensors need the rest
PINNED_HOST_FRACTION = 0.5
FALLBACK_HOST_MEMORY = 16 * 2**30  # where the OS does not report its RAM


def on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """`tensor` is on `device` ("cuda" matches "cuda:0")."""
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


# ---------------------------------------------------------------------------------------------- host copies


class Slot(NamedTuple):
    """One parameter or buffer entry of one module."""

    # weak: the host copies are kept on the module itself, and a reference back from them would make
    # a cycle that only the garbage collector breaks, keeping a dropped model's device weights alive
    owner: weakref.ref
    kind: str  # "_parameters" or "_buffers"
    name: str

    def get(self) -> torch.Tensor:
        return getattr(self.owner(), self.kind)[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        getattr(self.owner(), self.kind)[self.name] = tensor


def slots_of(module: torch.nn.Module) -> list[Slot]:
    """The parameter and buffer slots of a module tree (a module shared by several parents once)."""
    return [Slot(weakref.ref(owner), kind, name) for owner in module.modules() for kind in ("_parameters", "_buffers")
            for name, tensor in getattr(owner, kind).items() if tensor is not None]


def _as_slot_tensor(slot: Slot, tensor: torch.Tensor) -> torch.Tensor:
    return torch.nn.Parameter(tensor, requires_grad=False) if slot.kind == "_parameters" else tensor


def pinned_bytes_cap() -> int:
    """The most bytes of host copies pinned at once, over every model: PINNED_HOST_FRACTION of the RAM."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        total = FALLBACK_HOST_MEMORY
    return int(total * PINNED_HOST_FRACTION)


def page_locked(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned copy of a host tensor."""
    return tensor.pin_memory()


_PINNED: "weakref.WeakSet[HostWeights]" = weakref.WeakSet()  # host copies holding pinned memory


def pinned_bytes() -> int:
    """Bytes of host copies pinned now, over every live model."""
    return sum(weights.pinned_bytes for weights in _PINNED)


class HostWeights:
    """The host copy of every parameter and buffer of one component, and moves that use it."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.slots = slots_of(module)
        self.host: dict[Slot, torch.Tensor] = {}
        self.pinned = False  # pinning was done (as far as the cap allowed)
        self.pinned_bytes = 0
        copies: dict[int, torch.Tensor] = {}  # tensors shared by several slots get one host copy
        for slot in self.slots:
            current = slot.get()
            if id(current) not in copies:
                copies[id(current)] = current if current.device.type == "cpu" else _as_slot_tensor(slot, current.cpu())
            self.host[slot] = copies[id(current)]

    def refresh(self) -> None:
        """Adopt tensors put on the CPU from outside (a module moved with `.to("cpu")`) as the host copies."""
        adopted = False
        for slot in self.slots:
            current = slot.get()
            if current.device.type == "cpu" and current is not self.host[slot]:
                self.host[slot] = current
                self.pinned, adopted = False, True
        if adopted:
            self.pinned_bytes = nbytes(t for t in self.host.values() if t.is_pinned())

    def pin(self) -> None:
        """Page-lock the host copies (once): copies from them to a CUDA GPU are then asynchronous.

        Tensor by tensor, each pageable copy dropped as soon as its pinned one exists (the host
        holds one extra tensor at a time, not a second copy of the model); tensors past the cap
        (`pinned_bytes_cap`) stay pageable, and their loads synchronous."""
        if self.pinned:
            return
        self.pinned = True
        _PINNED.add(self)
        sharing: dict[int, list[Slot]] = {}  # slots sharing one host tensor get one pinned copy
        for slot in self.slots:
            sharing.setdefault(id(self.host[slot]), []).append(slot)
        cap = pinned_bytes_cap()
        for slots in sharing.values():
            host = self.host[slots[0]]
            size = host.numel() * host.element_size()
            if host.is_pinned():
                continue
            if pinned_bytes() + size > cap:
                logger.warning("%.1f GiB of host copies are pinned (the cap, %.0f%% of the RAM); the rest stay "
                               "pageable and load synchronously", pinned_bytes() / 2**30, 100 * PINNED_HOST_FRACTION)
                return
            try:
                pinned = _as_slot_tensor(slots[0], page_locked(host))
            except RuntimeError as error:  # page-locked memory is limited (Windows, containers): run unpinned
                logger.warning("could not pin the host copy of the weights (%s); loads will be synchronous", error)
                return
            for slot in slots:
                if slot.get() is host:
                    slot.set(pinned)
                self.host[slot] = pinned
            self.pinned_bytes += size
            del host, pinned  # the pageable copy goes now, before the next tensor is pinned

    def load(self, slots: Sequence[Slot], device: torch.device) -> None:
        """Point `slots` at device copies of their host tensors, copying those not there yet (non-blocking)."""
        copies: dict[int, torch.Tensor] = {}
        for slot in slots:
            if on_device(slot.get(), device):
                continue
            host = self.host[slot]
            if id(host) not in copies:
                copies[id(host)] = _as_slot_tensor(slot, host.to(device, non_blocking=True))
            slot.set(copies[id(host)])

    def offload(self, slots: Sequence[Slot]) -> None:
        """Point `slots` back at their host copies; the device copies are freed, nothing is copied."""
        for slot in slots:
            slot.set(self.host[slot])

    def bytes_on(self, device: torch.device) -> int:
        return nbytes(t for t in (slot.get() for slot in self.slots) if on_device(t, device))

    def total_bytes(self) -> int:
        return nbytes(self.host.values())


HOST_WEIGHTS_ATTRIBUTE = "_anyv2v_host_weights"


def host_weights(module: torch.nn.Module) -> HostWeights:
    """The host copies of `module`'s weights, made the first time it is offloaded and kept on it (they
    live and die with the module)."""
    weights = getattr(module, HOST_WEIGHTS_ATTRIBUTE, None)
    if weights is None:
        weights = HostWeights(module)
        object.__setattr__(module, HOST_WEIGHTS_ATTRIBUTE, weights)
    else:
        weights.refresh()
    return weights


# ---------------------------------------------------------------------------------------------- the offloader


class _Block(NamedTuple):
    """A top-level block of a denoiser streamed by the sequential policy."""

    component: str
    index: int  # its place among the component's blocks
    module: torch.nn.Module
    slots: list[Slot]


class Offloader:
    """Applies an offload policy to named components on an execution device."""

    def __init__(self, components: dict[str, torch.nn.Module], device: torch.device | str, policy: str = "none") -> None:
        if policy not in OFFLOAD_POLICIES:
            raise AnyV2VError(f"offload policy {policy!r} is unknown; use one of {', '.join(OFFLOAD_POLICIES)}")
        device = execution_device(device)
        self.components, self.device, self.policy = components, device, policy
        self.weights = {name: host_weights(module) for name, module in components.items()}
        self.active: str | None = None  # the component entered last (the hooks' fast path)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._rows: OrderedDict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = OrderedDict()
        self._blocks: dict[str, list[_Block]] = {}  # streamed denoiser -> its blocks (sequential)
        self._roots: dict[str, list[Slot]] = {}  # streamed denoiser -> its slots outside any block
        self._block_order: dict[str, list[int]] = {}  # per denoiser, blocks in the order its calls ran them
        self._prefetched: dict[tuple[str, int], torch.cuda.Event | None] = {}
        self._copy_stream = None
        if device.type == "cuda":
            for name in self.pinned_components():
                self.weights[name].pin()
        if policy == "sequential":
            for name in components:
                if name in DENOISERS:
                    self._stream_blocks(name)
        # leave on the device only what the policy keeps there; everything else comes in at its first call
        steady = self.steady_components() if device.type != "cpu" else []
        for name in self.weights:
            if name not in steady:
                self.offload_component(name)
        if device.type == "cpu":
            return
        for name, module in components.items():
            # the root and its direct children: a component is often entered through a method
            # (vae.encode -> quant_conv/encoder), never through its own forward
            for entry in [module, *callable_children(module)]:
                self._handles.append(entry.register_forward_pre_hook(self._enter_hook(name)))
        for block in (block for blocks in self._blocks.values() for block in blocks):  # after the component hooks
            self._handles.append(block.module.register_forward_pre_hook(self._block_hook(block, enter=True)))
            self._handles.append(block.module.register_forward_hook(self._block_hook(block, enter=False)))

    # -------------------------------------------------------------------------- components

    def _must_leave(self, other: str, entering: str) -> bool:
        if self.policy == "none":
            return other in ENCODERS and entering in DENOISERS
        return other != entering

    def enter(self, name: str) -> None:
        """Make `name` runnable: evict what the policy says cannot stay beside it, then load it."""
        if self.active == name:
            return
        self.active = None
        for other in self.weights:
            if other != name and self._must_leave(other, name):
                self.offload_component(other)
        weights = self.weights[name]
        try:
            if name in self._roots:
                weights.load(self._roots[name], self.device)
            else:
                weights.load(weights.slots, self.device)
        except BaseException:
            self.offload_component(name)
            raise
        self.active = name

    def _enter_hook(self, name: str):
        # the hooks live on the modules, which the offloader holds: they hold it weakly, so that a
        # dropped model (and its device weights) is freed at once, not at the next garbage collection
        offloader = weakref.ref(self)

        def hook(module, args) -> None:
            live = offloader()
            if live is not None:
                live.enter(name)

        return hook

    def offload_component(self, name: str) -> None:
        weights = self.weights[name]
        if name in self._blocks:
            self._drop_prefetched(name)
        weights.offload(weights.slots)
        if self.active == name:
            self.active = None

    def offload_all(self) -> None:
        """Every weight back on its host copy (no copy), and the device-side row batches dropped."""
        for name in self.weights:
            self.offload_component(name)
        self._rows.clear()

    def pinned_components(self) -> list[str]:
        """Whose host copies are pinned on a CUDA GPU: those the policy loads more than once (not the
        ones it keeps on the device, which are read from the host once)."""
        steady = self.steady_components()
        return [name for name in self.weights if name not in steady]

    def steady_components(self) -> list[str]:
        """What the policy keeps on the device between calls: all but the encoders (none); nothing
        (model, sequential: every component comes in at its first call)."""
        return [name for name in self.weights if name not in ENCODERS] if self.policy == "none" else []

    def load_steady(self) -> None:
        """Bring in what the policy keeps on the device (otherwise each component comes at its first call)."""
        if self.device.type == "cpu":
            return
        with guard_out_of_memory("setup (moving the model to the device)"):
            try:
                for name in self.steady_components():
                    self.weights[name].load(self.weights[name].slots, self.device)
            except BaseException:
                self.offload_all()  # never leave a half-moved model on the device
                raise

    def resident_bytes(self) -> int:
        """Bytes of weights now on the device."""
        return sum(weights.bytes_on(self.device) for weights in self.weights.values())

    def peak_weight_bytes(self) -> int:
        """The most weight bytes this policy puts on the device at once."""
        return policy_peaks(self.components)[self.policy]

    # -------------------------------------------------------------------------- sequential blocks

    def _stream_blocks(self, name: str) -> None:
        owners: dict[int, int] = {}  # id(slot owner) -> the block holding it; -1 when several do
        children = [child for child in callable_children(self.components[name]) if slots_of(child)]
        for index, child in enumerate(children):
            for owner in child.modules():
                owners[id(owner)] = index if owners.get(id(owner), index) == index else -1
        slots = self.weights[name].slots
        self._blocks[name] = [_Block(name, index, child, [s for s in slots if owners.get(id(s.owner())) == index])
                              for index, child in enumerate(children)]
        self._roots[name] = [s for s in slots if owners.get(id(s.owner()), -1) == -1]  # the root's own and shared modules
        self._block_order[name] = []

    def _block_hook(self, block: _Block, *, enter: bool):
        name, index, offloader = block.component, block.index, weakref.ref(self)  # weak: see _enter_hook

        def before(module, args) -> None:
            live = offloader()
            if live is not None:
                live._enter_block(name, index)

        def after(module, args, output) -> None:
            live = offloader()
            if live is not None:
                live.weights[name].offload(live._blocks[name][index].slots)
                live._prefetched.pop((name, index), None)

        return before if enter else after

    def _enter_block(self, name: str, index: int) -> None:
        order = self._block_order[name]
        if index not in order:
            order.append(index)
        try:
            self._load_block(self._blocks[name][index])
            if len(order) == len(self._blocks[name]):  # the order is known: prefetch the next one (cyclic)
                following = order[(order.index(index) + 1) % len(order)]
                self._prefetch_block(self._blocks[name][following])
        except BaseException:
            self.offload_component(name)  # no block left half-loaded
            raise

    def _load_block(self, block: _Block) -> None:
        key = (block.component, block.index)
        if key in self._prefetched:
            event = self._prefetched.pop(key)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        self.weights[block.component].load(block.slots, self.device)

    def _prefetch_block(self, block: _Block) -> None:
        key, weights = (block.component, block.index), self.weights[block.component]
        slots = [s for s in block.slots if not on_device(s.get(), self.device)]
        if key in self._prefetched or not slots:
            return
        if self._copy_stream is None and self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
        if self._copy_stream is None:  # no side stream here: load it now
            weights.load(slots, self.device)
            self._prefetched[key] = None
            return
        # Allocate on the compute stream (the block is freed there), copy on the side stream once the
        # compute stream has finished with whatever that memory held; the block's forward waits for the copy.
        compute = torch.cuda.current_stream(self.device)
        targets = {id(weights.host[s]): torch.empty_like(weights.host[s], device=self.device) for s in slots}
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            for slot in slots:
                target = targets[id(weights.host[slot])]
                target.copy_(weights.host[slot], non_blocking=True)
                slot.set(_as_slot_tensor(slot, target))
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        self._prefetched[key] = event

    def _drop_prefetched(self, name: str | None = None) -> None:
        """Forget the prefetched blocks (of denoiser `name`, or all); memory still being copied into
        is not reused before the copy ends."""
        for key in [key for key in self._prefetched if name is None or key[0] == name]:
            event = self._prefetched.pop(key)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

    # -------------------------------------------------------------------------- conditioning rows

    def rows_on_device(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The batch `cat(tensors)` on the device in `dtype`, built once per distinct set of (CPU)
        row tensors: the loops pass the same rows, or the same window slices of them, at every step.
        Row tensors are never changed in place; the cache holds them, so their memory is not reused."""
        key = (dtype, *((t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
                        for t in tensors))
        if key not in self._rows:
            batch = torch.cat(list(tensors)).to(self.device, dtype, non_blocking=True)
            self._rows[key] = (list(tensors), batch)
            if len(self._rows) > ROW_CACHE_SIZE:
                self._rows.popitem(last=False)
        self._rows.move_to_end(key)
        return self._rows[key][1]

    def release(self) -> None:
        """Remove the hooks; the weights stay where they are (the next policy places them)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._rows.clear()
        self._drop_prefetched()
        self.active = None
