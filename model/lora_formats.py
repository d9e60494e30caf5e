"""LoRA files as others write them, converted to and from this project's in-memory form.

In memory (and in this project's older files) a LoRA is a state dict keyed by the wrapped module's dotted
name: ``NAME.lora_down.weight``, ``NAME.lora_up.weight`` and a 0-d ``NAME.alpha`` (scale = alpha / rank).
The files read here:

- kohya / A1111 safetensors, what A1111, ComfyUI and diffusers ``load_lora_weights`` read:
  ``lora_unet_<NAME with dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. This is
  the one format written, with a free str→str metadata header saying how the LoRA was trained.
- diffusers / PEFT files: ``unet.NAME.lora_A.weight`` (down) and ``.lora_B.weight`` (up), with or without the
  ``unet.`` prefix; alpha from ``.alpha`` keys or the ``lora_adapter_metadata`` JSON diffusers writes.
- The LongAlign authors' release (LongSD): ``torch.save`` of a bare list of fp16 tensors, ``[up, down]`` per
  module, with no names, in the order described at :func:`release_order`.

Underscores in kohya names are ambiguous (``to_q``, ``down_blocks``), so kohya names are resolved against the
target model's own module names; the release list needs the model's modules too. The caller passes them.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from enum import StrEnum
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.convert import WeightsError
from model.weights import PICKLE_SUFFIXES, atomic_write, read_state_dict

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
KOHYA_PREFIX = "lora_unet_"
PEFT_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight", ".alpha": ".alpha"}
PEFT_PREFIXES = ("unet.", "base_model.model.")  # diffusers' component prefix; PEFT's own wrapper prefix
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers stores the PEFT LoraConfig under this header key
SD1_VERSION = "sd_v1"  # kohya's ss_base_model_version for SD-1.x


class LoRALayout(StrEnum):
    KOHYA = "kohya"
    PEFT = "diffusers/peft"
    DOTTED = "dotted names"
    RELEASE = "release list"


# ---- Reading files ----

def read_lora_contents(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor] | list[torch.Tensor], dict]:
    """A LoRA file's tensors (a dict, or the release's list) and its safetensors metadata ({} for pickles)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES and path.is_file():
        tensors = read_release_list(path)
        if tensors is not None:
            return tensors, {}
    state = read_state_dict(path)  # every unreadable file is reported there, by name
    if path.suffix != ".safetensors":
        return state, {}
    with safe_open(str(path), "pt") as file:
        return state, dict(file.metadata() or {})


