"""The Stable Diffusion 1.5 denoiser: a UNet that predicts the noise ε in a latent.

The network is an hourglass of ResNet blocks. At the finer levels each ResNet is followed by a small
transformer whose cross-attention reads the text context; skip connections carry every down-path output
to the matching up-path block. Module attribute names mirror the diffusers key names
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`` ...), so a diffusers checkpoint
loads without renaming. The building blocks that the VAE needs too (ResNet block, attention, downsampling)
live here and ``model/vae.py`` imports them; the upsampling block lives in ``model/upsample.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.packed_conv import Conv2d
from model.upsample import Upsample


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the UNet. ``sd15`` is Stable Diffusion 1.5; smaller configs reuse the very same classes."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one entry per resolution level
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # per down level; the up path mirrors it
    layers_per_block: int = 2            # ResNets per down block; up blocks have one more
    transformer_layers: int = 1          # transformer blocks inside each attention
    num_heads: int = 8                   # SD-1.5 always uses 8 heads, head dim = channels / 8
    cross_attention_dim: int = 768       # width of the text context
    in_channels: int = 4
    out_channels: int = 4
    norm_groups: int = 32
    dropout: float = 0.0
    sample_size: int = 64                # latent side length it was trained at (informational)

    def __post_init__(self):
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError("cross_attention needs one flag per entry of block_out_channels")
        for channels in self.block_out_channels:
            if channels % self.norm_groups or channels % self.num_heads:
                raise ValueError(f"channels {channels} must be divisible by norm_groups ({self.norm_groups}) "
                                 f"and num_heads ({self.num_heads})")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


CONFIGS = {
    "sd15": UNetConfig(),
    # For tests: two levels, one ResNet each, a 32-wide context; it runs in milliseconds.
    "test": UNetConfig(block_out_channels=(32, 64), cross_attention=(True, False), layers_per_block=1,
                       cross_attention_dim=32, sample_size=8),
    # The shipped miniature: 16×16×4 latents of the 64×64 shapes world, the 64-wide text of CLIP
    # "mini". Its 4×4 level is where the UNet can tell the nine grid cells apart (it sees every border there).
    "mini": UNetConfig(block_out_channels=(32, 64, 64), cross_attention=(False, True, True), layers_per_block=1,
                       num_heads=2, cross_attention_dim=64, norm_groups=8, sample_size=16),
}


# ----------------------------------------------------------------------------------------------------------
# Building blocks shared with the VAE
# ----------------------------------------------------------------------------------------------------------

def in_place_ok(*tensors: torch.Tensor) -> bool:
    """True when an elementwise op may overwrite its first argument, a result its caller just computed: no
    autograd graph is recorded and the dtypes agree (under autocast a bf16 branch may meet an fp32 residual).
    In inference that saves an allocation and a memory pass per residual add and activation.
    """
    return not torch.is_grad_enabled() and all(t.dtype == tensors[0].dtype for t in tensors)


def add_(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` when :func:`in_place_ok`."""
    return fresh.add_(other) if in_place_ok(fresh, other) else fresh + other


