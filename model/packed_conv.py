"""A Conv2d whose CPU inference reads a weight laid out for oneDNN once, instead of at every call.

PyTorch's eager CPU convolution hands a plain (OIHW or OHWI) weight to oneDNN, which first copies it into its
own blocked layout and then convolves. For the wide, small convolutions deep in SD-1.5's UNet that copy costs
about as much as the arithmetic (in a one-off timing on 2 cores, a 1280-channel 3×3 conv at 8×8 took 32 ms in
eager fp32 and 13 ms on a laid-out weight; ``bench/unet_speed.py`` measures the whole UNet). inductor's
freezing does the same layout at compile time; this is the eager version of it.

The laid-out copy is kept beside the weight (not in the state dict) and made again whenever it may be stale: a
new input shape (oneDNN picks the layout per shape), a new dtype or storage (``.to``, ``load_state_dict`` with
``assign``), or an in-place write to the weight (a LoRA merge, an optimizer step), which bumps the weight's
version counter. It costs a second copy of the conv weights in memory (2.4 GB for SD-1.5's UNet in fp32). It
serves channels-last inputs only (``model.speed.prefer_channels_last``, as sample.py and train.py run), since
oneDNN writes its output channels-last, as nn.Conv2d does for those. Everything else takes nn.Conv2d's own
path: CUDA, autograd (training), autocast, ``torch.compile`` (which lays weights out itself), bf16 where
oneDNN has no bf16 kernels for this CPU, and weights whose changes cannot be tracked (inference-mode tensors
have no version counter).
"""
from __future__ import annotations

import torch
from torch import nn


def packing_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when a laid-out weight can serve this call (see the module docstring for why each test).

    The compiler test comes first: dynamo cannot trace the bf16 query, which returns a bool, not a tensor."""
    return (not torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and x.dtype == weight.dtype
            and (x.dtype == torch.float32 or x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and not torch.is_autocast_enabled("cpu") and not weight.is_inference()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same arguments, parameters and state-dict keys) with the laid-out weight path above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not packing_applies(x, self.weight):
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.laid_out_weight(x.shape), self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "")

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickling leave the laid-out weight behind: an opaque oneDNN tensor has no storage
        # to copy, and the copy lays out its own on first use
        return {k: v for k, v in self.__dict__.items() if k != "_laid_out"}

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_laid_out", None)  # .to() and .half() make a new weight: free the old layout now
        return super()._apply(fn, recurse)

    def laid_out_weight(self, input_shape: torch.Size) -> torch.Tensor:
        """oneDNN's copy of the weight for inputs of ``input_shape``, made again when stale."""
        weight = self.weight
        key = (tuple(input_shape), weight.dtype, weight.data_ptr(), weight._version)
        cached = self.__dict__.get("_laid_out")  # a plain attribute: no state dict, no .to(), no DDP sync
        if cached is None or cached[0] != key:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(input_shape))
            cached = self.__dict__["_laid_out"] = (key, packed)
        return cached[1]
