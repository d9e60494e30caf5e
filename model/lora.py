"""Low-rank adapters (LoRA) for the UNet's Linear and Conv2d layers.

LongAlign trains a rank-32 LoRA (Hu et al. 2021) in both stages: in supervised fine-tuning, and
again, freshly initialised on top of the merged SFT weights, in reward fine-tuning. A LoRA layer computes

    y = W x + b + dropout((alpha / r) · up(down(x)))

with ``down`` a rank-r projection (for a convolution: the same kernel, stride and padding as the base, out to r
channels) and ``up`` a map back to the output width (for a convolution: a 1×1 conv). ``up`` starts at zero, so
a freshly injected model computes exactly what the base model computes.

Choices made here:
- ``alpha`` defaults to the rank, so the scale alpha/r is 1 and the initialisation below is the official one.
- ``down`` ~ N(0, std = 1/r), ``up`` = 0 (the official initialisation).
- The LoRA weights stay fp32 master copies even when the base runs in fp16/bf16: the official release kept
  them in bf16, which is listed among its defects. ``model.to(torch.bfloat16)`` casts the base weights only.
- The layer keeps the base layer's parameter names (``weight``, ``bias``), so a model with LoRA still loads
  diffusers checkpoints key for key; the adapters add ``lora_down`` and ``lora_up`` beside them.
- The dropout (default 0) acts in train mode only: the authors' release trains with 0.1, in SFT and in every
  reward rollout step (the UNet is in train mode there), and samples without it.

Files are written in the kohya / A1111 layout and read in every layout of ``model/lora_formats.py``.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.convert import Layout, WeightsError
from model.lora_formats import (LoRALayout, from_release_list, read_lora_contents,
                                save_lora_file, to_dotted_state)
from model.packed_conv import Conv2d
from model.weights import check_state_dict

# Where the adapters go, as in the authors' release: every Linear/Conv2d inside a ResNet block, inside
# self- and cross-attention (attn1, attn2; the release notes that results are poor without cross-attention)
# and inside GEGLU, the feed-forward's input projection. Not the feed-forward's output Linear ff.net.2, which
# sits outside GEGLU. Matched with re.search against the full module name, e.g.
# "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k". On SD-1.5: 224 modules, 28,291,072
# parameters at rank 32.
DEFAULT_PATTERNS = (
    r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$",
    r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    r"ff\.net\.0\.proj$",
)


class LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv2d share: the adapter branch, merging, and fp32 master weights."""

    lora_down: nn.Module
    lora_up: nn.Module

    def _init_lora(self, rank: int, alpha: float, down: nn.Module, up: nn.Module, dropout: float) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}.")
        self.rank, self.alpha, self.merged, self.lora_dropout = rank, float(alpha), False, float(dropout)
        self.lora_down, self.lora_up = down, up
        nn.init.normal_(self.lora_down.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def add_lora_branch(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + dropout(scale · up(down(x))); the branch runs in the LoRA weights' dtype (fp32), the sum in y's
        dtype. The dropout acts only in train mode."""
        if self.merged:
            return y
        branch = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * self.scale
        branch = F.dropout(branch, self.lora_dropout, self.training)
        return y + branch.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The fp32 change scale · up ∘ down, in the base weight's shape."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW, computed in fp32 and stored in the base dtype; the branch is then skipped."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW. Exact up to rounding: about 1e-7 relative for fp32 weights, but in fp16/bf16 the
        rounding done when merging is not undone."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def _apply(self, fn, recurse=True):
        # nn.Module.to / .half / .cuda all go through _apply. The base weights get the conversion as usual; the
        # adapters only follow the device, so they stay fp32 master copies.
        if recurse:
            device = fn(torch.empty(0, device=self.lora_down.weight.device)).device
            for adapter in (self.lora_down, self.lora_up):
                adapter._apply(lambda t: t.to(device=device))
        return super()._apply(fn, recurse=False)


class LoRALinear(LoRALayer, nn.Linear):
    """An nn.Linear (same weight and bias objects) plus a LoRA branch."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self._init_lora(rank, alpha, nn.Linear(base.in_features, rank, bias=False, device=device),
                        nn.Linear(rank, base.out_features, bias=False, device=device), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora_branch(F.linear(x, self.weight, self.bias), x)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_up.weight @ self.lora_down.weight)  # [out, r] @ [r, in] -> [out, in]

    def plain(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer


class LoRAConv2d(LoRALayer, Conv2d):
    """An nn.Conv2d (same weight and bias objects) plus a LoRA branch: down is a conv with the base kernel,
    stride and padding into ``rank`` channels, up is a 1×1 conv back to the output channels."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported.")
        super().__init__(**_conv_args(base), device="meta")
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        down_args = {**_conv_args(base), "out_channels": rank, "bias": False}
        self._init_lora(rank, alpha, nn.Conv2d(**down_args, device=device),
                        nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora_branch(super().forward(x), x)  # the base conv, laid out for CPU inference

    def delta_weight(self) -> torch.Tensor:
        up = self.lora_up.weight[:, :, 0, 0]  # [out, r, 1, 1] -> [out, r]
        return self.scale * torch.einsum("or,rikl->oikl", up, self.lora_down.weight)  # -> [out, in, kh, kw]

    def plain(self) -> Conv2d:
        layer = Conv2d(**_conv_args(self), device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                padding_mode=conv.padding_mode)


# ----------------------------------------------------------------------------------------------------------
# Injecting, merging, removing
# ----------------------------------------------------------------------------------------------------------

def inject_lora(model: nn.Module, rank: int = 32, patterns: Iterable[str] = DEFAULT_PATTERNS,
                alpha: float | None = None, dropout: float = 0.0) -> list[str]:
    """Wrap every Linear/Conv2d whose name matches one of ``patterns`` (re.search) in a LoRA layer.

    Freezes every parameter of ``model`` (requires_grad False); only the new LoRA weights train.
    ``alpha`` defaults to ``rank`` (scale 1). ``dropout`` acts on the branch's output in train mode (the
    release trains with 0.1). Returns the names of the wrapped modules, in model order.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}.")
    targets = lora_targets(model, patterns)
    wrap_modules(model, {name: (rank, rank if alpha is None else alpha) for name in targets}, dropout)
    return targets