def add_residual(branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + branch`` laid out as ``residual`` (the stream keeps one memory format); written into the
    fresh ``branch`` when that has the same layout. Float addition commutes, so both give the same bits."""
    return add_(branch, residual) if branch.stride() == residual.stride() else residual + branch


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when :func:`in_place_ok` (callers pass a fresh normalisation output)."""
    return F.silu(x, inplace=in_place_ok(x))


def maybe_checkpoint(enabled: bool, block: nn.Module, *args):
    """Run ``block(*args)``; with ``enabled`` and grad on, keep only its inputs and recompute it in backward."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class ResnetBlock2D(nn.Module):
    """GN → SiLU → conv3×3 (+ projected time embedding) → GN → SiLU → dropout → conv3×3, plus a skip.

    ``temb_channels=None`` gives the VAE's variant without a time embedding. The skip is a 1×1 conv when
    the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None = None,
                 groups: int = 32, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        if self.time_emb_proj is not None:  # temb is shared by every ResNet: never overwrite it
            h = add_(h, self.time_emb_proj(F.silu(temb))[:, :, None, None])  # [B, C] over H, W
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return add_residual(h, skip)


class UNetAttention(nn.Module):
    """Multi-head attention over token sequences, through ``scaled_dot_product_attention``.

    Self-attention when ``context`` is None, cross-attention otherwise. The UNet's projections q, k, v have
    no bias (``bias=False``); the VAE's have one. The output projection always has a bias. It sits in a
    one-element ModuleList so the key is ``to_out.0``, as in diffusers.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.to_out[0](out.transpose(1, 2).flatten(2))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, N, C] -> [B, heads, N, C/heads]


class Downsample(nn.Module):
    """Halve H and W with a strided conv3×3.

    The UNet pads 1 on every side. The VAE encoder pads only right and bottom, (0,1,0,1), then convolves
    without padding (as the original ldm code does); both give H/2 for even H, but the pixels seen differ.
    """

    def __init__(self, channels: int, asymmetric_padding: bool = False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


# ----------------------------------------------------------------------------------------------------------
# The text-conditioned transformer
# ----------------------------------------------------------------------------------------------------------

class GEGLU(nn.Module):
    """Linear C→8C, split into (x, gate), return x·gelu(gate) with the exact erf GELU."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        gate = F.gelu(gate)
        return gate.mul_(x) if in_place_ok(gate, x) else x * gate


class FeedForward(nn.Module):
    """GEGLU then Linear 4C→C. Keys ``net.0.proj`` and ``net.2``; ``net.1`` is diffusers' dropout slot.

    Without autograd it runs ``ROWS_PER_PIECE`` tokens at a time (each token's output depends on it alone):
    the GEGLU's 8C-wide intermediate of a 64×64 map at batch 2 is 84 MB in fp32, past the 32 MB above which
    glibc hands freed memory back to the kernel, so every forward would page-fault it in afresh; a piece of
    2,048 tokens is reused from the heap. With autograd, pieces would only add graph nodes.
    """

    ROWS_PER_PIECE = 2048

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)
        if torch.is_grad_enabled() or rows.shape[0] <= self.ROWS_PER_PIECE:
            return self.net(x)
        return torch.cat([self.net(piece) for piece in rows.split(self.ROWS_PER_PIECE)]).view_as(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: x += attn1(LN x); x += attn2(LN x, context); x += ff(LN x)."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = UNetAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = UNetAttention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = add_residual(self.attn1(self.norm1(x)), x)
        x = add_residual(self.attn2(self.norm2(x), context), x)
        return add_residual(self.ff(self.norm3(x)), x)


class Transformer2DModel(nn.Module):
    """Run transformer blocks over the H·W positions of a feature map, as a residual branch.

    GroupNorm (eps 1e-6, unlike the ResNets' 1e-5) → 1×1 conv proj_in → tokens → blocks → 1×1 conv proj_out.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, layers: int = 1, groups: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, dropout) for _ in range(layers))
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # [B, C, H, W] -> [B, HW, C]
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # back to [B, C, H, W]
        return add_residual(self.proj_out(h), x)


# ----------------------------------------------------------------------------------------------------------
# The three kinds of UNet block
# ----------------------------------------------------------------------------------------------------------

class UNetDownBlock(nn.Module):
    """ResNets (each followed by a transformer if ``cross_attention``), then an optional downsample.

    Returns the output and every intermediate state, which the up path consumes as skip connections.
    """

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int, cross_attention: bool,
                 downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, cfg.time_embed_dim,
                          cfg.norm_groups, dropout=cfg.dropout)
            for i in range(cfg.layers_per_block))
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, cfg.num_heads, cfg.cross_attention_dim, cfg.transformer_layers,
                               cfg.norm_groups, cfg.dropout)
            for _ in range(cfg.layers_per_block if cross_attention else 0))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[i](h, context)
            skips.append(h)
        for downsampler in self.downsamplers:
            h = downsampler(h)
            skips.append(h)
        return h, skips


class UNetMidBlock(nn.Module):
    """ResNet → transformer → ResNet at the coarsest level."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        channels = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, cfg.time_embed_dim, cfg.norm_groups, dropout=cfg.dropout)
            for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(
            channels, cfg.num_heads, cfg.cross_attention_dim, cfg.transformer_layers, cfg.norm_groups,
            cfg.dropout)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UNetUpBlock(nn.Module):
    """ResNets fed with [h, skip] concatenated on channels (each optionally followed by a transformer),
    then an optional upsample.

    ``skip_channels`` lists the channels of the skips this block consumes, in the order it consumes them.
    """

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int, skip_channels: list[int],
                 cross_attention: bool, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((in_channels if i == 0 else out_channels) + skip, out_channels, cfg.time_embed_dim,
                          cfg.norm_groups, dropout=cfg.dropout)
            for i, skip in enumerate(skip_channels))
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, cfg.num_heads, cfg.cross_attention_dim, cfg.transformer_layers,
                               cfg.norm_groups, cfg.dropout)
            for _ in range(len(skip_channels) if cross_attention else 0))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, h, skips, temb, context, upsample_size=None):
        # ``skips`` is oldest-first; the up path consumes the newest first. Index, never pop: with gradient
        # checkpointing this forward runs twice on the same list.
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)
            if self.attentions:
                h = self.attentions[i](h, context)
        for upsampler in self.upsamplers:
            h = upsampler(h, upsample_size)
        return h


