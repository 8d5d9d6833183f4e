"""Rotary position embedding (RoPE) as the temporal attention of SEINE and ConsistI2V uses it.

The numbers are those of rotary-embedding-torch 0.3.5 with its defaults (`freqs_for="lang"`,
theta 10000, no xpos, no interpolation), which both models were trained with:

- `freqs[i] = 1 / theta ** (2i / dim)` for i < dim/2, stored as a non-trainable parameter named
  `freqs`, so it is a state-dict entry (`...rotary_emb.freqs`) and official checkpoints load strictly;
- the angle of position p (0, 1, ..., n-1) on feature pair i is `p * freqs[i]`, and each angle is
  used for two *adjacent* features (interleaved pairs: features 2i and 2i+1 form one complex number),
  not for the two halves of the vector as in GPT-NeoX-style RoPE;
- only the first `dim` features of each head are rotated; the rest pass through unchanged, so a
  `RotaryEmbedding(32)` may be applied to heads of any size >= 32.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplication by i of each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., dim/2, 2]
    first, second = pairs.unbind(-1)
    return torch.stack((-second, first), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Rotates the first `dim` features of queries or keys by their position along one axis.

    Usage: `rope = RotaryEmbedding(32)`; `q = rope.rotate(q, seq_dim=-2)` for q [..., n, head_dim]
    (heads already split off). Queries and keys must be rotated with the same positions; the
    attention logits then depend on relative positions only. The module may be shared by several
    attention layers: its only state is the constant `freqs` [dim/2].
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"the rotary dimension must be a positive even number (got {dim})")
        self.dim = dim
        exponents = torch.arange(0, dim, 2)[: dim // 2].float() / dim
        self.freqs = nn.Parameter(1.0 / (theta**exponents), requires_grad=False)

    def angles(self, seq_len: int, *, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
        """Float32 angles [seq_len, dim] of positions offset..offset+seq_len-1, each repeated for its pair."""
        freqs = self.freqs.detach().to(device=device, dtype=torch.float32)
        positions = torch.arange(seq_len, device=freqs.device, dtype=torch.float32) + offset
        return torch.outer(positions, freqs).repeat_interleave(2, dim=-1)

    def rotate(self, x: torch.Tensor, seq_dim: int = -2, *, offset: int = 0) -> torch.Tensor:
        """x rotated by position along `seq_dim`; features are the last dimension of x.

        Angles are computed in float32 and their cos/sin cast to x's dtype (the library does the same
        in float32; in half precision it computes the angles in half, which is less accurate).
        """
        if self.dim > x.shape[-1]:
            raise ValueError(f"cannot rotate {self.dim} features of vectors with only {x.shape[-1]}")
        seq_dim = seq_dim % x.ndim
        if seq_dim == x.ndim - 1:
            raise ValueError("seq_dim must not be the feature (last) dimension")
        angles = self.angles(x.shape[seq_dim], offset=offset, device=x.device)
        # [n, dim] -> [n, 1, ..., 1, dim] so that n lines up with seq_dim
        angles = angles.reshape(angles.shape[0], *([1] * (x.ndim - seq_dim - 2)), self.dim)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated, rest = x[..., : self.dim], x[..., self.dim :]
        rotated = rotated * cos + rotate_pairs(rotated) * sin
        return torch.cat((rotated, rest), dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def cast_keeping_rotary_float32(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and buffers of `module` to `dtype`, tensor by tensor,
    except the rotary frequencies, which stay float32 whatever the weight dtype: in half precision
    `freqs` loses about 1e-3 of its value, and position * freqs then misses by tens of milliradians."""
    rotary = {id(m.freqs) for m in module.modules() if isinstance(m, RotaryEmbedding)}
    cast: dict[int, torch.Tensor] = {}  # a tensor shared by several modules is cast once
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(owner, kind)
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point() or id(tensor) in rotary:
                    continue
                if id(tensor) not in cast:
                    converted = tensor.detach().to(dtype)
                    cast[id(tensor)] = nn.Parameter(converted, requires_grad=False) if kind == "_parameters" else converted
                table[name] = cast[id(tensor)]
    return module
