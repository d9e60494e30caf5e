"""Reading public checkpoints into our modules, strictly.

Every layout people actually have on disk (diffusers / transformers folders, the original single-file
Stable Diffusion checkpoint, open_clip state dicts) is turned into the key names our modules already use,
by a short set of rules. Loading then checks every key and every shape, and a problem is reported by name
together with the layout we detected, never as a bare traceback from deep inside torch.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class WeightsError(ValueError):
    """A weights path or file that cannot be used; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Reading raw state dicts
# ----------------------------------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one weights file: safetensors, or a torch pickle through ``weights_only=True`` only."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}. Check the path you passed.")
    if path.is_dir():
        raise WeightsError(f"expected a weights file but got a folder: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise WeightsError(
        f"unknown weights format '{path.suffix}' for {path}: use .safetensors (preferred) or a torch "
        f"pickle ({', '.join(PICKLE_SUFFIXES)})."
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({err}). It may be truncated or corrupt: "
            "download it again."
        ) from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"{path} needs a full (unsafe) unpickle, which this project never does ({str(err).splitlines()[0]}). "
            "Convert it to safetensors in a trusted environment, or use a plain state-dict checkpoint."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{path} is not a readable torch checkpoint ({err}); it may be truncated.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors.")
    return obj


def find_file(folder: Path, names: list[str], what: str) -> Path:
    """The first of ``names`` that exists in ``folder``; a clear error listing them otherwise."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(
        f"no {what} weights in {folder}: expected one of {', '.join(names)}. Pass the folder that holds "
        "them, or the weights file itself."
    )


def read_config(folder: Path) -> dict | None:
    """``config.json`` beside the weights, when there is one."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{cfg} is not valid JSON ({err}).") from None


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------

IGNORED_SUFFIXES = ("position_ids",)  # a buffer older transformers files carry; we recompute it


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], layout: str,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.nn.Module:
    """Copy ``state`` into ``module``; every missing key, unexpected key or shape mismatch is reported.

    ``layout`` names what we detected (e.g. "diffusers UNet", "open_clip"), so the message says what we
    thought the file was.
    """
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    expected = {k: v.shape for k, v in module.state_dict().items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong_shape:
        raise WeightsError(_mismatch_report(type(module).__name__, layout, missing, unexpected, wrong_shape,
                                            state, expected))
    module.load_state_dict(state, strict=False, assign=False)
    return module.to(device=device, dtype=dtype)


def _mismatch_report(name, layout, missing, unexpected, wrong_shape, state, expected, show=8) -> str:
    def listing(keys, describe=str):
        extra = f" ... and {len(keys) - show} more" if len(keys) > show else ""
        return ", ".join(describe(k) for k in keys[:show]) + extra

    lines = [f"these weights do not fit {name} (detected layout: {layout}). Is this the right model file?"]
    if missing:
        lines.append(f"  missing {len(missing)} keys: {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} keys: {listing(unexpected)}")
    if wrong_shape:
        lines.append("  wrong shapes: " + listing(
            wrong_shape, lambda k: f"{k} {tuple(state[k].shape)} != expected {tuple(expected[k])}"))
    return "\n".join(lines)


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write safetensors atomically (temporary file, then rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