# ----------------------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim], ordered [cos, sin], freqs exp(−ln(max_period)·i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear on the sinusoid; keys ``linear_1`` and ``linear_2``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet2DConditionModel(nn.Module):
    """ε-prediction UNet: ``unet(latents [B,4,h,w], timesteps, context [B,L,768]) -> eps [B,4,h,w]``.

    L may be anything (77 for plain SD, 240 for LongAlign's segment encoding): cross-attention does not
    care how many context tokens there are. Set ``gradient_checkpointing = True`` (or call
    :meth:`enable_gradient_checkpointing`) to recompute each block in backward instead of storing its
    activations; the reward stage needs this. ``model.speed`` has its fast path: channels-last weights,
    and ``torch.compile(unet, fullgraph=True)``, which traces the whole forward as one graph.
    """

    def __init__(self, cfg: UNetConfig = CONFIGS["sd15"]):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        channels = cfg.block_out_channels
        levels = len(channels)

        self.time_embedding = TimestepEmbedding(channels[0], cfg.time_embed_dim)
        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1)

        self.down_blocks = nn.ModuleList(
            UNetDownBlock(cfg, channels[max(i - 1, 0)], channels[i], cfg.cross_attention[i],
                          downsample=i < levels - 1)
            for i in range(levels))
        self.mid_block = UNetMidBlock(cfg)

        # Channels of every skip in the order the down path produces them: conv_in, then per level its
        # ResNets and its downsample. The up path pops them from the end.
        skip_channels = [channels[0]]
        for i in range(levels):
            skip_channels += [channels[i]] * (cfg.layers_per_block + (i < levels - 1))
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            taken = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UNetUpBlock(cfg, channels[min(i + 1, levels - 1)], channels[i], taken,
                                          cfg.cross_attention[i], upsample=i > 0))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, channels[0], eps=1e-5)
        self.conv_out = Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def forward(self, latents: torch.Tensor, timesteps: int | float | torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        if context.ndim != 3 or context.shape[-1] != self.config.cross_attention_dim:
            raise ValueError(f"context must be [B, L, {self.config.cross_attention_dim}], "
                             f"got {tuple(context.shape)}")
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.to(latents.device).reshape(-1)
        else:  # full(), not as_tensor(): a compiled UNet then takes a new step's number as an input, no recompile
            timesteps = torch.full((1,), timesteps, device=latents.device)
        if timesteps.numel() not in (1, latents.shape[0]):
            raise ValueError(f"timesteps must be one value or one per latent ({latents.shape[0]}), "
                             f"got {timesteps.numel()}")
        timesteps = timesteps.expand(latents.shape[0])
        sinusoid = timestep_embedding(timesteps, self.config.block_out_channels[0])
        temb = self.time_embedding(sinusoid.to(self.conv_in.weight.dtype))

        h = self.conv_in(latents)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = maybe_checkpoint(self.gradient_checkpointing, block, h, temb, context)
            skips += block_skips
        h = maybe_checkpoint(self.gradient_checkpointing, self.mid_block, h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the size of the next skip, so odd latent sizes (e.g. 520 px / 8 = 65) line up.
            upsample_size = skips[-1].shape[-2:] if skips else None
            h = maybe_checkpoint(self.gradient_checkpointing, block, h, block_skips, temb, context,
                                 upsample_size)
        return self.conv_out(silu(self.conv_norm_out(h))).contiguous()
