"""Reading single-file checkpoints (safetensors, or torch pickles without running their code).

Some backbones ship their UNet as one file instead of a diffusers folder: SEINE's `seine.pt` is a
torch pickle whose `"ema"` entry is the state dict. Unpickling runs arbitrary code, so a pickle is
only read when the caller allows it, and then always with `torch.load(weights_only=True)`, which
restores tensors and plain containers but refuses any other Python object. `convert_checkpoint_to_safetensors`
turns such a file into safetensors once, so later loads need no pickle at all.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import AnyV2VError, ModelLoadError

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """True when the file starts like safetensors: an 8-byte little-endian header size, then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (header_size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_size < os.path.getsize(path)


def load_state_dict_file(
    path: str | os.PathLike, *, allow_pickle: bool = False, entry: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on the CPU, as {name: tensor}.

    safetensors files are read directly (`entry` does not apply: they hold one flat dict).
    Torch pickles (.pt/.pth/.ckpt/.bin) are read only when `allow_pickle` is True, and then with
    `weights_only=True`; `entry` selects one item of the pickled dict (e.g. "ema"). Anything that is
    not a flat {str: Tensor} mapping after that selection is refused with a ModelLoadError.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist or is not a file; check the path")
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ModelLoadError(f"{path} looks like safetensors but cannot be read ({error}); re-download or re-convert it") from error
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} is a torch pickle, and pickles are not loaded by default. Convert it once to safetensors "
            f"(python -m anyv2v_core convert {path} {path.with_suffix('.safetensors')}) and load that file, "
            "or allow pickles explicitly (it is then read with torch.load(weights_only=True), which refuses code)"
        )
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == _ZIP_MAGIC
    try:
        # mmap avoids holding the file twice in memory; only the zip format supports it
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        culprit = next((line for line in str(error).splitlines() if "Unsupported global" in line), "")
        culprit = culprit.split(" was not an allowed global")[0].strip()
        raise ModelLoadError(
            f"{path} was refused: it contains Python objects other than tensors and plain containers, "
            f"which are not loaded because unpickling them could run code{f' ({culprit})' if culprit else ''}. "
            "Export the model's state_dict with tensors only, or use a safetensors file"
        ) from error
    except Exception as error:
        raise ModelLoadError(f"{path} is neither safetensors nor a readable torch checkpoint ({error})") from error
    return _tensor_dict(loaded, path, entry)


def _tensor_dict(loaded: object, path: Path, entry: str | None) -> dict[str, torch.Tensor]:
    where = str(path)
    if entry is not None:
        if not isinstance(loaded, Mapping) or entry not in loaded:
            found = sorted(map(str, loaded.keys()))[:20] if isinstance(loaded, Mapping) else type(loaded).__name__
            raise ModelLoadError(f"{path} has no entry {entry!r} (top level: {found}); is this the right checkpoint?")
        loaded, where = loaded[entry], f"{path}[{entry!r}]"
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(f"{where} is a {type(loaded).__name__}, not a state dict of named tensors")
    bad = [str(key) for key, value in loaded.items() if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
    if bad:
        raise ModelLoadError(
            f"{where} was refused: {len(bad)} of its entries are not tensors (e.g. {bad[:5]}); "
            "a state dict must map names to tensors only"
            + ("" if entry else ". If the weights sit under one key (such as 'ema' or 'state_dict'), select that entry")
        )
    return dict(loaded)


def convert_checkpoint_to_safetensors(
    src: str | os.PathLike, dst: str | os.PathLike, *, entry: str | None = None, overwrite: bool = False
) -> Path:
    """Write the tensors of checkpoint `src` (a torch pickle, optionally its `entry`) to safetensors `dst`.

    The pickle is read with weights_only=True. The file is written to a temporary name in the same
    folder and renamed into place, so `dst` is either absent or complete. An existing `dst` is kept
    unless `overwrite` is True. Tensors that share memory (SEINE's 16 `rotary_emb.freqs` are one
    tensor) are written as separate copies, since safetensors stores no aliasing.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise AnyV2VError(f"{dst} already exists; choose another output path or pass overwrite=True (--overwrite) to replace it")
    if dst.resolve() == src.resolve():
        raise AnyV2VError(f"the output {dst} is the checkpoint being converted; choose another output path")
    if not dst.parent.is_dir():
        raise AnyV2VError(f"the output folder {dst.parent} does not exist; create it first")
    tensors = load_state_dict_file(src, allow_pickle=True, entry=entry)
    tensors = _unshared(tensors)
    from safetensors.torch import save_file

    metadata = {"format": "pt", "converted_from": src.name, "entry": json.dumps(entry)}
    handle = tempfile.NamedTemporaryFile(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial", delete=False)
    handle.close()
    try:
        save_file(tensors, handle.name, metadata=metadata)
        os.replace(handle.name, dst)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return dst


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, copying every one whose storage an earlier tensor already uses."""
    seen: set[tuple[torch.device, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        else:
            seen.add(storage)
        out[name] = tensor
    return out
