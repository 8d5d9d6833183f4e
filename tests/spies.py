"""Spies for behaviour tests: what a backbone's denoiser receives, and which of its modules had
their edit rows overwritten by the source row. They observe tensors only, never the engine's own
bookkeeping, so they stay valid however the loops are written."""

from __future__ import annotations

import torch


class DenoiserCalls:
    """Records every call of `denoiser` while installed: positional and keyword inputs, and the output.

    Every backbone calls its denoiser as `denoiser(sample [B, C', F, h, w], timestep, ...)`."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser
        self.args: list[tuple] = []
        self.kwargs: list[dict] = []
        self.outputs: list = []

    def __enter__(self) -> "DenoiserCalls":
        self.handles = [
            self.denoiser.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
            self.denoiser.register_forward_hook(lambda module, args, output: self.outputs.append(output)),
        ]
        return self

    def __exit__(self, *error) -> None:
        for handle in self.handles:
            handle.remove()

    def _record_inputs(self, module, args, kwargs) -> None:
        self.args.append(tuple(args))
        self.kwargs.append(dict(kwargs))

    @property
    def samples(self) -> list[torch.Tensor]:
        return [args[0] for args in self.args]

    @property
    def timesteps(self) -> list[int]:
        return [int(args[1]) for args in self.args]


def injected_names(layers, *kinds: str) -> set[str]:
    """What injection of `kinds` ("conv", "spatial", "temporal", "attention") must overwrite at `layers`
    (an InjectionLayers): the convs' outputs, and Q and K (never V) of the self-attentions."""
    attentions = {"spatial": layers.spatial_attention, "temporal": layers.temporal_attention,
                  "attention": layers.attention}
    names = set(layers.conv) if "conv" in kinds else set()
    for kind in set(kinds) & set(attentions):
        names |= {f"{attention}.{projection}" for attention in attentions[kind] for projection in ("to_q", "to_k")}
    return names


def rows_equal(tensor: torch.Tensor, rows: int) -> bool:
    """Whether every row block of a batch-major tensor [rows * n, ...] equals block 0 (the source row)."""
    blocks = tensor.unflatten(0, (rows, -1))
    return all(torch.equal(block, blocks[0]) for block in blocks[1:])


class OverwrittenFeatures:
    """Per denoiser call: the names of the modules whose output rows all equal the source row
    (row 0) although their input rows differ, i.e. the features the source row overwrote.

    The recorder hooks every leaf module at the denoiser's first call, so its hooks run after any
    that the edit installed before that call and see what the rest of the network receives. Only
    calls with 3 rows (source, uncond, cond) are recorded; `rows` lists every call's row count."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser
        self.calls: list[set[str]] = []
        self.rows: list[int] = []
        self.handles: list = []

    def __enter__(self) -> "OverwrittenFeatures":
        self.handles.append(self.denoiser.register_forward_pre_hook(self._start_call))
        return self

    def __exit__(self, *error) -> None:
        for handle in self.handles:
            handle.remove()

    def _start_call(self, module, args) -> None:
        if len(self.handles) == 1:  # first call: the edit's own hooks are in place now
            for name, child in self.denoiser.named_modules():
                if name and not list(child.children()):
                    self.handles.append(child.register_forward_hook(self._observer(name)))
        self.rows.append(int(args[0].shape[0]))
        if self.rows[-1] == 3:
            self.calls.append(set())

    def _observer(self, name: str):
        def observe(module, inputs, output) -> None:
            rows = self.rows[-1]
            if rows != 3 or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            if not isinstance(output, torch.Tensor) or output.shape[0] % rows or inputs[0].shape[0] % rows:
                return
            if rows_equal(output, rows) and not rows_equal(inputs[0], rows):
                self.calls[-1].add(name)

        return observe
