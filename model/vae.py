"""The Stable Diffusion 1.5 autoencoder (AutoencoderKL): pixels [-1, 1] ⇄ 4-channel latents at 1/8 size.

The encoder gives a diagonal Gaussian (mean, logvar) per latent pixel; diffusion runs on
``scaling_factor · z`` so that latents have roughly unit variance. Every GroupNorm uses eps 1e-6, there is no
time embedding, and the mid block has one single-head self-attention. The ResNet block, attention and
resampling layers are the UNet's (``model/unet.py``, ``model/upsample.py``); attribute names mirror the
diffusers keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.packed_conv import Conv2d
from model.unet import Downsample, ResnetBlock2D, UNetAttention, add_residual, maybe_checkpoint, silu
from model.upsample import Upsample

EPS = 1e-6  # every GroupNorm in the VAE


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder order; the decoder reverses it
    layers_per_block: int = 2     # ResNets per encoder level; decoder levels have one more
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512        # image side length it was trained at (informational)

    def __post_init__(self):
        for channels in self.block_out_channels:
            if channels % self.norm_groups:
                raise ValueError(f"channels {channels} must be divisible by norm_groups ({self.norm_groups})")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 8 for SD-1.5, 2 for the two-level test config."""
        return 2 ** (len(self.block_out_channels) - 1)


CONFIGS = {
    "sd15": VAEConfig(),
    "test": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=64),  # for tests
    # The shipped miniature: 64×64 flat-coloured images <-> 16×16×4 latents (two downsamples).
    "mini": VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_groups=8, sample_size=64),
}


class SpatialSelfAttention(UNetAttention):
    """Single-head self-attention over the H·W pixels of a feature map, as a residual branch.

    The GroupNorm lives inside the attention module (key ``group_norm``), as in diffusers.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        out = super().forward(tokens).transpose(1, 2).reshape(batch, channels, height, width)
        return add_residual(out, x)


class VAEMidBlock(nn.Module):
    """ResNet → self-attention → ResNet at the coarsest level."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class VAEEncoderBlock(nn.Module):
    """ResNets, then an optional asymmetric-padding downsample."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
            for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_channels, asymmetric_padding=True)] if downsample else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            h = layer(h)
        return h


class VAEDecoderBlock(nn.Module):
    """ResNets, then an optional nearest ×2 upsample."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
            for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            h = layer(h)
        return h


class VAEEncoder(nn.Module):
    """x [B,3,H,W] -> moments [B, 2·latent, H/8, W/8] (mean and logvar stacked on channels)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, levels = cfg.block_out_channels, len(cfg.block_out_channels)
        self.gradient_checkpointing = False
        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAEEncoderBlock(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block, cfg.norm_groups,
                         downsample=i < levels - 1)
            for i in range(levels))
        self.mid_block = VAEMidBlock(channels[-1], cfg.norm_groups)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, channels[-1], eps=EPS)
        self.conv_out = Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in [*self.down_blocks, self.mid_block]:
            h = maybe_checkpoint(self.gradient_checkpointing, block, h)
        return self.conv_out(silu(self.conv_norm_out(h)))


class VAEDecoder(nn.Module):
    """z [B, latent, h, w] -> x [B, 3, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, levels = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.gradient_checkpointing = False
        self.conv_in = Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = VAEMidBlock(channels[0], cfg.norm_groups)
        self.up_blocks = nn.ModuleList(
            VAEDecoderBlock(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block + 1, cfg.norm_groups,
                         upsample=i < levels - 1)
            for i in range(levels))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, channels[-1], eps=EPS)
        self.conv_out = Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in [self.mid_block, *self.up_blocks]:
            h = maybe_checkpoint(self.gradient_checkpointing, block, h)
        return self.conv_out(silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """``encode(x) -> (mean, logvar)`` and ``decode(z) -> x``, both in the UNSCALED latent space.

    Multiply a latent by ``scaling_factor`` (0.18215) before diffusion and divide by it before decoding.
    ``gradient_checkpointing = True`` recomputes each encoder/decoder block in backward; the reward stage
    decodes 512² images with gradient, where this saves most of the memory.
    """

    def __init__(self, cfg: VAEConfig = CONFIGS["sd15"]):
        super().__init__()
        self.config = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def scaling_factor(self) -> float:
        """Latent scale, kept in the config only: to change it, replace ``vae.config``."""
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side, from the config."""
        return self.config.downsample_factor

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape [B, C, h, w] of the latent noise for ``batch`` images of ``height``×``width`` pixels."""
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"image size {height}×{width} must be a multiple of the VAE's downsample factor "
                             f"{factor}; pick a height and width divisible by {factor}")
        return batch, self.config.latent_channels, height // factor, width // factor

    @property
    def gradient_checkpointing(self) -> bool:
        return self.decoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] in [-1, 1] -> (mean, logvar), each [B,4,H/8,W/8]; logvar clamped to (-30, 20)."""
        mean, logvar = self.quant_conv(self.encoder(x)).contiguous().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent z [B,4,h,w] -> image [B,3,8h,8w], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z)).contiguous()


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw z = mean + σ·noise from the encoder's diagonal Gaussian, σ = exp(logvar / 2); unscaled."""
    return mean + (0.5 * logvar).exp() * noise


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images [..., 3, H, W] in [-1, 1] -> uint8 pixels [..., H, W, 3] on the CPU, ready for PIL.

    Each value is clamped, mapped to [0, 255] and rounded to the nearest integer.
    """
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu()
