"""A stand-in accelerator for checks on machines without one (tests and benchmarks only).

Inside `with StandInDevice() as gpu:`, `gpu.device` (torch.device("meta")) plays the GPU: a tensor
moved there keeps its values in a CPU tensor (its payload) behind a meta-device wrapper
(`OnStandIn`), so whole phases run and give the numbers of the CPU run, while every operation
checks devices as CUDA does: a CPU tensor with at least one dimension meeting a device tensor
raises "Expected all tensors to be on the same device" (0-dim CPU tensors are scalars, as on CUDA;
copies and index tensors may cross). Copies in and out are counted (`bytes_to_device`,
`bytes_to_host`, and the bytes to the device asked for as non-blocking copies). With
`fail_after_bytes_to_device`, a copy in that would pass that many bytes in all raises CUDA's
out-of-memory error instead (what a run does when the device fills up).

`StandInDevice(weightless=True)` computes nothing and holds no memory, for counting the copies of
a model at its real size: payloads on both sides are meta tensors, and `weightless_on_host(module)`
turns a module built on the meta device into one whose weights are on the "host" (`OnHost`
wrappers reporting the CPU).

Two tensors are made inside C++ where no Python mode sees them: `torch.tensor(data, device=...)`
(and `as_tensor`), and the index tensor of `x[..., [1, 2]]`. Inside the block the first is built
on the CPU and then moved, and list indices become CPU index tensors (which CUDA accepts too):
the same thing as far as the program can tell.
"""

from __future__ import annotations

from contextlib import ExitStack
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

STANDIN = torch.device("meta")
HOST = torch.device("cpu")
aten = torch.ops.aten
CROSS_DEVICE_OPS = {aten._to_copy.default, aten.copy_.default}
# ops whose index tensors may stay on the CPU on CUDA
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}
_COMPOSITE: dict = {}  # op -> it has a CompositeImplicitAutograd kernel


class _Wrapped(torch.Tensor):
    """A tensor reporting `placement` whose values (or, weightless, shape) are in `payload`."""

    placement: torch.device
    payload: torch.Tensor

    @staticmethod
    def __new__(cls, payload: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, payload.shape, strides=payload.stride(), storage_offset=payload.storage_offset(),
            dtype=payload.dtype, device=cls.placement, requires_grad=False)

    def __init__(self, payload: torch.Tensor):
        self.payload = payload

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.payload!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # a stand-in tensor used outside the block keeps its device rules
        with StandInDevice(weightless=OnHost in types):
            return func(*args, **(kwargs or {}))


class OnStandIn(_Wrapped):
    """A tensor on the stand-in device."""

    placement = STANDIN


class OnHost(_Wrapped):
    """A weightless tensor on the host (its payload is a meta tensor)."""

    placement = HOST


def weightless_on_host(module: torch.nn.Module) -> torch.nn.Module:
    """A module built on the meta device, its weights made weightless host tensors (for `weightless=True`)."""
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(owner, kind)
            for name, tensor in table.items():
                if tensor is not None:
                    host = OnHost(tensor.detach())
                    table[name] = torch.nn.Parameter(host, requires_grad=False) if kind == "_parameters" else host
    return module


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an op's arguments (tensors, lists and tuples of them, keyword dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, item) for item in value)
    if isinstance(value, dict):
        return {key: _map(fn, item) for key, item in value.items()}
    return value


def _wrap(cls, payload: torch.Tensor) -> _Wrapped:
    # a view of a tensor made outside inference mode is a normal tensor even inside it: match the payload
    with torch.inference_mode(payload.is_inference()):
        return cls(payload)