def lora_targets(model: nn.Module, patterns: Iterable[str] = DEFAULT_PATTERNS) -> list[str]:
    """The names of the Linear/Conv2d modules of ``model`` that match ``patterns``, in model order."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    compiled = [re.compile(p) for p in patterns]
    targets = [name for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Conv2d)) and any(p.search(name) for p in compiled)]
    if not targets:
        raise ValueError(f"no Linear or Conv2d module of {type(model).__name__} matches the LoRA patterns "
                         f"{patterns}. Check the module names with model.named_modules().")
    return targets


def wrap_modules(model: nn.Module, settings: dict[str, tuple[int, float]], dropout: float = 0.0) -> None:
    """Wrap each named module in a LoRA layer of its own (rank, alpha); freeze everything else."""
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers. To start a fresh LoRA on top of them, call "
                         "merge_and_unload(model) first.")
    model.requires_grad_(False)
    for name, (rank, alpha) in settings.items():
        base = model.get_submodule(name)
        wrapper = LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
        _replace(model, name, wrapper(base, rank, alpha, dropout))


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA weights (what the optimiser gets)."""
    return [p for layer in lora_layers(model).values()
            for p in (layer.lora_down.weight, layer.lora_up.weight)]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA branch into its base weight (in the base dtype); forward then skips the branches."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: subtract the branches again and run them separately."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put plain Linear/Conv2d layers back: the model is a LoRA-free UNet again.

    This is the hand-over between the stages (SFT weights merged, then a fresh LoRA) and the way to export a
    merged UNet whose state dict is the diffusers layout.
    """
    for name, layer in lora_layers(model).items():
        layer.merge()
        _replace(model, name, layer.plain())
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


# ----------------------------------------------------------------------------------------------------------
# State dicts and files
# ----------------------------------------------------------------------------------------------------------
# In memory, for each wrapped module NAME: "NAME.lora_down.weight", "NAME.lora_up.weight" and a scalar
# "NAME.alpha" (the kohya convention for alpha), all fp32. On disk: see model/lora_formats.py.

class LoRAFile(NamedTuple):
    """A LoRA file read for one model: the dotted state dict, the header metadata, the layout found."""
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    layout: LoRALayout


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` (detached, fp32), keyed by the wrapped module's name."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach()
        state[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach()
        state[f"{name}.alpha"] = torch.tensor(layer.alpha)
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict",
                         dropout: float = 0.0) -> None:
    """Copy LoRA weights into ``model``; if it has no LoRA yet, inject it where ``state`` says (with
    ``dropout``), first. Every missing, unexpected or wrong-shaped key is reported by name.
    """
    if not lora_layers(model):
        _inject_like(model, state, source, dropout)
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    check_state_dict(state, expected, type(model).__name__, Layout.LORA, source)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            if layer.merged:
                raise ValueError(f"{name} is merged; call unmerge_lora(model) before loading LoRA weights.")
            layer.lora_down.weight.copy_(state[f"{name}.lora_down.weight"])
            layer.lora_up.weight.copy_(state[f"{name}.lora_up.weight"])
            layer.alpha = float(state[f"{name}.alpha"])


def _inject_like(model: nn.Module, state: dict[str, torch.Tensor], source: str, dropout: float) -> None:
    """Inject LoRA at exactly the modules named in ``state``, each with its own rank and alpha."""
    names = sorted({k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")})
    if not names:
        raise WeightsError(f"{source} holds no LoRA weights (no keys ending in '.lora_down.weight').")
    known = dict(model.named_modules())
    absent = [n for n in names if not isinstance(known.get(n), (nn.Linear, nn.Conv2d))]
    if absent:
        raise WeightsError(f"{source} has LoRA weights for modules that {type(model).__name__} does not have: "
                           f"{', '.join(absent[:8])}. Is it a LoRA for a different model?")
    settings = {}
    for name in names:
        rank = state[f"{name}.lora_down.weight"].shape[0]
        settings[name] = (rank, float(state.get(f"{name}.alpha", rank)))  # no alpha: scale 1
    wrap_modules(model, settings, dropout)


def read_lora_file(path: str | os.PathLike, model: nn.Module) -> LoRAFile:
    """Read a LoRA file of any supported layout into the dotted form for ``model``.

    kohya names are resolved against ``model``'s module names; the release's nameless list is laid over
    ``model``'s default LoRA targets in the release's traversal order.
    """
    contents, metadata = read_lora_contents(path)
    if isinstance(contents, list):
        targets = {name: model.get_submodule(name).weight.shape for name in lora_targets(model)}
        return LoRAFile(from_release_list(contents, targets, str(path)), metadata, LoRALayout.RELEASE)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    state, layout = to_dotted_state(contents, metadata, names, str(path))
    return LoRAFile(state, metadata, layout)


def save_lora(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the LoRA weights of ``model`` as a kohya safetensors file (atomically), with ``metadata``
    (str→str, e.g. ``lora_metadata(...)`` from model/lora_formats.py) in its header."""
    state = lora_state_dict(model)
    if not state:
        raise ValueError("this model has no LoRA layers to save; call inject_lora(model) first.")
    save_lora_file(state, path, metadata)


