"""ConsistI2V's video UNet (`VideoLDMUNet3DConditionModel`), written for this engine.

ConsistI2V (TIGER-Lab, arXiv 2402.04324) is Stable Diffusion 2.1-base with temporal layers
added VideoLDM-style. Its state dict uses the reference's plain module paths, so the official
`unet/diffusion_pytorch_model.safetensors` loads into this module by name. What makes it differ
from a plain video UNet:

- The clean first-frame latent is frame 0 on the *frame* axis: the UNet takes the F-1 noisy
  frames plus the first frame, runs on all F frames, and returns the F-1 generated ones.
- Every spatial self-attention also attends to frame 0 of its own video (keys/values are
  [frame f ; frame 0], 2*h*w tokens).
- Each resnet is followed by a temporal resnet (`conv3ds`, Conv3d with kernel (3, 1, 1)) and
  each spatial transformer by a temporal one (`tempo_attns`) whose self-attention is
  "augmented" with the 3x3 neighbourhood of the same location in frame 0 and uses rotary
  position embeddings over frames.
- A frame-stride embedding is added to the timestep embedding.

Layouts: latents are [B, C, F, h, w]; inside the UNet frames are folded batch-major into
[(B F), C, h, w], so row b*F + f is frame f of video b. Spatial attention tokens are
[(B F), h*w, C]; temporal attention tokens are [(B h w), F, C]. Both are batch-major, which is
what AnyV2V's feature injection relies on (see `anyv2v_core/injection.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from ..errors import ModelLoadError
from .rotary import RotaryEmbedding

# Options of the reference class that change the network; the released checkpoint uses these
# values and the port implements only them.
_REQUIRED_OPTIONS = {
    "first_frame_condition_mode": "concat",
    "temp_pos_embedding": "rotary",
    "augment_temporal_attention": True,
    "use_temporal": True,
    "use_linear_projection": True,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": 1,
    "resnet_time_scale_shift": "default",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "center_input_sample": False,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "upcast_attention": False,
    "act_fn": "silu",
}
# Options that add modules when set (class embeddings, extra projections...); must be absent/null.
_UNSUPPORTED_WHEN_SET = (
    "class_embed_type",
    "num_class_embeds",
    "addition_embed_type",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "time_cond_proj_dim",
    "time_embedding_act_fn",
    "timestep_post_act",
    "num_attention_heads",
)
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# The reference builds TemporalResnetBlock with its own defaults, not the UNet's norm settings.
_TEMPORAL_RESNET_GROUPS = 32
_TEMPORAL_RESNET_EPS = 1e-6
_TEMPORAL_RESNET_TEMB_CHANNELS = 512  # its (unused) time_emb_proj input width
_TRANSFORMER_GROUPNORM_EPS = 1e-6


@dataclass(frozen=True)
class ConsistI2VUNetConfig:
    """The subset of the reference `unet/config.json` that shapes the network.

    `attention_head_dim` is, as in diffusers' SD UNets, the number of spatial attention *heads*
    per level (5, 10, 20, 20 in the real model: 64 channels per head).
    `n_frames` is the frame count the model was trained on, first frame included (16). The
    reference hard-wires it into every frame reshape; this port takes the frame count from the
    input instead (identical for F = n_frames, and other lengths work).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    n_frames: int = 16
    n_temp_heads: int = 8
    use_frame_stride_condition: bool = True
    sample_size: int = 32

    @classmethod
    def from_dict(cls, config: Mapping) -> "ConsistI2VUNetConfig":
        """Validate a reference `config.json` and keep the fields this port uses."""
        problems = []
        for key, required in _REQUIRED_OPTIONS.items():
            if key in config and config[key] != required:
                problems.append(f"{key}={config[key]!r} (only {required!r} is implemented)")
        for key in _UNSUPPORTED_WHEN_SET:
            if config.get(key) is not None:
                problems.append(f"{key}={config[key]!r} (must be null)")
        if config.get("attention_type", "default") != "default":
            problems.append(f"attention_type={config['attention_type']!r} (only 'default' is implemented)")
        for key, types in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
            unknown = [t for t in config.get(key, ()) if t not in types]
            if unknown:
                problems.append(f"{key} contains {unknown} (known: {sorted(types)})")
        values = {}
        for field in fields(cls):
            if field.name not in config:
                continue
            value = config[field.name]
            if isinstance(value, list):
                value = tuple(value)
            values[field.name] = value
        if isinstance(values.get("attention_head_dim"), int):  # one head count for every level
            values["attention_head_dim"] = (values["attention_head_dim"],) * len(
                values.get("block_out_channels", cls.block_out_channels))
        for key in ("layers_per_block", "cross_attention_dim"):
            if isinstance(values.get(key), tuple):
                problems.append(f"{key}={config[key]!r} (only a single int is implemented)")
        if problems:
            raise ModelLoadError(
                "this ConsistI2V UNet config uses options the port does not implement: "
                + "; ".join(problems)
                + ". Use the official TIGER-Lab/ConsistI2V unet/config.json."
            )
        built = cls(**values)
        levels = len(built.block_out_channels)
        if not (len(built.down_block_types) == len(built.up_block_types) == len(built.attention_head_dim) == levels):
            raise ModelLoadError(
                "ConsistI2V UNet config: block_out_channels, down_block_types, up_block_types and "
                "attention_head_dim must all have one entry per resolution level"
            )
        return built