class StandInDevice(TorchDispatchMode):
    """The stand-in GPU; see the module docstring."""

    device = STANDIN

    def __init__(self, fail_after_bytes_to_device: int | None = None, *, weightless: bool = False) -> None:
        super().__init__()
        self.fail_after_bytes_to_device = fail_after_bytes_to_device
        self.weightless = weightless
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self.non_blocking_bytes_to_device = 0
        self._patches = ExitStack()
        self._depth = 0  # the mode is re-entered to decompose ops; the factories are patched once

    def __enter__(self) -> "StandInDevice":
        super().__enter__()
        self._depth += 1
        if self._depth == 1:
            for name in ("tensor", "as_tensor"):
                self._patches.enter_context(mock.patch.object(torch, name, _host_then_moved(getattr(torch, name))))
            self._patches.enter_context(_ListIndicesOnHost())
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._patches.close()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # in inference mode composite ops (aten.to.device...) arrive whole: split them into the ops below
        if func not in _COMPOSITE:
            _COMPOSITE[func] = torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), torch._C.DispatchKey.CompositeImplicitAutograd)
        if _COMPOSITE[func]:
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return self._run(func, args, kwargs)

    def _run(self, func, args, kwargs):
        tensors = _tensors(args) + _tensors(kwargs)
        on_device = [t for t in tensors if isinstance(t, OnStandIn)]
        on_host = [t for t in tensors if not isinstance(t, OnStandIn) and t.dim() > 0]
        if any(t.device.type == "meta" and not isinstance(t, _Wrapped) for t in tensors):
            raise RuntimeError(f"{func} got a tensor on the meta device without values: it was made where the "
                               "stand-in cannot see (a C++ copy); build it on the CPU and move it with .to(device)")
        if on_device and on_host and func not in CROSS_DEVICE_OPS | INDEX_OPS:
            shapes = ", ".join(f"{'device' if isinstance(t, OnStandIn) else 'cpu'} {tuple(t.shape)}" for t in tensors)
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 (stand-in) and cpu! ({func}: {shapes})")
        target = kwargs.get("device")
        if target is not None:
            to_device = torch.device(target) == STANDIN
        elif func is aten._to_copy.default:
            to_device = isinstance(args[0], OnStandIn)
        else:
            to_device = bool(on_device)
        self._count(func, args, kwargs, to_device)
        payload_device = STANDIN if self.weightless else HOST

        def unwrap(tensor: torch.Tensor) -> torch.Tensor:
            if isinstance(tensor, _Wrapped):
                return tensor.payload
            return tensor.to(payload_device) if self.weightless else tensor  # values of no use without weights

        if target is not None:
            kwargs = {**kwargs, "device": payload_device}
        result = func(*_map(unwrap, args), **_map(unwrap, kwargs))
        if func is aten.copy_.default:
            return args[0]
        given = [t for t in tensors if isinstance(t, _Wrapped)]

        def wrap(tensor):
            if not isinstance(tensor, torch.Tensor):
                return tensor
            for original in given:  # in-place ops return their input
                if tensor is original.payload:
                    return original
            if to_device:
                return _wrap(OnStandIn, tensor)
            return _wrap(OnHost, tensor) if self.weightless else tensor

        return _map(wrap, result)

    def _count(self, func, args, kwargs, to_device: bool) -> None:
        if func is aten._to_copy.default:
            source, into_device = args[0], to_device
            nbytes = source.numel() * (kwargs.get("dtype") or source.dtype).itemsize
        elif func is aten.copy_.default:
            source, into_device = args[1], isinstance(args[0], OnStandIn)
            nbytes = source.numel() * args[0].dtype.itemsize
        else:
            return
        from_device = isinstance(source, OnStandIn)
        if into_device and not from_device:
            budget = self.fail_after_bytes_to_device
            if budget is not None and self.bytes_to_device + nbytes > budget:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes (stand-in GPU, "
                                             f"{budget} bytes in all)")
            self.bytes_to_device += nbytes
            if kwargs.get("non_blocking") or (func is aten.copy_.default and len(args) > 2 and args[2]):
                self.non_blocking_bytes_to_device += nbytes
        elif from_device and not into_device:
            self.bytes_to_host += nbytes


class _ListIndicesOnHost(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            index = tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
            args = (args[0], index, *args[2:])
        return func(*args, **(kwargs or {}))


def _host_then_moved(factory):
    def build(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device) == STANDIN:
            return factory(data, *args, **kwargs).to(STANDIN)
        return factory(data, *args, device=device, **kwargs)

    return build