def read_release_list(path: Path) -> list[torch.Tensor] | None:
    """The tensors of a pickled list (``weights_only=True``), or None when the file is not a list."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
        return None  # not ours to judge: read_state_dict reads it again and names the problem
    if not isinstance(obj, (list, tuple)):
        return None
    if not all(isinstance(t, torch.Tensor) for t in obj):
        raise WeightsError(f"{path} holds a list, but not only of tensors, so it is not a LoRA list.")
    return list(obj)


def detect_lora_layout(keys: Iterable[str], source: str) -> LoRALayout:
    """Which naming a LoRA state dict uses; an unknown one is an error quoting its first keys."""
    keys = sorted(keys)
    text_encoder = [k for k in keys if k.startswith(("lora_te", "text_encoder."))]
    if text_encoder:
        raise WeightsError(f"{source} also adapts the text encoder ({text_encoder[0]}, ...); only UNet LoRAs "
                           "are supported. Use a LoRA trained on the UNet alone.")
    if keys and all(k.startswith(KOHYA_PREFIX) for k in keys):
        return LoRALayout.KOHYA
    if any(k.endswith(".lora_A.weight") for k in keys) and all(k.endswith(tuple(PEFT_SUFFIXES)) for k in keys):
        return LoRALayout.PEFT
    if any(k.endswith(".lora_down.weight") for k in keys) and all(k.endswith(LORA_SUFFIXES) for k in keys):
        return LoRALayout.DOTTED
    raise WeightsError(
        f"{source} is no LoRA layout this project reads; its first keys are {', '.join(keys[:4]) or '(none)'}. "
        f"Expected kohya ('{KOHYA_PREFIX}NAME.lora_down.weight'), diffusers/PEFT ('unet.NAME.lora_A.weight'), "
        "dotted ('NAME.lora_down.weight') or the LongSD release's list of tensors.")


def split_suffix(key: str, suffixes: Iterable[str], source: str) -> tuple[str, str]:
    """``key`` as (module stem, suffix); a suffix that is none of ``suffixes`` is an error naming it."""
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise WeightsError(f"{source} has the key {key}, which is not one of the LoRA parts {', '.join(suffixes)} "
                       "(LoCon/LoHa/DoRA variants are not supported).")


# ---- Converting to the dotted form ----

def from_kohya(tensors: dict[str, torch.Tensor], module_names: Iterable[str], source: str) -> dict:
    """Dotted state from kohya keys, each name resolved against ``module_names`` (the target model's)."""
    table: dict[str, list[str]] = {}
    for name in module_names:
        table.setdefault(name.replace(".", "_"), []).append(name)
    state, unknown = {}, set()
    for key, value in tensors.items():
        stem, suffix = split_suffix(key, LORA_SUFFIXES, source)
        matches = table.get(stem[len(KOHYA_PREFIX):], [])
        if len(matches) > 1:
            raise WeightsError(f"{source}: {stem} could be any of the modules {', '.join(matches)}.")
        if not matches:
            unknown.add(stem)
            continue
        state[matches[0] + suffix] = value
    if unknown:
        raise WeightsError(f"{source} has LoRA weights for modules that the model does not have: "
                           f"{', '.join(sorted(unknown)[:8])}. Is it a LoRA for a different model?")
    return state


def from_peft(tensors: dict[str, torch.Tensor], metadata: dict, source: str) -> dict:
    """Dotted state from diffusers/PEFT keys; alpha from ``.alpha`` keys, else from diffusers' metadata."""
    prefix = next((p for p in PEFT_PREFIXES if all(k.startswith(p) for k in tensors)), "")
    state = {}
    for key, value in tensors.items():
        stem, suffix = split_suffix(key[len(prefix):], PEFT_SUFFIXES, source)
        state[stem + PEFT_SUFFIXES[suffix]] = value
    alpha = peft_alpha(metadata, source)
    stems = [k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")]
    if alpha is not None:
        for stem in stems:
            state.setdefault(f"{stem}.alpha", torch.tensor(alpha))
    return state


def peft_alpha(metadata: dict, source: str) -> float | None:
    """PEFT's ``lora_alpha`` as diffusers stores it in the header (under ``unet.``), or None."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    config = json.loads(raw)
    config = {k.removeprefix("unet."): v for k, v in config.items()}
    if config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise WeightsError(f"{source} uses per-module alphas, rsLoRA or DoRA (see its {PEFT_METADATA_KEY}), "
                           "which are not supported; save it with one lora_alpha.")
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def to_dotted_state(tensors: dict[str, torch.Tensor], metadata: dict, module_names: Iterable[str],
                    source: str) -> tuple[dict[str, torch.Tensor], LoRALayout]:
    """Any named LoRA state dict in the dotted form, and the layout it was found in."""
    layout = detect_lora_layout(tensors, source)
    if layout is LoRALayout.KOHYA:
        return from_kohya(tensors, module_names, source), layout
    if layout is LoRALayout.PEFT:
        return from_peft(tensors, metadata, source), layout
    return dict(tensors), layout


# ---- The release's list ----

# Each name part, ranked as diffusers registers it: UNet2DConditionModel registers down_blocks and up_blocks
# before mid_block; its cross-attention blocks register attentions before resnets; a transformer block
# registers attn1, attn2, ff; a ResnetBlock2D conv1, time_emb_proj, conv2, conv_shortcut; an Attention
# to_q, to_k, to_v, to_out. Digits are list indices.
RELEASE_PART_RANK = {
    "down_blocks": 0, "up_blocks": 1, "mid_block": 2,
    "attentions": 0, "resnets": 1,
    "transformer_blocks": 0, "attn1": 0, "attn2": 1, "ff": 2, "net": 0, "proj": 0,
    "conv1": 0, "time_emb_proj": 1, "conv2": 2, "conv_shortcut": 3,
    "to_q": 0, "to_k": 1, "to_v": 2, "to_out": 3,
}


def release_order(name: str) -> tuple[int, ...]:
    """Sort key putting module names in the release's traversal order.

    The authors' ``save_lora_weight`` walks ``unet.modules()`` of diffusers' UNet2DConditionModel, keeps the
    ResnetBlock2D, Attention and GEGLU modules, and lists every Linear/Conv2d inside each. That order is
    diffusers' attribute registration order, stated here by name (``RELEASE_PART_RANK``) so it does not
    depend on the order our own classes register their attributes in.
    """
    key = []
    for part in name.split("."):
        if part.isdigit():
            key.append(int(part))
        elif part in RELEASE_PART_RANK:
            key.append(RELEASE_PART_RANK[part])
        else:
            raise WeightsError(f"cannot place the module {name} in the LongSD release's order: its part "
                               f"'{part}' is not one of {', '.join(RELEASE_PART_RANK)}.")
    return tuple(key)


def from_release_list(tensors: list[torch.Tensor], targets: dict[str, torch.Size], source: str) -> dict:
    """Dotted state (scale 1) from the release's ``[up, down, up, down, ...]`` over ``targets``.

    ``targets`` maps each LoRA target module of the model to its base weight's shape.
    """
    names = sorted(targets, key=release_order)
    if len(tensors) != 2 * len(names):
        raise WeightsError(f"{source} holds {len(tensors)} tensors, but the model has {len(names)} LoRA target "
                           f"modules, so {2 * len(names)} ([up, down] each) were expected. Is it a LoRA for a "
                           "different model?")
    state = {}
    for i, name in enumerate(names):
        up, down = tensors[2 * i], tensors[2 * i + 1]
        base = tuple(targets[name])
        rank = down.shape[0] if down.dim() == len(base) else -1
        want_up, want_down = (base[0], rank, *(1,) * (len(base) - 2)), (rank, *base[1:])
        if tuple(up.shape) != want_up or tuple(down.shape) != want_down:
            raise WeightsError(f"{source}: tensors {2 * i} and {2 * i + 1} (up, down for {name}) have shapes "
                               f"{tuple(up.shape)} and {tuple(down.shape)}, which do not fit its weight {base}.")
        state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"] = up.float(), down.float()
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


# ---- Writing kohya files ----

def to_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya keys for a dotted state dict."""
    kohya = {}
    for key, value in state.items():
        stem, suffix = split_suffix(key, LORA_SUFFIXES, "the LoRA state dict")
        kohya[KOHYA_PREFIX + stem.replace(".", "_") + suffix] = value
    return kohya


def lora_metadata(base_model: str, encoding: str, max_tokens: int, stage: str, t5: bool,
                  base_model_version: str = SD1_VERSION) -> dict[str, str]:
    """The header recording how a LoRA was trained (LongAlign §3's encoding, its length, the stage)."""
    return {"base_model": str(base_model), "encoding": encoding, "max_tokens": str(int(max_tokens)),
            "stage": stage, "t5": "yes" if t5 else "no", "ss_base_model_version": base_model_version}


def rank_metadata(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """rank and alpha, as ours and kohya's ss_ keys, when every module has the same ones."""
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    header = {}
    if len(ranks) == 1:
        header["rank"] = header["ss_network_dim"] = str(ranks.pop())
    if len(alphas) == 1:
        header["alpha"] = header["ss_network_alpha"] = f"{alphas.pop():g}"
    return header


def save_lora_file(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a dotted LoRA state dict as a kohya safetensors file (atomically), with rank, alpha and
    ``metadata`` (str→str, e.g. from :func:`lora_metadata`) in its header."""
    if not state:
        raise ValueError("there are no LoRA weights to save; call inject_lora(model) first.")
    header = {**rank_metadata(state), **(metadata or {})}
    wrong = [k for k, v in header.items() if not (isinstance(k, str) and isinstance(v, str))]
    if wrong:
        raise ValueError(f"LoRA metadata must map strings to strings; {wrong[0]!r} does not. Convert it with str().")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in to_kohya(state).items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
