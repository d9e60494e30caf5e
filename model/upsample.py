"""Nearest ×2 upsampling followed by a 3×3 conv, run in inference as one 2×2 conv on the small map.

Nearest-neighbour upsampling repeats every pixel over a 2×2 block, so the 3×3 conv after it sees only a 2×2
neighbourhood of distinct input pixels, several of its nine taps landing on the same one. Along one axis, an
even output row 2i reads input rows (i-1, i, i) through taps (w0, w1, w2) and an odd row 2i+1 reads (i, i, i+1):
the even phase is the 2-tap kernel (w0, w1+w2) over rows (i-1, i), the odd phase (w0+w1, w2) over (i, i+1).
Folding both axes gives four 2×2 kernels, one per output phase (row parity, column parity). All four run as a
single conv with 4× the output channels and padding 1, whose (H+1)×(W+1) output holds phase (a, b) at offset
(a, b); the phases are then interleaved into the 2H×2W result. This is the sub-pixel convolution of Shi et
al., "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural
Network" (2016), here derived from an existing upsample-then-conv rather than learned.

It does 16·(H+1)(W+1) multiply-adds per channel pair instead of 36·HW: 0.56× at 8×8, 0.50× at 16×16, 0.47× at
32×32. In a one-off timing on 2 cores, SD-1.5's 1280-channel upsampling to 32×32 took 164 ms as written and 85 ms
folded (``bench/unet_speed.py`` measures whole models). The sums of taps round differently from the 3×3 conv,
within a few 1e-6 relative. The folded kernels are made once and kept (made again when the weight changes, as
model/packed_conv.py does for its layout); they cost 16/9 of the conv's weight in memory, 236 MB for SD-1.5's
UNet in fp32, and as much again for oneDNN's layout of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.packed_conv import Conv2d

# FOLD[phase][tap of the 2×2 kernel][tap of the 3×3 kernel] along one axis: the derivation above.
FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                     [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """A 3×3 kernel [O, I, 3, 3] as four 2×2 kernels [4·O, I, 2, 2], phase (a, b) in rows (2a + b)·O onward."""
    exact = torch.promote_types(weight.dtype, torch.float32)  # fold half-precision kernels in fp32
    fold = FOLD.to(weight.device, exact)
    kernels = torch.einsum("ayk,bxl,oikl->aboiyx", fold, fold, weight.to(exact))
    return kernels.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def folded_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of the 2×2 conv (padding 1) that replaces upsample-then-``conv``: the four phase
    kernels, and ``conv``'s bias once per phase."""
    return phase_kernels(conv.weight), conv.bias.repeat(4)


def folded_conv(conv: nn.Conv2d) -> Conv2d:
    """That 2×2 conv as a module of its own, for the cache; no autograd."""
    folded = Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, device="meta")
    weight, bias = folded_weights(conv)
    folded.weight = nn.Parameter(weight.detach(), requires_grad=False)
    folded.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return folded


def interleave_phases(phases: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The folded conv's [B, 4·C, H+1, W+1] output for input ``x`` [B, I, H, W] -> [B, C, 2H, 2W], in ``x``'s
    memory format (contiguous when both fit, as for a 1×1 map)."""
    batch, channels, (height, width) = phases.shape[0], phases.shape[1] // 4, x.shape[-2:]
    layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=phases.dtype, device=phases.device,
                      memory_format=layout)
    for a in (0, 1):
        for b in (0, 1):
            phase = 2 * a + b
            out[:, :, a::2, b::2] = phases[:, phase * channels:(phase + 1) * channels, a:a + height, b:b + width]
    return out


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to ``size``, for odd sizes on the way down), then conv3×3.

    Without autograd an exact ×2 takes the folded path above. Under ``torch.compile`` the kernels are folded
    inside the graph instead of read from the cache: a compile with freezing, as sampling on the CPU runs,
    folds them once, as a constant; without it (CUDA) the fold reruns at each call, a pass over the weight
    against half the conv's multiply-adds. The plain path serves the rest: training, a LoRA-wrapped conv (its
    weight is not the whole kernel), weights made under inference mode (no version counter to follow their
    changes) and odd sizes.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self._folding_applies(x, size):
            if torch.compiler.is_compiling():
                return interleave_phases(F.conv2d(x, *folded_weights(self.conv), padding=1), x)
            return interleave_phases(self.phase_conv()(x), x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)

    def _folding_applies(self, x: torch.Tensor, size: tuple[int, int] | None) -> bool:
        doubled = (2 * x.shape[-2], 2 * x.shape[-1])
        return (tuple(size or doubled) == doubled and not torch.is_grad_enabled() and type(self.conv) is Conv2d
                and (torch.compiler.is_compiling() or not self.conv.weight.is_inference()))

    def phase_conv(self) -> Conv2d:
        """The 2×2 conv of the four folded kernels, made again when the 3×3 weight or bias has changed."""
        weight, bias = self.conv.weight, self.conv.bias
        key = (weight.dtype, weight.device, weight.data_ptr(), weight._version, bias.data_ptr(), bias._version)
        cached = self.__dict__.get("_phase_conv")  # a plain attribute: not in the state dict, not moved by .to()
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):  # a weight made under inference mode could not be laid out
                conv = folded_conv(self.conv)
            cached = self.__dict__["_phase_conv"] = (key, conv)
        return cached[1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_phase_conv"}  # copies fold their own

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_phase_conv", None)  # .to() and .half() make a new weight: free the old kernels now
        return super()._apply(fn, recurse)
