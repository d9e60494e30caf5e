"""The fast path: memory format, memory reuse and compilation. None changes what a model computes, beyond float
rounding.

- Channels-last (NHWC) conv weights for the UNet and the VAE (:func:`prefer_channels_last`): oneDNN (CPU) and
  cuDNN's tensor-core kernels run NHWC convolutions natively. sample.py and train.py always use it.
- On the CPU, freed memory kept for reuse (:func:`keep_freed_memory`), so that a forward does not page-fault its
  activations in afresh. sample.py does it on the CPU. (The convs' laid-out weights: model/packed_conv.py.)
- ``torch.compile(fullgraph=True)``: every network here traces as one graph (tests/test_compile.py), so
  inductor fuses the elementwise work between the matmuls and convolutions of a whole forward. It costs a
  one-off compile, tens of seconds to minutes on a CPU, so it is the scripts' ``--compile`` flag.

Sampling and training compile differently. Sampling (:func:`compile_for_sampling`) runs the same shapes again
and again with weights that no longer change: on CUDA the UNet and the VAE decoder use CUDA graphs
(``mode="reduce-overhead"``), which replay a forward's hundreds of kernel launches as one and need static
shapes; on the CPU inductor's freezing turns the weights into constants that oneDNN lays out once instead of
at every call (the frozen copy doubles the weights' memory). Training (:func:`compile_for_training`) changes
the weights every step, so it compiles plainly, once the model is what it will train: after the LoRA
injection, gradient checkpointing and the move to its device.

Each model is compiled in place (``nn.Module.compile``): it stays the same module, with the same parameters
and state-dict keys, so checkpoints, LoRA files and EMA swaps see no difference.
"""
from __future__ import annotations

import ctypes
import platform
import sys

import torch
from torch import nn

from model.longtext import LongPromptEncoder
from model.t5 import CLIPT5Encoder
from model.weights import Pipeline


def prefer_channels_last(model: nn.Module) -> nn.Module:
    """Store the conv weights of ``model`` (a UNet or a VAE) channels-last (NHWC) and return it.

    Activations follow the weights: every conv writes NHWC, and the GroupNorms, the transformer blocks'
    token reshapes (views in this layout) and the skip concatenations keep it without copies. oneDNN (CPU)
    and cuDNN's tensor-core kernels run NHWC convolutions natively: on an AVX512-BF16 CPU a bf16 SD-1.5 UNet
    forward takes 0.85× its contiguous time, in fp32 about the same. Outputs are contiguous either way.
    Call it after any LoRA injection, so that the LoRA's own convolutions are laid out the same way.
    """
    return model.to(memory_format=torch.channels_last)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for the next forward instead of handing it back to the kernel.

    By default glibc serves a large block by a fresh ``mmap`` and unmaps it when freed, and trims the heap's
    free top: a CPU forward of a big model then page-faults its activations in afresh (and the kernel zeroes
    every page). After this, blocks up to 32 MB come from the heap and the heap keeps up to 2 GiB of free top,
    so the next forward reuses the pages; ``bench/unet_speed.py --plain-memory`` shows what that is worth (about
    1% of an fp32 SD-1.5 UNet forward on 2 cores, once the feed-forward runs in pieces). The process keeps its
    peak memory. Returns whether glibc took both settings (False on other C libraries).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def text_encoder_modules(encoder: LongPromptEncoder | CLIPT5Encoder) -> list[nn.Module]:
    """The networks a context encoder runs: CLIP's text model, and for the release's CLIP+T5 context also T5
    and its adapter."""
    if isinstance(encoder, CLIPT5Encoder):
        return [encoder.clip.text_encoder, encoder.t5, encoder.adapter]
    return [encoder.text_encoder]


def compile_for_sampling(pipe: Pipeline, text_modules: list[nn.Module], device: torch.device | str) -> None:
    """Compile the UNet, the VAE decoder and ``text_modules`` for inference; call it once the weights are
    final (after the dtype cast and any LoRA merge), since on the CPU they are frozen into the graphs.

    CUDA graphs only for the UNet and the VAE decoder, whose shapes a run keeps and whose outputs are used up
    before their next call; the text encoders see as many shapes as the prompts have segments, and run once
    per batch. The freezing is an option of these compiles, not a global setting, so it reaches nothing else.
    """
    frozen = {"options": {"freezing": True}}  # only takes effect without gradient, as sampling runs
    cuda = torch.device(device).type == "cuda"
    static = {"mode": "reduce-overhead"} if cuda else frozen
    pipe.unet.compile(fullgraph=True, **static)
    pipe.vae.decoder.compile(fullgraph=True, **static)
    for module in text_modules:
        module.compile(fullgraph=True, **({} if cuda else frozen))


def compile_for_training(unet: nn.Module, text_modules: list[nn.Module] = ()) -> None:
    """Compile the UNet and the (frozen) ``text_modules`` for training: one graph each, no freezing (the
    weights change every step) and no CUDA graphs (the reward rollout calls the UNet with and without gradient,
    under checkpointing). Call it after the LoRA injection, gradient checkpointing and ``.to(device)``."""
    for module in (unet, *text_modules):
        module.compile(fullgraph=True)