class TemporalResnetBlock(nn.Module):
    """Residual block over frames (`conv3ds.*`): GroupNorm-SiLU-Conv3d twice, mixed by `alpha`.

    output = alpha * x + (1 - alpha) * (x + h): alpha = 1 disables the temporal path.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_TEMPORAL_RESNET_GROUPS, channels, eps=_TEMPORAL_RESNET_EPS)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        # In the checkpoint, but the reference never passes a time embedding to this block.
        self.time_emb_proj = nn.Linear(_TEMPORAL_RESNET_TEMB_CHANNELS, channels)
        self.norm2 = nn.GroupNorm(_TEMPORAL_RESNET_GROUPS, channels, eps=_TEMPORAL_RESNET_EPS)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: [(B F), C, h, w] -> same shape."""
        h = F.silu(self.norm1(x))
        h = _over_frames(self.conv1, h, num_frames)
        h = F.silu(self.norm2(h))
        h = _over_frames(self.conv2, h, num_frames)
        # The reference clamps alpha to [0, 1] in place on every forward; clamping a copy gives
        # the same output without mutating the weights.
        alpha = self.alpha.clamp(0, 1)
        return alpha * x + (1 - alpha) * (x + h)


def _over_frames(conv: nn.Conv3d, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Apply a Conv3d to [(B F), C, h, w] as [B, C, F, h, w] and fold the frames back."""
    video = x.unflatten(0, (-1, num_frames)).transpose(1, 2)  # [B, C, F, h, w]
    return conv(video).transpose(1, 2).flatten(0, 1)


class Attention(nn.Module):
    """Multi-head attention with the reference's parameter names (to_q, to_k, to_v, to_out.0).

    Q and K each come from exactly one call of `to_q` / `to_k` on batch-major tokens, so forward
    hooks on those Linear modules see (and may replace) the whole Q or K of the batch.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention of q [N, Lq, C] over k, v [N, Lk, C]; returns [N, Lq, C]."""
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [N, heads, L, C/heads]
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class FirstFrameSelfAttention(Attention):
    """Spatial self-attention in which every frame also attends to frame 0 of its video."""

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: [(B F), h*w, C] (already norm1'ed) -> [(B F), h*w, C]."""
        first = x.unflatten(0, (-1, num_frames))[:, :1].expand(-1, num_frames, -1, -1).flatten(0, 1)
        context = torch.cat([x, first], dim=1)  # [(B F), 2*h*w, C]: own tokens, then frame 0's
        return self.attend(self.to_q(x), self.to_k(context), self.to_v(context))


class CrossAttention(Attention):
    """Spatial cross-attention to the text of each video."""

    def forward(self, x: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: [(B F), h*w, C]; text: [B, L, D] -> [(B F), h*w, C]."""
        return _attend_per_video(self, self.to_q(x), text)


class RelativePositionBias(nn.Module):
    """Present in the checkpoint (`rotary_bias.relative_attention_bias`); the reference never
    uses it (its call is commented out), so it only holds the weight."""

    def __init__(self, heads: int, num_buckets: int = 32):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)


class TemporalAttention(Attention):
    """Attention over frames with rotary position embeddings on the projected Q/K.

    The reference rotates the whole C-channel projection before the head split with
    RotaryEmbedding(dim=C/2): only channels [0, C/2) are rotated, the rest pass through.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__(query_dim, heads, context_dim)
        self.rotary_bias = RelativePositionBias(heads)
        self.rotary_emb = RotaryEmbedding(query_dim // 2)


class AugmentedTemporalSelfAttention(TemporalAttention):
    """Temporal self-attention whose keys/values also hold frame 0's 3x3 neighbourhood."""

    def forward(self, x: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
        """x: [(B F), h*w, C] (already norm1'ed) -> [(B F), h*w, C]."""
        tokens = _frames_last(x, num_frames)  # [(B h w), F, C]
        neighbours = _first_frame_neighbours(x, num_frames, height, width)  # [(B h w), 8, C]
        context = torch.cat([tokens, neighbours], dim=1)  # [(B h w), F + 8, C]
        # Injection hooks see to_q/to_k outputs before the rotation, where the reference's AnyV2V
        # hooks copy them; every row has the same positions, so copying after would be the same.
        q = self.rotary_emb.rotate(self.to_q(tokens))  # positions 0..F-1
        k = self.to_k(context)
        # Key positions are 0..F-1 for the frames and 0 for frame 0's neighbours; rotating by
        # position 0 is the identity, so the neighbour keys are left as they are.
        k = torch.cat([self.rotary_emb.rotate(k[:, :num_frames]), k[:, num_frames:]], dim=1)
        out = self.attend(q, k, self.to_v(context))
        return _frames_first(out, x.shape[1])


class TemporalCrossAttention(TemporalAttention):
    """Cross-attention of each location's frame sequence to its video's text.

    Only the queries are rotated (the reference rotates keys only when they are as many as the
    queries, which text tokens never are).
    """

    def forward(self, x: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: [(B F), h*w, C]; text: [B, L, D] -> [(B F), h*w, C]."""
        q = self.rotary_emb.rotate(self.to_q(_frames_last(x, num_frames)))  # [(B h w), F, C], positions 0..F-1
        return _frames_first(_attend_per_video(self, q, text), x.shape[1])


def _attend_per_video(attention: Attention, q: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cross-attention of queries q [(B n), L, C] (batch-major, n groups per video) to the text of
    their video, text [B, T, D]; returns [(B n), L, C].

    Each query attends to the same keys whatever group it is in, so all of a video's queries are
    attended in one sequence: K/V are projected once per video instead of once per group.
    """
    batch = text.shape[0]
    out = attention.attend(q.reshape(batch, -1, q.shape[-1]), attention.to_k(text), attention.to_v(text))
    return out.reshape(q.shape)


def _frames_last(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[(B F), h*w, C] -> [(B h w), F, C]."""
    return x.unflatten(0, (-1, num_frames)).transpose(1, 2).flatten(0, 1)


def _frames_first(x: torch.Tensor, locations: int) -> torch.Tensor:
    """[(B h w), F, C] -> [(B F), h*w, C] (inverse of `_frames_last`; locations = h*w)."""
    return x.unflatten(0, (-1, locations)).transpose(1, 2).flatten(0, 1)


def _first_frame_neighbours(x: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """For every location of every video, the 8 neighbours of that location in frame 0.

    x: [(B F), h*w, C] -> [(B h w), 8, C]. Frame 0 is padded by replicating its border; the
    neighbours are in row-major (dy, dx) order with the centre left out.
    """
    first = x.unflatten(0, (-1, num_frames))[:, 0]  # [B, h*w, C]
    first = first.transpose(1, 2).unflatten(2, (height, width))  # [B, C, h, w]
    padded = F.pad(first, (1, 1, 1, 1), mode="replicate")
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2)  # [B, C, h, w, 9]
    keep = [i for i in range(9) if i != 4]  # drop the centre (dy, dx) = (0, 0)
    neighbours = windows[..., keep]  # [B, C, h, w, 8]
    return neighbours.permute(0, 2, 3, 4, 1).flatten(0, 2)  # [(B h w), 8, C]


class SpatialTransformerBlock(nn.Module):
    """Pre-norm block: first-frame self-attention, text cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = FirstFrameSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x: torch.Tensor, text: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), num_frames)
        x = x + self.attn2(self.norm2(x), text, num_frames)
        return x + self.ff(self.norm3(x))


class TemporalTransformerBlock(nn.Module):
    """Pre-norm block: augmented temporal self-attention, temporal text cross-attention, GEGLU."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = AugmentedTemporalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = TemporalCrossAttention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x: torch.Tensor, text: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), num_frames, height, width)
        x = x + self.attn2(self.norm2(x), text, num_frames)
        return x + self.ff(self.norm3(x))


class VideoTransformer(nn.Module):
    """GroupNorm -> Linear proj_in -> one transformer block -> Linear proj_out, plus the input.

    `temporal` selects the block kind (`tempo_attns.*` vs `attentions.*`); the temporal one
    also mixes its output with its input by a learned `alpha` (alpha = 1 disables it).
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, *, temporal: bool):
        super().__init__()
        if temporal:
            self.alpha = nn.Parameter(torch.ones(1))
        self.temporal = temporal
        self.norm = nn.GroupNorm(groups, channels, eps=_TRANSFORMER_GROUPNORM_EPS)
        self.proj_in = nn.Linear(channels, channels)
        block = TemporalTransformerBlock if temporal else SpatialTransformerBlock
        self.transformer_blocks = nn.ModuleList([block(channels, heads, context_dim)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: [(B F), C, h, w]; text: [B, L, D] -> [(B F), C, h, w]."""
        height, width = x.shape[-2:]
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [(B F), h*w, C]
        for block in self.transformer_blocks:
            tokens = block(tokens, text, num_frames, height, width)
        out = self.proj_out(tokens).transpose(1, 2).unflatten(2, (height, width)) + x
        if not self.temporal:
            return out
        alpha = self.alpha.clamp(0, 1)  # clamped in place by the reference; same output
        return alpha * x + (1 - alpha) * out


def _resnet(in_channels: int, out_channels: int, temb_channels: int, config: ConsistI2VUNetConfig,
            output_scale_factor: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        eps=config.norm_eps,
        groups=config.norm_num_groups,
        non_linearity="silu",
        output_scale_factor=output_scale_factor,
    )


class VideoLayers(nn.Module):
    """The per-layer sequence shared by all down and up blocks: for each layer i,
    resnets[i] (per frame) -> conv3ds[i] (over frames) -> attentions[i] (spatial, first-frame
    conditioned) -> tempo_attns[i] (temporal); the two attentions only in cross-attention blocks."""

    def __init__(self, resnet_in: list[int], channels: int, temb_channels: int, heads: int,
                 has_attention: bool, config: ConsistI2VUNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(c, channels, temb_channels, config) for c in resnet_in)
        self.conv3ds = nn.ModuleList(TemporalResnetBlock(channels) for _ in resnet_in)
        self.has_attention = has_attention
        if has_attention:
            groups, context = config.norm_num_groups, config.cross_attention_dim
            self.attentions = nn.ModuleList(
                VideoTransformer(channels, heads, context, groups, temporal=False) for _ in resnet_in
            )
            self.tempo_attns = nn.ModuleList(
                VideoTransformer(channels, config.n_temp_heads, context, groups, temporal=True) for _ in resnet_in
            )

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.conv3ds[i](self.resnets[i](x, temb), num_frames)
        if self.has_attention:
            x = self.attentions[i](x, text, num_frames)
            x = self.tempo_attns[i](x, text, num_frames)
        return x


class VideoDownBlock(VideoLayers):
    def __init__(self, in_channels: int, channels: int, temb_channels: int, heads: int, has_attention: bool,
                 add_downsample: bool, config: ConsistI2VUNetConfig):
        resnet_in = [in_channels] + [channels] * (config.layers_per_block - 1)
        super().__init__(resnet_in, channels, temb_channels, heads, has_attention, config)
        if add_downsample:
            self.downsamplers = nn.ModuleList(
                [Downsample2D(channels, use_conv=True, out_channels=channels, padding=config.downsample_padding, name="op")]
            )
        else:
            self.downsamplers = None

    def forward(self, x, temb, text, num_frames) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the block output and the skip connections it adds (one per layer, plus the
        downsampled output)."""
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, text, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class VideoUpBlock(VideoLayers):
    def __init__(self, prev_channels: int, channels: int, skip_channels: list[int], temb_channels: int, heads: int,
                 has_attention: bool, add_upsample: bool, config: ConsistI2VUNetConfig):
        resnet_in = [(prev_channels if i == 0 else channels) + skip for i, skip in enumerate(skip_channels)]
        super().__init__(resnet_in, channels, temb_channels, heads, has_attention, config)
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(channels, use_conv=True, out_channels=channels)])
        else:
            self.upsamplers = None

    def forward(self, x, skips: list[torch.Tensor], temb, text, num_frames, upsample_size=None) -> torch.Tensor:
        """`skips` are consumed from the end (the most recent encoder features first)."""
        for i in range(len(self.resnets)):
            x = torch.cat([x, skips.pop()], dim=1)
            x = self.layer(i, x, temb, text, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class VideoMidBlock(nn.Module):
    """resnets[0] -> conv3ds[0] -> attentions[0] (spatial) -> resnets[1] -> conv3ds[1].
    The reference's mid block has no temporal attention."""

    def __init__(self, channels: int, temb_channels: int, heads: int, config: ConsistI2VUNetConfig):
        super().__init__()
        scale = config.mid_block_scale_factor
        self.resnets = nn.ModuleList(_resnet(channels, channels, temb_channels, config, scale) for _ in range(2))
        self.conv3ds = nn.ModuleList(TemporalResnetBlock(channels) for _ in range(2))
        self.attentions = nn.ModuleList(
            [VideoTransformer(channels, heads, config.cross_attention_dim, config.norm_num_groups, temporal=False)]
        )

    def forward(self, x, temb, text, num_frames) -> torch.Tensor:
        x = self.conv3ds[0](self.resnets[0](x, temb), num_frames)
        x = self.attentions[0](x, text, num_frames)
        return self.conv3ds[1](self.resnets[1](x, temb), num_frames)


class ConsistI2VUNet(nn.Module):
    """ConsistI2V's `VideoLDMUNet3DConditionModel` with the reference's state-dict keys.

    Call: `unet(sample [B, 4, F-1, h, w], timestep, encoder_hidden_states [B, L, D],
    first_frame_latents [B, 4, 1, h, w], frame_stride)` -> predicted noise [B, 4, F-1, h, w]
    for the generated frames (the first frame is conditioning only).
    """

    def __init__(self, config: ConsistI2VUNetConfig):
        super().__init__()
        self.config = config
        channels = list(config.block_out_channels)
        levels = len(channels)
        temb_channels = channels[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], config.conv_in_kernel,
                                 padding=(config.conv_in_kernel - 1) // 2)
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels, act_fn="silu")
        if config.use_frame_stride_condition:
            # The frame stride (frames skipped between sampled frames) is embedded like a timestep.
            self.frame_stride_embedding = TimestepEmbedding(channels[0], temb_channels, act_fn="silu")

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(VideoDownBlock(
                channels[max(i - 1, 0)], channels[i], temb_channels, config.attention_head_dim[i],
                _DOWN_TYPES[block_type], add_downsample=i < levels - 1, config=config,
            ))
        self.mid_block = VideoMidBlock(channels[-1], temb_channels, config.attention_head_dim[-1], config)

        # Skip channels in the order the up blocks consume them (last encoder feature first).
        skip_channels = [channels[0]]
        for i in range(levels):
            skip_channels += [channels[i]] * config.layers_per_block + ([channels[i]] if i < levels - 1 else [])
        rev_channels, rev_heads = channels[::-1], list(config.attention_head_dim)[::-1]
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            block_skips = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            self.up_blocks.append(VideoUpBlock(
                rev_channels[max(i - 1, 0)], rev_channels[i], block_skips, temb_channels, rev_heads[i],
                _UP_TYPES[block_type], add_upsample=i < levels - 1, config=config,
            ))

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, config.conv_out_kernel,
                                  padding=(config.conv_out_kernel - 1) // 2)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        first_frame_latents: torch.Tensor,
        frame_stride: int | torch.Tensor = 3,
    ) -> torch.Tensor:
        video = torch.cat([first_frame_latents.to(sample.dtype), sample], dim=2)  # [B, C, F, h, w]
        batch, _, num_frames = video.shape[:3]
        x = video.transpose(1, 2).flatten(0, 1)  # [(B F), C, h, w]
        text = encoder_hidden_states.to(x.dtype)

        # One timestep for every frame, the clean first frame included (as in the reference).
        emb = self.time_embedding(self._embed_scalar(timestep, x))
        if self.config.use_frame_stride_condition:
            emb = emb + self.frame_stride_embedding(self._embed_scalar(frame_stride, x))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, text, num_frames)
            skips += block_skips
        x = self.mid_block(x, emb, text, num_frames)

        # Sizes that do not halve evenly need the encoder's size passed to the upsamplers.
        needs_size = any(s % 2 ** (len(self.up_blocks) - 1) for s in video.shape[-2:])
        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            upsample_size = skips[-1].shape[2:] if needs_size and skips else None
            x = block(x, block_skips, emb, text, num_frames, upsample_size)

        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x.unflatten(0, (batch, num_frames)).transpose(1, 2)[:, :, 1:]  # drop frame 0

    def _embed_scalar(self, value: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Sinusoidal projection of one scalar (timestep or frame stride) for all [(B F)] rows."""
        value = torch.as_tensor(value, device=x.device)
        if value.numel() != 1:
            raise ValueError(f"expected one timestep / frame stride for the whole batch, got shape {tuple(value.shape)}")
        rows = value.reshape(1).to(torch.int64 if not value.is_floating_point() else torch.float32).expand(x.shape[0])
        return self.time_proj(rows).to(x.dtype)
