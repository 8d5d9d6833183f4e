"""Inversions on disk: one safetensors file per `Inversion`, so that a later run or another worker
edits the same source again without inverting it (the batch runner's cache, `batch/store.py`).

The file holds every tensor of the inversion (its latents, the tensors of the source row's
conditioning, the source first frame) and, in the safetensors metadata, a JSON description of
the rest: each dataclass by name with its fields, dict keys as JSON values (the latents may be
keyed by int timesteps or by float noise levels), plain values as they are. Nothing here knows
which fields an inversion or a backbone's row has; it walks `dataclasses.fields`. Dataclasses are
rebuilt only from this package's modules, so a file never names code to import from elsewhere.
Anything that would not come back as it was (a set, a tensor subclass, an object that is not a
dataclass) is refused when saving, before anything is written.

Tensors load on the CPU, where the engine keeps an inversion's tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path

import torch

from .errors import AnyV2VError
from .inversion import Inversion
from .video import _write_atomically, check_output_path

FORMAT = "anyv2v-inversion/1"
PACKAGE = __name__.rpartition(".")[0]
PLAIN_TYPES = (type(None), bool, int, float, str)


def save_inversion(path: str | os.PathLike, inversion: Inversion, *, overwrite: bool = False) -> Path:
    """Write `inversion` to one safetensors file, atomically (a failure leaves no partial file)."""
    from safetensors.torch import save_file

    if not isinstance(inversion, Inversion):
        raise AnyV2VError(f"save_inversion takes an Inversion, got {type(inversion).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    description = _describe(inversion, "inversion", tensors)
    metadata = {"format": FORMAT, "inversion": json.dumps(description)}
    path = check_output_path(path, overwrite=overwrite)
    _write_atomically(path, lambda tmp_name: save_file(tensors, tmp_name, metadata=metadata))
    return path


def load_inversion(path: str | os.PathLike) -> Inversion:
    """The `Inversion` that `save_inversion` wrote to `path`, its tensors on the CPU."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (OSError, SafetensorError) as error:
        raise AnyV2VError(f"could not read the inversion file {path} ({error}); delete it to invert again") from None
    if metadata.get("format") != FORMAT:
        raise AnyV2VError(f"{path} is not an AnyV2V inversion file of format {FORMAT} "
                          f"(found {metadata.get('format')!r}); delete it to invert again")
    inversion = _rebuild(json.loads(metadata["inversion"]), tensors, str(path))
    if not isinstance(inversion, Inversion):
        raise AnyV2VError(f"{path} holds a {type(inversion).__name__}, not an Inversion; delete it to invert again")
    return inversion


def _describe(value, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """JSON description of `value`; its tensors go into `tensors` under names derived from `name`."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor:
            raise AnyV2VError(f"cannot store {name}: a {type(value).__name__} would load back as a plain tensor")
        tensors[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        return {"tensor": name}
    if isinstance(value, PLAIN_TYPES):
        return {"value": value}
    if isinstance(value, (tuple, list)):
        items = [_describe(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]
        return {type(value).__name__: items}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, PLAIN_TYPES) or key is None:
                raise AnyV2VError(f"cannot store {name}: its key {key!r} is a {type(key).__name__}, not an int, "
                                  "float, bool or str")
        return {"dict": [[key, _describe(item, f"{name}.{i}", tensors)] for i, (key, item) in enumerate(value.items())]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": _class_reference(type(value), name),
                "fields": {field.name: _describe(getattr(value, field.name), f"{name}.{field.name}", tensors)
                           for field in dataclasses.fields(value)}}
    raise AnyV2VError(f"cannot store {name}: a {type(value).__name__} is not a tensor, a dataclass of {PACKAGE}, a "
                      "dict, a list, a tuple or a plain JSON value, so it would not load back as it was")


def _class_reference(cls: type, name: str) -> str:
    """'module:Class' relative to this package, for a dataclass that `_rebuild` can construct again."""
    module = cls.__module__
    if not module.startswith(PACKAGE + ".") or "." in cls.__qualname__:
        raise AnyV2VError(f"cannot store {name}: its class {module}.{cls.__qualname__} is not a top-level class of "
                          f"{PACKAGE}, and an inversion file only rebuilds those")
    not_in_init = [field.name for field in dataclasses.fields(cls) if not field.init]
    if not_in_init:
        raise AnyV2VError(f"cannot store {name}: {cls.__qualname__}.{', '.join(not_in_init)} cannot be passed to "
                          "its constructor, so it would not load back as it was")
    return f"{module[len(PACKAGE) + 1:]}:{cls.__qualname__}"


def _rebuild(description: dict, tensors: dict[str, torch.Tensor], path: str):
    kind = next(iter(description))
    content = description[kind]
    if kind == "tensor":
        if content not in tensors:
            raise AnyV2VError(f"{path} is missing the tensor {content}; delete it to invert again")
        return tensors[content]
    if kind == "value":
        return content
    if kind in ("tuple", "list"):
        items = [_rebuild(item, tensors, path) for item in content]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {key: _rebuild(item, tensors, path) for key, item in content}
    if kind == "dataclass":
        module, _, class_name = content.partition(":")
        cls = getattr(importlib.import_module(f"{PACKAGE}.{module}"), class_name, None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise AnyV2VError(f"{path} names {content}, which is not a dataclass of {PACKAGE}; delete it to invert again")
        fields = {field: _rebuild(item, tensors, path) for field, item in description["fields"].items()}
        return cls(**fields)
    raise AnyV2VError(f"{path} holds an entry of unknown kind {kind!r}; delete it to invert again")
