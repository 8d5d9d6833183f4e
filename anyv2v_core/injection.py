"""AnyV2V's feature injection: the source branch's features overwrite the edit branches'.

At every sampling step the UNet runs on a batch whose first row is the *source* branch (the
inverted source latent with the source conditioning) and whose other rows are the edit
branches. While a kind of injection is active, its features in the edit rows are replaced by
the source row's:

- conv: the residual branch of one decoder resnet, taken at the output of its `conv2`
  (before the skip connection is added);
- spatial: Q and K (never V) of the spatial self-attention in the decoder's transformer blocks;
- temporal: Q and K of the temporal self-attention at the same places;
- attention: Q and K of the joint space-time self-attention of a video diffusion transformer
  (Wan), whose one attention does the work of the UNets' spatial and temporal ones.

Each kind k is active on the first int(num_steps * tau_k) steps of the full sampling schedule,
counted before the start-index slice (as the reference does); a second-order step keeps its
kinds for both of its model evaluations.

Every kind is implemented the same way: a forward hook on the module that produces the tensor
(the conv, `to_q`, `to_k`). Every layout involved is batch-major ([B*F, ...] spatially,
[B*h*w, ...] temporally, [B, tokens, ...] in a transformer, [B, ...] for convs), so the batch
splits into equal row blocks and block 0 is the source.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .backbones.base import InjectionLayers
from .errors import AnyV2VError

KINDS = ("conv", "spatial", "temporal", "attention")


@dataclass(frozen=True)
class InjectionSettings:
    """When each kind of feature is injected, as a fraction of the sampling steps, and where."""

    conv_tau: float = 0.2
    spatial_tau: float = 0.2
    temporal_tau: float = 0.5
    attention_tau: float = 0.5  # joint space-time self-attention (Wan); UNet backbones have none
    layers: InjectionLayers | None = None  # None: the backbone's default layers

    def __post_init__(self) -> None:
        for kind in KINDS:
            tau = getattr(self, f"{kind}_tau")
            if not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
                raise AnyV2VError(f"{kind}_tau must be a fraction of the steps in [0, 1], got {tau!r}")

    def tau(self, kind: str) -> float:
        return float(getattr(self, f"{kind}_tau"))


@dataclass(frozen=True)
class InjectionPlan:
    """Which kinds are active at which sampling step, and at which modules."""

    layers: InjectionLayers
    active_steps: dict[str, int] = field(default_factory=dict)  # kind -> steps 0..n-1 it is active on

    @classmethod
    def build(cls, num_steps: int, settings: InjectionSettings, default_layers: InjectionLayers) -> "InjectionPlan":
        """Plan for a full sampling schedule of `num_steps` steps (before any start-index slice)."""
        windows = {kind: int(num_steps * settings.tau(kind)) for kind in KINDS}
        return cls(layers=settings.layers or default_layers, active_steps=windows)

    def active_kinds(self, step_index: int) -> tuple[str, ...]:
        """The kinds injected at step `step_index` (0: the noisiest step) whose layers exist."""
        return tuple(kind for kind in KINDS if step_index < self.active_steps.get(kind, 0) and self.modules_of(kind))

    def modules_of(self, kind: str) -> tuple[str, ...]:
        return {"conv": self.layers.conv, "spatial": self.layers.spatial_attention,
                "temporal": self.layers.temporal_attention, "attention": self.layers.attention}[kind]


class FeatureInjector:
    """Hook state: which kinds fire on the next UNet call, and how many row blocks the batch has."""

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.num_rows = 1
        self.events: Counter[str] = Counter()  # hook firings per kind, for tests and logs
        # rows one at a time (`rows_in_sequence`): the row now running, and the source row's
        # injected tensors of the current block, kept until the edit rows of that block take them
        self.row: int | None = None
        self.source_outputs: dict[torch.nn.Module, torch.Tensor] = {}

    def set_step(self, active_kinds: tuple[str, ...], num_rows: int) -> None:
        """Call before each UNet call: row 0 of a `num_rows`-row batch is the source branch."""
        self.active = active_kinds if num_rows > 1 else ()
        self.num_rows = num_rows

    def hook_for(self, kind: str):
        def copy_source_rows(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
            if kind not in self.active:
                return None
            if self.row is not None:
                if self.row == 0:
                    self.source_outputs[module] = output
                    return None
                self.events[kind] += 1
                return self.source_outputs[module]
            if output.shape[0] % self.num_rows:
                raise RuntimeError(f"{kind} injection: batch {output.shape[0]} does not split into {self.num_rows} rows")
            self.events[kind] += 1
            blocks = output.unflatten(0, (self.num_rows, -1))  # [rows, per-row batch, ...]
            return blocks[:1].expand_as(blocks).reshape(output.shape)

        copy_source_rows.is_anyv2v_injection = True
        return copy_source_rows


def hook_target_names(plan: InjectionPlan) -> list[tuple[str, str]]:
    """(kind, module name) of every module to hook: the convs, and the Q / K projections of the attentions."""
    names = []
    for kind in KINDS:
        for name in plan.modules_of(kind):
            names += [(kind, name)] if kind == "conv" else [(kind, f"{name}.{part}") for part in plan.layers.query_key]
    return names


def missing_layers(unet: torch.nn.Module, layers: InjectionLayers) -> list[str]:
    """The modules injection would hook at `layers` that `unet` does not have."""
    modules = dict(unet.named_modules())
    return [name for _, name in hook_target_names(InjectionPlan(layers=layers)) if name not in modules]


def resolve_hook_targets(unet: torch.nn.Module, plan: InjectionPlan) -> list[tuple[str, torch.nn.Module]]:
    """(kind, module) pairs to hook; a clear error names any layer the model does not have."""
    modules = dict(unet.named_modules())
    names = hook_target_names(plan)
    targets = [(kind, modules[name]) for kind, name in names if name in modules]
    missing = [name for _, name in names if name not in modules]
    if missing:
        raise AnyV2VError(
            f"the model has no layer(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} targeted by "
            "feature injection; this UNet has another structure: pass injection layers that exist in it"
        )
    return targets


def check_injection_layers(unet: torch.nn.Module, layers: InjectionLayers) -> None:
    """Fail before any heavy work when `unet` lacks a layer that injection targets (the error names them)."""
    resolve_hook_targets(unet, InjectionPlan(layers=layers))


@contextmanager
def injected(unet: torch.nn.Module, plan: InjectionPlan) -> Iterator[FeatureInjector]:
    """Install the injection hooks on `unet` for the duration of the block, and always remove them."""
    injector = FeatureInjector()
    handles = []
    try:
        for kind, module in resolve_hook_targets(unet, plan):
            handles.append(module.register_forward_hook(injector.hook_for(kind)))
        yield injector
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def rows_in_sequence(blocks: list[torch.nn.Module], injector: FeatureInjector) -> Iterator[None]:
    """Run each of `blocks` on one row of the batch at a time, the source row first, for the block.

    The activations of a block then exist for one row, not three, and the source row's injected
    Q/K wait in the injector only until the edit rows of the same block have taken them. Every
    tensor argument whose first axis is the batch is split by row (hidden states, the timestep
    modulation, the text context); the others (rotary frequencies) are shared. The blocks' own
    `forward` is restored when the block ends, also on an error or a cancel.
    """
    def one_row_at_a_time(forward):
        def run(*args, **kwargs):
            rows = injector.num_rows
            if rows == 1:
                return forward(*args, **kwargs)

            def row_of(value, row):
                return value[row:row + 1] if isinstance(value, torch.Tensor) and value.shape[:1] == (rows,) else value

            outputs = []
            try:
                for row in range(rows):
                    injector.row = row
                    outputs.append(forward(*(row_of(a, row) for a in args),
                                           **{key: row_of(value, row) for key, value in kwargs.items()}))
            finally:
                injector.row = None
                injector.source_outputs.clear()
            return torch.cat(outputs)

        return run

    try:
        for block in blocks:
            block.forward = one_row_at_a_time(block.forward)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def has_injection_hooks(unet: torch.nn.Module) -> bool:
    """True if any module of `unet` still carries an injection hook (a leaked patch)."""
    return any(getattr(hook, "is_anyv2v_injection", False)
               for module in unet.modules() for hook in module._forward_hooks.values())