def load_lora(model: nn.Module, path: str | os.PathLike, dropout: float = 0.0) -> list[str]:
    """Read a LoRA file of any supported layout into ``model`` (injecting it first if needed).

    Returns the names of the LoRA-wrapped modules.
    """
    lora = read_lora_file(path, model)
    load_lora_state_dict(model, lora.state, source=f"{path} ({lora.layout})", dropout=dropout)
    return list(lora_layers(model))


def merge_lora_files(model: nn.Module, paths: Iterable[str | os.PathLike]) -> None:
    """Merge LoRA files into ``model``'s weights one after the other: each was trained on the model with
    the ones before it merged, as the release's reward LoRA was trained on the SFT one (LongAlign §4)."""
    if lora_layers(model):
        raise ValueError("merge_lora_files needs a model without LoRA layers; call merge_and_unload(model) first.")
    for path in paths:
        load_lora(model, path)
        merge_and_unload(model)


def stack_loras(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One LoRA state dict that applies ``first`` and then ``second``; its rank is the sum of theirs.

    Two LoRAs on one layer add their changes, and a sum of two low-rank products is one product of the
    stacked factors:

        ΔW = s1·U1·D1 + s2·U2·D2 = [s1·U1, s2·U2] · [D1; D2],   s = alpha / rank.

    The scales are folded into the up weights and alpha is set to the new rank (scale 1). The reward LoRA,
    trained on top of the merged SFT LoRA (the paper's "S+R" model, Table 2), so ships as one file for the
    original SD-1.5 weights, with no renaming between the stages.
    """
    suffix = ".lora_down.weight"
    modules = sorted(key[:-len(suffix)] for key in first if key.endswith(suffix))
    if modules != sorted(key[:-len(suffix)] for key in second if key.endswith(suffix)):
        raise ValueError("the two LoRAs wrap different modules, so they cannot be stacked into one file")
    stacked = {}
    for name in modules:
        downs, ups = [], []
        for state in (first, second):
            down, up = state[name + suffix].float().cpu(), state[f"{name}.lora_up.weight"].float().cpu()
            alpha = float(state.get(f"{name}.alpha", down.shape[0]))
            downs.append(down)  # [r, in] or [r, in, kh, kw]
            ups.append(up * (alpha / down.shape[0]))  # [out, r] or [out, r, 1, 1]
        stacked[name + suffix] = torch.cat(downs, dim=0)
        stacked[f"{name}.lora_up.weight"] = torch.cat(ups, dim=1)
        stacked[f"{name}.alpha"] = torch.tensor(float(stacked[name + suffix].shape[0]))
    return stacked
