"""SEINE's 3D UNet (the `UNet3DConditionModel` of the LaVie / SEINE lineage), written for current torch.

It is Stable Diffusion 1.x's UNet inflated to video: every 2D convolution runs frame by frame, each
transformer block gains a temporal self-attention over the frames at each spatial position (with
rotary position embedding and a T5-style relative position bias), and `conv_in` takes 9 channels:
`cat([noisy latent (4), mask (1), masked-video latent (4)])`. Module names and parameter shapes are
those of the official `seine.pt["ema"]` state dict, so it loads strictly.

Layouts: video tensors are [B, C, F, H, W]; inside a transformer block the spatial tokens are
[(B F), H*W, C] and the temporal tokens [(B H W), F, C]. B is always the outermost factor of the
first dimension, so the batch rows of a [source, cond, uncond] batch are contiguous thirds of dim 0
in every layout (the feature injection relies on that).

Numerics follow the reference: the resnets' GroupNorm normalises over all frames of a video
together (it sees [B, C, F, H, W]); the transformers' GroupNorm is per frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..errors import ModelLoadError
from .base import InjectionLayers
from .rotary import RotaryEmbedding

# Settings of the reference's config that this port implements only at these values.
_FIXED_SETTINGS = {
    "act_fn": "silu",
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "use_first_frame": False,
    "use_relative_position": False,
    "mid_block_type": "UNetMidBlock3DCrossAttn",
}


@dataclass(frozen=True)
class SeineUNetConfig:
    """The architecture settings; defaults are the official SEINE model (SD-1.4's UNet made 3D)."""

    in_channels: int = 9
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # Despite the name (kept from diffusers 0.11 configs), this is the number of heads per level.
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    rotary_dim: int = 32  # features of each temporal head that the rotary embedding rotates

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        heads = self.attention_head_dim
        return (heads,) * len(self.block_out_channels) if isinstance(heads, int) else tuple(heads)

    @classmethod
    def from_dict(cls, config: Mapping) -> "SeineUNetConfig":
        """From SEINE's UNet config, or from SD-1.x's 2D `unet/config.json`.

        A 2D config gets the edits of SEINE's `from_pretrained_2d(use_concat=True)`: 3D block types
        and 9 input channels. Unknown keys (`_class_name`, `sample_size`, ...) are ignored; settings
        this port does not implement are refused.
        """
        config = dict(config)
        for key, expected in _FIXED_SETTINGS.items():
            if key in config and config[key] != expected:
                raise ModelLoadError(
                    f"SEINE UNet config sets {key}={config[key]!r}; only {expected!r} is supported "
                    "(the official SEINE checkpoint uses it). Is this the right config?"
                )
        is_2d = config.get("_class_name") == "UNet2DConditionModel" or any(
            str(name).endswith("2D") for name in config.get("down_block_types", ())
        )
        if is_2d:
            config["in_channels"] = 9
            for key in ("down_block_types", "up_block_types"):
                if key in config:
                    config[key] = [str(name).replace("2D", "3D") for name in config[key]]
        names = {field.name for field in fields(cls)}
        kwargs = {key: value for key, value in config.items() if key in names}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if isinstance(kwargs.get("attention_head_dim"), Sequence):
            kwargs["attention_head_dim"] = tuple(kwargs["attention_head_dim"])
        result = cls(**kwargs)
        result.validate()
        return result

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        allowed_down, allowed_up = {"CrossAttnDownBlock3D", "DownBlock3D"}, {"CrossAttnUpBlock3D", "UpBlock3D"}
        problems = []
        if len(self.down_block_types) != levels or not set(self.down_block_types) <= allowed_down:
            problems.append(f"down_block_types {self.down_block_types} (one of {sorted(allowed_down)} per level)")
        if len(self.up_block_types) != levels or not set(self.up_block_types) <= allowed_up:
            problems.append(f"up_block_types {self.up_block_types} (one of {sorted(allowed_up)} per level)")
        if len(self.heads_per_level) != levels:
            problems.append(f"attention_head_dim {self.attention_head_dim} (an int or one value per level)")
        for heads, channels in zip(self.heads_per_level, self.block_out_channels):
            if channels % heads or channels // heads < self.rotary_dim:
                problems.append(f"{heads} heads for {channels} channels (head size must divide and be >= {self.rotary_dim})")
        if problems:
            raise ModelLoadError("unsupported SEINE UNet config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Layout helpers


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [(B F), C, H, W]"""
    return x.transpose(1, 2).flatten(0, 1)


def batch_to_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[(B F), C, H, W] -> [B, C, F, H, W]"""
    return x.unflatten(0, (-1, num_frames)).transpose(1, 2)


class FrameConv2d(nn.Conv2d):
    """A 2D convolution applied to every frame of a [B, C, F, H, W] video (SEINE's `InflatedConv3d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(super().forward(frames_to_batch(x)), x.shape[2])


# ---------------------------------------------------------------------------------------------
# Resnet, down- and upsampling


class ResnetBlock3D(nn.Module):
    """GN, SiLU, conv3x3, + time embedding, GN, SiLU, dropout, conv3x3 (`conv2`: the residual
    branch that conv injection replaces), plus a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = FrameConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = FrameConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = FrameConv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x [B, C, F, H, W], temb [B, T]; the GroupNorms see all frames at once, as in the reference
        hidden = self.conv1(F.silu(self.norm1(x)))
        hidden = hidden + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        hidden = self.conv2(self.dropout(F.silu(self.norm2(hidden))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + hidden) / self.output_scale_factor


class Downsample3D(nn.Module):
    """Stride-2 conv3x3 on every frame (frames are never subsampled)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest x2 on H and W (or to `size`), then conv3x3 on every frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = size or (x.shape[3] * 2, x.shape[4] * 2)
        return self.conv(F.interpolate(x, size=(x.shape[2], *size), mode="nearest"))


# ---------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Multi-head attention with bias-free Q/K/V projections (diffusers 0.11's CrossAttention layout).

    Q and K are computed by the child Linear modules `to_q` / `to_k`, once per call, so forward hooks
    on them see (and may replace) the projections of every batch row before the heads are split.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(0.0)])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, heads*d] -> [N, heads, L, d]"""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias) v for [N, heads, L, d] inputs; returns [N, L, heads*d]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x [N, L, C]; context [N, L', C'] for cross-attention, else self-attention
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = self.attend(self.split_heads(q), self.split_heads(k), self.split_heads(v))
        return self.to_out[1](self.to_out[0](out))


class RelativePositionBias(nn.Module):
    """T5-style learned bias [heads, F, F] on the temporal attention logits.

    The offset j - i of key j from query i is bucketed by n = i - j: half of the buckets for n < 0
    (keys after the query), half for n >= 0; in each half the first `buckets/4` distances are exact
    and larger ones share logarithmically wider buckets up to `max_distance`.
    """

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def buckets(self, num_frames: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(num_frames, device=device)
        n = positions[:, None] - positions[None, :]  # [i, j] = i - j
        half = self.num_buckets // 2
        exact = half // 2
        bucket = (n < 0).long() * half
        n = n.abs()
        # float32 log, truncated towards zero, as the reference computes it
        log_ratio = torch.log(n.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
        return bucket + torch.where(n < exact, n, large)

    def forward(self, num_frames: int, device: torch.device) -> torch.Tensor:
        return self.relative_attention_bias(self.buckets(num_frames, device)).permute(2, 0, 1)


class TemporalAttention(Attention):
    """Self-attention over the frames of each spatial position: [(B H W), F, C] -> same.

    Q and K get the rotary embedding (on the first `rotary.dim` features of each head) after the
    projections, and the logits get the relative position bias; there is no mask.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, rotary: RotaryEmbedding):
        super().__init__(query_dim, heads, dim_head)
        self.time_rel_pos_bias = RelativePositionBias(heads)
        self.rotary_emb = rotary  # one object shared by all temporal attentions, as in the checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q = self.rotary_emb.rotate(self.split_heads(q), seq_dim=-2)
        k = self.rotary_emb.rotate(self.split_heads(k), seq_dim=-2)
        bias = self.time_rel_pos_bias(x.shape[1], x.device).to(q.dtype)  # [heads, F, F]
        out = self.attend(q, k, self.split_heads(v), bias)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Four pre-norm residual steps: spatial self-attention `attn1`, text cross-attention `attn2`,
    temporal self-attention `attn_temp`, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, rotary: RotaryEmbedding):
        super().__init__()
        dim_head = dim // heads
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn_temp = TemporalAttention(dim, heads, dim_head, rotary)
        self.norm_temp = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x [(B F), HW, C]; context [(B F), L, D]
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        tokens = x.shape[1]
        x = x.unflatten(0, (-1, num_frames)).transpose(1, 2).flatten(0, 1)  # [(B HW), F, C]
        x = self.attn_temp(self.norm_temp(x)) + x
        x = x.unflatten(0, (-1, tokens)).transpose(1, 2).flatten(0, 1)  # [(B F), HW, C]
        return self.ff(self.norm3(x)) + x


class Transformer3DModel(nn.Module):
    """GN (per frame) -> 1x1 proj_in -> one transformer block -> 1x1 proj_out, plus the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, rotary: RotaryEmbedding):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, rotary)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x [B, C, F, H, W]; context [B, L, D], shared by the frames of its video
        num_frames, height, width = x.shape[2:]
        residual = frames_to_batch(x)  # [(B F), C, H, W]
        hidden = self.proj_in(self.norm(residual))
        hidden = hidden.flatten(2).transpose(1, 2)  # [(B F), HW, C]
        context = context.repeat_interleave(num_frames, dim=0)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, num_frames)
        hidden = hidden.transpose(1, 2).unflatten(2, (height, width))
        return batch_to_frames(self.proj_out(hidden) + residual, num_frames)


# ---------------------------------------------------------------------------------------------
# UNet blocks


@dataclass(frozen=True)
class _BlockSettings:
    temb_channels: int
    groups: int
    eps: float
    context_dim: int
    rotary: RotaryEmbedding


class DownBlock3D(nn.Module):
    """`layers` resnets, each followed by a transformer when `heads` is given, then an optional downsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, heads: int | None, add_downsample: bool, padding: int, s: _BlockSettings):
        super().__init__()
        if heads is not None:  # registered before the resnets, as in the checkpoint's key order
            self.attentions = nn.ModuleList(
                [Transformer3DModel(out_channels, heads, s.context_dim, s.groups, s.rotary) for _ in range(layers)]
            )
        else:
            self.attentions = None
        self.resnets = nn.ModuleList(
            [ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, s.temb_channels, s.groups, s.eps) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels, padding)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock3D(nn.Module):
    """`layers` resnets over [x, skip] concatenations, each followed by a transformer when `heads`
    is given, then an optional upsampler."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, layers: int, heads: int | None, add_upsample: bool, s: _BlockSettings):
        super().__init__()
        if heads is not None:
            self.attentions = nn.ModuleList(
                [Transformer3DModel(out_channels, heads, s.context_dim, s.groups, s.rotary) for _ in range(layers)]
            )
        else:
            self.attentions = None
        resnets = []
        for i in range(layers):
            skip_channels = in_channels if i == layers - 1 else out_channels
            resnet_in = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock3D(resnet_in + skip_channels, out_channels, s.temb_channels, s.groups, s.eps))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: Sequence[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock3D(nn.Module):
    """resnet, transformer, resnet at the lowest resolution."""

    def __init__(self, channels: int, heads: int, output_scale_factor: float, s: _BlockSettings):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer3DModel(channels, heads, s.context_dim, s.groups, s.rotary)])
        self.resnets = nn.ModuleList(
            [ResnetBlock3D(channels, channels, s.temb_channels, s.groups, s.eps, output_scale_factor) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


# ---------------------------------------------------------------------------------------------
# The UNet


class SeineUNet3D(nn.Module):
    """SEINE's UNet: (x_t ‖ mask ‖ masked-video latent, t, text) -> predicted noise.

    forward(sample [B, 9, F, h, w], timestep (int, 0-d or [B] tensor), encoder_hidden_states [B, L, D])
    returns the noise prediction [B, out_channels, F, h, w] in the parameters' dtype.
    """

    def __init__(self, config: SeineUNetConfig | None = None):
        super().__init__()
        config = config or SeineUNetConfig()
        config.validate()
        self.config = config
        channels = config.block_out_channels
        heads = config.heads_per_level
        temb_channels = channels[0] * 4
        # Not registered on the UNet itself: the checkpoint has its `freqs` under each attn_temp only.
        rotary = RotaryEmbedding(config.rotary_dim)
        settings = _BlockSettings(temb_channels, config.norm_num_groups, config.norm_eps, config.cross_attention_dim, rotary)

        self.conv_in = FrameConv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)

        down_blocks = []
        for i, block_type in enumerate(config.down_block_types):
            down_blocks.append(
                DownBlock3D(
                    channels[max(i - 1, 0)],
                    channels[i],
                    config.layers_per_block,
                    heads[i] if block_type.startswith("CrossAttn") else None,
                    add_downsample=i < len(channels) - 1,
                    padding=config.downsample_padding,
                    s=settings,
                )
            )
        up_blocks = []
        reversed_channels, reversed_heads = channels[::-1], heads[::-1]
        for i, block_type in enumerate(config.up_block_types):
            up_blocks.append(
                UpBlock3D(
                    in_channels=reversed_channels[min(i + 1, len(channels) - 1)],
                    prev_channels=reversed_channels[max(i - 1, 0)],
                    out_channels=reversed_channels[i],
                    layers=config.layers_per_block + 1,
                    heads=reversed_heads[i] if block_type.startswith("CrossAttn") else None,
                    add_upsample=i < len(channels) - 1,
                    s=settings,
                )
            )
        # Registration order = the checkpoint's key order: down, up, then mid.
        self.down_blocks = nn.ModuleList(down_blocks)
        self.up_blocks = nn.ModuleList(up_blocks)
        self.mid_block = MidBlock3D(channels[-1], heads[-1], config.mid_block_scale_factor, settings)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = FrameConv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        batch, _, _, height, width = sample.shape
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))  # [B, 4 C0]

        # With H or W not divisible by 2^levels, each upsampler resizes to its skip's size.
        factor = 2 ** (len(self.up_blocks) - 1)
        exact_sizes = height % factor != 0 or width % factor != 0

        x = self.conv_in(sample)
        skips: list[torch.Tensor] = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            block_skips = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            size = tuple(skips[-1].shape[3:]) if exact_sizes and i < len(self.up_blocks) - 1 else None
            x = block(x, block_skips, temb, encoder_hidden_states, upsample_size=size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _decoder_transformer_blocks() -> tuple[str, ...]:
    """The 8 decoder transformer blocks AnyV2V injects into: all but the first of the lowest-resolution
    attention up block (`up_blocks.1.attentions.0`), as in the reference's pnp_utils."""
    places = [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    return tuple(f"up_blocks.{level}.attentions.{index}.transformer_blocks.0" for level, index in places)


DEFAULT_INJECTION_LAYERS = InjectionLayers(
    conv=("up_blocks.1.resnets.1.conv2",),
    spatial_attention=tuple(f"{block}.attn1" for block in _decoder_transformer_blocks()),
    temporal_attention=tuple(f"{block}.attn_temp" for block in _decoder_transformer_blocks()),
)
