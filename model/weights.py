"""Reading public checkpoints into our modules, strictly.

Every layout people actually have on disk (diffusers / transformers folders, the original single-file
Stable Diffusion checkpoint, open_clip state dicts) is turned into the key names our modules already use,
by a short set of rules. Loading then checks every key and every shape, and a problem is reported by name
together with the layout we detected, never as a bare traceback from deep inside torch.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.clip import CONFIGS, CLIPConfig, CLIPModel, CLIPTextModel, TextConfig, VisionConfig
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel, UNetConfig
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL, VAEConfig


class WeightsError(ValueError):
    """A weights path or file that cannot be used; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Reading raw state dicts
# ----------------------------------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike, only_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Read one weights file: safetensors, or a torch pickle through ``weights_only=True`` only.

    ``only_prefix``: when a safetensors file has keys that start with it, read just those (one model out of a
    4 GB single-file checkpoint); otherwise, and for pickles, read everything. A pickle in torch's zip format
    (every .ckpt since torch 1.6, SD-1.5's included) is memory-mapped, so each model's loader only pages in
    the tensors it keeps, rather than reading all 4 GB once per model.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}. Check the path you passed.")
    if path.is_dir():
        raise WeightsError(f"expected a weights file but got a folder: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, only_prefix)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise WeightsError(
        f"unknown weights format '{path.suffix}' for {path}: use .safetensors (preferred) or a torch "
        f"pickle ({', '.join(PICKLE_SUFFIXES)})."
    )


def _read_safetensors(path: Path, only_prefix: str | None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), "pt") as file:
            keys = list(file.keys())
            wanted = [k for k in keys if only_prefix and k.startswith(only_prefix)] or keys
            return {k: file.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({err}). It may be truncated or corrupt: "
            "download it again."
        ) from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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


# ---- CLIP loading ----
# SD-1.5's text encoder and the scorers' CLIPModel (FACTS.md §2 "Public file layouts", §3). The transformers
# layout loads as it is; the original single-file layout only needs its prefix removed; open_clip is renamed
# by the short rule set below. The config is read off the tensor shapes.


TRANSFORMERS_CLIP_FILES = ["model.safetensors", "pytorch_model.bin"]
OPEN_CLIP_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]  # as laion's CLIP-H repo has
SD_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# transformers' defaults for the two values the shapes cannot tell; a config.json may omit a default value.
HF_TEXT_DEFAULTS = {"num_attention_heads": 8, "hidden_act": "quick_gelu"}
HF_VISION_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu"}

# open_clip -> transformers names (FACTS.md §3). Keys are renamed by prefix, then inside the blocks; the
# fused attention input projection is split into q, k, v, and the two projections are transposed.
OPEN_CLIP_PREFIXES = {
    "token_embedding.": "text_model.embeddings.token_embedding.",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "transformer.resblocks.": "text_model.encoder.layers.",
    "ln_final.": "text_model.final_layer_norm.",
    "visual.conv1.": "vision_model.embeddings.patch_embedding.",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.": "vision_model.pre_layrnorm.",
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
    "visual.ln_post.": "vision_model.post_layernorm.",
}
OPEN_CLIP_BLOCK_PARTS = {
    ".ln_1.": ".layer_norm1.",
    ".ln_2.": ".layer_norm2.",
    ".mlp.c_fc.": ".mlp.fc1.",
    ".mlp.c_proj.": ".mlp.fc2.",
    ".attn.out_proj.": ".self_attn.out_proj.",
}
OPEN_CLIP_PROJECTIONS = {  # stored [in, out] and applied as x @ P; transformers' Linear holds P.T
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}


def load_text_encoder(path: str | os.PathLike, dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> CLIPTextModel:
    """SD-1.5's CLIP text encoder from any public layout (FACTS.md §2 "Public file layouts").

    ``path``: an SD-1.5 diffusers folder, its ``text_encoder/`` subfolder, the ``model.safetensors`` in it, or
    an original single-file checkpoint (.safetensors, or a .ckpt pickle) holding the encoder under
    ``cond_stage_model.transformer.``. ``model.layout`` records which layout was found.
    """
    path = Path(path)
    if (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    state, hf_config = _read_weights(path, TRANSFORMERS_CLIP_FILES, "text encoder", SD_TEXT_ENCODER_PREFIX)
    if any(k.startswith(SD_TEXT_ENCODER_PREFIX) for k in state):
        layout, hf_config = "sd-single-file", None
        state = with_prefix(state, SD_TEXT_ENCODER_PREFIX)
    else:
        layout = "transformers"
    if not any(k.startswith("text_model.") for k in state):
        # transformers >= 5 and the oldest single files store the tower without its "text_model." wrapper
        state = {"text_model." + k: v for k, v in state.items()}
    cfg = infer_text_config(state, hf_config, layout)
    model = load_strict(_empty(CLIPTextModel, cfg, device), state, layout, dtype, device)
    model.layout = layout
    return model


def load_clip(path: str | os.PathLike, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> CLIPModel:
    """A CLIP image+text model, the body of every scorer (FACTS.md §3).

    ``path``: a transformers CLIPModel folder or weights file (laion CLIP-H, PickScore_v1, Denscore), or an
    open_clip state dict (HPSv2: a .pt/.bin pickle holding ``state_dict``, or safetensors; keys may carry
    ``module.``). ``model.layout`` is "transformers" or "open_clip"; the scorer picks HPSv2's padded
    preprocessing by it.
    """
    state, hf_config = _read_weights(Path(path), TRANSFORMERS_CLIP_FILES + OPEN_CLIP_FILES, "CLIP")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = with_prefix(state, "module.")
    if any(k.startswith(("visual.", "transformer.resblocks.")) for k in state):
        layout, hf_config = "open_clip", None
        state = open_clip_to_transformers(state)
    else:
        layout = "transformers"
    cfg = infer_clip_config(state, hf_config, layout)
    model = load_strict(_empty(CLIPModel, cfg, device), state, layout, dtype, device)
    model.layout = layout
    return model


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict to transformers' keys; unknown keys pass through unchanged."""
    converted = {}
    for key, tensor in state.items():
        if key in OPEN_CLIP_PROJECTIONS:
            converted[OPEN_CLIP_PROJECTIONS[key]] = tensor.T
            continue
        key = _rename_open_clip_key(key)
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            block, kind = key.rsplit(".attn.in_proj_", 1)  # kind is "weight" or "bias"
            for name, part in zip("qkv", tensor.chunk(3)):  # [3W, ...] -> three [W, ...], in q, k, v order
                converted[f"{block}.self_attn.{name}_proj.{kind}"] = part
        else:
            converted[key] = tensor
    return converted


def _rename_open_clip_key(key: str) -> str:
    for old, new in OPEN_CLIP_PREFIXES.items():
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in OPEN_CLIP_BLOCK_PARTS.items():
        key = key.replace(old, new)
    return key


def infer_text_config(state: dict[str, torch.Tensor], hf_config: dict | None = None,
                      layout: str = "transformers") -> TextConfig:
    """The text tower's config from the ``text_model.*`` tensor shapes (heads and activation: see
    :func:`_tower_config`). ``hf_config`` is the text part of a transformers config.json."""
    vocab_size, width = _shape(state, "text_model.embeddings.token_embedding.weight", layout)
    shapes = dict(width=width, vocab_size=vocab_size,
                  max_positions=_shape(state, "text_model.embeddings.position_embedding.weight", layout)[0],
                  mlp=_shape(state, "text_model.encoder.layers.0.mlp.fc1.weight", layout)[0],
                  layers=_count_layers(state, "text_model.encoder.layers."))
    return _tower_config(TextConfig, "text", shapes, hf_config, HF_TEXT_DEFAULTS, layout)


def infer_vision_config(state: dict[str, torch.Tensor], hf_config: dict | None = None,
                        layout: str = "transformers") -> VisionConfig:
    """The vision tower's config from the ``vision_model.*`` tensor shapes; 257 positions at patch 14 -> 224 px."""
    width, _, patch, _ = _shape(state, "vision_model.embeddings.patch_embedding.weight", layout)
    positions = _shape(state, "vision_model.embeddings.position_embedding.weight", layout)[0]
    shapes = dict(width=width, patch_size=patch, image_size=patch * math.isqrt(positions - 1),
                  mlp=_shape(state, "vision_model.encoder.layers.0.mlp.fc1.weight", layout)[0],
                  layers=_count_layers(state, "vision_model.encoder.layers."))
    return _tower_config(VisionConfig, "vision", shapes, hf_config, HF_VISION_DEFAULTS, layout)


def infer_clip_config(state: dict[str, torch.Tensor], hf_config: dict | None = None,
                      layout: str = "transformers") -> CLIPConfig:
    """A CLIPModel config from transformers-layout shapes, with a CLIPModel config.json when there is one."""
    text_json = vision_json = None
    if hf_config is not None:  # very old files call the sections "..._config_dict"
        text_json = hf_config.get("text_config") or hf_config.get("text_config_dict") or {}
        vision_json = hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {}
    return CLIPConfig(text=infer_text_config(state, text_json, layout),
                      vision=infer_vision_config(state, vision_json, layout),
                      projection_dim=_shape(state, "text_projection.weight", layout)[0])


def _tower_config(config_class, tower: str, shapes: dict, hf_config: dict | None, hf_defaults: dict, layout: str):
    """Add the two things the shapes cannot show, the head count and the activation.

    They come from config.json when there is one; else from the public config (CONFIGS) with exactly these
    shapes, which is how ViT-L/14 gets quick_gelu and ViT-H/14 gets GELU and its 80-wide vision heads; else
    from open_clip's own defaults, 64-wide heads and exact GELU.
    """
    if hf_config is not None:
        heads = hf_config.get("num_attention_heads", hf_defaults["num_attention_heads"])
        act = hf_config.get("hidden_act", hf_defaults["hidden_act"])
    else:
        known = [getattr(cfg, tower) for cfg in CONFIGS.values()]
        match = next((cfg for cfg in known if all(getattr(cfg, f) == v for f, v in shapes.items())), None)
        heads, act = (match.heads, match.act) if match else (shapes["width"] // 64, "gelu")
    try:
        return config_class(**shapes, heads=heads, act=act)
    except ValueError as err:
        raise WeightsError(f"cannot build a CLIP {tower} tower from these weights (detected layout: {layout}): "
                           f"{err}. Check config.json.") from None


def _shape(state: dict[str, torch.Tensor], key: str, layout: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"these weights hold no '{key}' (detected layout: {layout}), so they are not the CLIP "
                           "model expected here. Is this the right file?")
    return tuple(state[key].shape)


def _count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    """1 + the largest N among keys ``prefix + "N."``."""
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _read_weights(path: Path, names: list[str], what: str,
                  single_file_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict at ``path`` (a weights file, or a folder holding one of ``names``) and the config.json
    beside it, if any. Of an original single-file safetensors checkpoint only the keys under
    ``single_file_prefix`` are read."""
    if path.is_dir():
        path = find_file(path, names, what)
    return read_state_dict(path, single_file_prefix), read_config(path.parent)


def _empty(model_class, cfg, device) -> torch.nn.Module:
    """The model with uninitialised storage: loading overwrites every tensor, so a random init would be wasted."""
    with torch.device("meta"):
        model = model_class(cfg)
    return model.to_empty(device=device or "cpu")


# ---- SD-1.5 UNet / VAE loading ----
# FACTS.md §2 "Public file layouts". ``load_unet`` / ``load_vae`` accept a diffusers SD-1.5 folder, its
# ``unet/`` or ``vae/`` subfolder, the weights file itself, or the original single-file checkpoint. The
# original (ldm) names are turned into diffusers names by the short rule sets below; the config comes from
# config.json when there is one, else from the tensor shapes.



DIFFUSERS_MODEL_FILES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                         "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]
SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                        "text_encoder": SD_TEXT_ENCODER_PREFIX}

# diffusers config options this SD-1.5 implementation has fixed, with the values it accepts. A config that
# sets any other value (SD-2's linear projections, SDXL's added embeddings, ...) is refused by name.
UNET_FIXED_OPTIONS = {
    "act_fn": ("silu",), "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "downsample_padding": (1,), "mid_block_scale_factor": (1,), "norm_eps": (1e-5,),
    "use_linear_projection": (False,), "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "mid_block_only_cross_attention": (None, False),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "class_embed_type": (None,),
    "num_class_embeds": (None,), "addition_embed_type": (None,), "encoder_hid_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
VAE_FIXED_OPTIONS = {
    "act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,),
    "use_quant_conv": (True,), "use_post_quant_conv": (True,), "mid_block_add_attention": (True,),
}


def detect_single_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an original single-file SD checkpoint (FACTS.md §2 layout 2): one file holding the
    models under ``model.diffusion_model.`` / ``first_stage_model.`` / ``cond_stage_model.transformer.``.

    A safetensors file is judged by its header alone; a pickle is unpickled, memory-mapped when it can be
    (see read_state_dict).
    """
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as file:
                keys = list(file.keys())
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path} is not a readable safetensors file ({err}). It may be truncated or "
                               "corrupt: download it again.") from None
    else:
        keys = list(read_state_dict(path))
    return _is_single_file(keys)


def _is_single_file(keys) -> bool:
    return any(k.startswith(tuple(SINGLE_FILE_PREFIXES.values())) for k in keys)


def load_unet(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              config: UNetConfig | str | None = None) -> UNet2DConditionModel:
    """SD-1.5's UNet from a diffusers folder / ``unet/`` subfolder / weights file, or an original checkpoint.

    ``config`` (a UNetConfig or a name in ``model.unet.CONFIGS``) overrides config.json and the shapes; it is
    only needed for a file without config.json whose head count or GroupNorm groups are not SD-1.5's
    (8 and 32), since no tensor shape shows those two.
    """
    state, hf_config, layout = _read_component(Path(path), "unet")
    if layout == "diffusers" and "input_blocks.0.0.weight" in state:  # a bare ldm UNet, without prefix
        layout, hf_config = "stand-alone original (ldm)", None
    if layout != "diffusers":
        state = unet_from_ldm(state)
    _expect_model(state, "time_embedding.linear_1.weight", "a UNet", path)
    if isinstance(config, str):
        config = UNET_CONFIGS[config]
    cfg = config or (unet_config_from_diffusers(hf_config) if hf_config else infer_unet_config(state))
    return load_strict(_empty(UNet2DConditionModel, cfg, device), state, f"{layout} UNet", dtype, device).eval()


def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             config: VAEConfig | str | None = None) -> AutoencoderKL:
    """SD-1.5's VAE from a diffusers folder / ``vae/`` subfolder / weights file, an original checkpoint, or a
    stand-alone ldm VAE file (``vae-ft-mse-840000-ema-pruned.safetensors``). Legacy attention names
    (query/key/value/proj_attn) and 1×1-conv attention weights are accepted. ``config``: as in load_unet."""
    state, hf_config, layout = _read_component(Path(path), "vae")
    if layout == "diffusers" and any(k.startswith("encoder.down.") for k in state):
        layout, hf_config = "stand-alone original (ldm)", None
    if layout != "diffusers":
        state = vae_from_ldm(state)
    state = modern_vae_attention(state)
    _expect_model(state, "encoder.conv_in.weight", "a VAE", path)
    if isinstance(config, str):
        config = VAE_CONFIGS[config]
    cfg = config or (vae_config_from_diffusers(hf_config) if hf_config else infer_vae_config(state))
    return load_strict(_empty(AutoencoderKL, cfg, device), state, f"{layout} VAE", dtype, device).eval()


def _read_component(path: Path, component: str) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict, diffusers config.json or None, layout) for ``component`` ("unet" or "vae") at ``path``.

    An original single-file checkpoint gives just that model's entries, prefix removed, layout "original
    single-file".
    """
    if (path / component).is_dir():
        path = path / component
    prefix = SINGLE_FILE_PREFIXES[component]
    state, hf_config = _read_weights(path, DIFFUSERS_MODEL_FILES, component.upper(), prefix)
    if not _is_single_file(state):
        expected_class = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}[component]
        if hf_config is not None and hf_config.get("_class_name", expected_class) != expected_class:
            raise WeightsError(f"{path} holds {hf_config['_class_name']} (its config.json says so), not the "
                               f"{expected_class} expected here. Pass the {component}/ folder.")
        return state, hf_config, "diffusers"
    state = with_prefix(state, prefix)
    if not state:
        raise WeightsError(f"{path} is an original single-file checkpoint without {component.upper()} weights "
                           f"(no '{prefix}*' keys). Pass a checkpoint that has them, or a diffusers folder.")
    return state, None, "original single-file"


def _expect_model(state: dict[str, torch.Tensor], key: str, wanted: str, path) -> None:
    """A clear 'wrong model' error before shape inference trips over a missing key."""
    if key in state:
        return
    found = ("a UNet" if "time_embedding.linear_1.weight" in state
             else "a VAE" if "encoder.conv_in.weight" in state
             else "a CLIP model" if any(k.startswith(("text_model.", "vision_model.")) for k in state)
             else "no model we recognise")
    raise WeightsError(f"{path} holds {found}, not {wanted}. Pass the right folder or file (for a diffusers "
                       "pipeline folder: its root, or its unet/ or vae/ subfolder).")


# ldm -> diffusers, UNet (FACTS.md §2 "UNet rules"). Whole-prefix renames first; the numbered input/output
# blocks are then placed by arithmetic, since each level holds ``stride`` = layers_per_block + 1 entries.
LDM_UNET_PREFIXES = {
    "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
    "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
    "middle_block.2.": "mid_block.resnets.1.",
}
LDM_RESNET_PARTS = {
    "in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut.",
}


def unet_from_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout UNet state dict (``model.diffusion_model.`` removed) to diffusers keys.

    No tensor changes shape. Works for any number of levels and layers per block, so tiny models convert too.
    """
    levels = 1 + sum(k.startswith("input_blocks.") and k.endswith(".op.weight") for k in state)
    stride = _count_layers(state, "output_blocks.") // levels  # up blocks: layers_per_block + 1 ResNets each
    return {_ldm_unet_key(key, stride): tensor for key, tensor in state.items()}


def _ldm_unet_key(key: str, stride: int) -> str:
    for old, new in LDM_UNET_PREFIXES.items():
        if key.startswith(old):
            key = new + key[len(old):]
            break
    match = re.match(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if match:
        kind, i, j, rest = match[1], int(match[2]), int(match[3]), match[4]
        if kind == "input":  # entry 0 is conv_in; then per level: ResNets, then the downsample
            level, index = divmod(i - 1, stride)
            block = f"down_blocks.{level}"
            if rest.startswith("op."):
                return f"{block}.downsamplers.0.conv.{rest[3:]}"
        else:  # per level: ResNets, the last one followed by the upsample conv
            level, index = divmod(i, stride)
            block = f"up_blocks.{level}"
            if j > 0 and rest.startswith("conv."):
                return f"{block}.upsamplers.0.{rest}"
        key = f"{block}.resnets.{index}.{rest}" if j == 0 else f"{block}.attentions.{index}.{rest}"
    for old, new in LDM_RESNET_PARTS.items():
        key = key.replace(f".{old}", f".{new}")
    return key


# ldm -> diffusers, VAE (FACTS.md §2 "VAE rules"), as (pattern, replacement) pairs for re.sub. The decoder's
# levels are numbered from the finest in ldm but from the coarsest in diffusers; vae_from_ldm flips them first.
LDM_VAE_RENAMES = [
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
]
# Old names of the VAE's mid attention (ldm's, and diffusers' before 0.14) -> today's diffusers names.
VAE_ATTENTION_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm",
                       "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_from_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout VAE state dict (``first_stage_model.`` removed) to diffusers keys; the mid
    attention still has old names, which :func:`modern_vae_attention` handles."""
    levels = _count_layers(state, "decoder.up.")
    converted = {}
    for key, tensor in state.items():
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
        for pattern, replacement in LDM_VAE_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = tensor
    return converted


def modern_vae_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's names for the mid attention's tensors, and its ldm 1×1-conv weights [C,C,1,1] squeezed to
    Linear weights [C,C]. Keys already in today's names pass through unchanged."""
    converted = {}
    for key, tensor in state.items():
        match = re.match(r"(.*\.mid_block\.attentions\.0\.)(\w+)\.(weight|bias)$", key)
        if match and match[2] in VAE_ATTENTION_NAMES:
            key = f"{match[1]}{VAE_ATTENTION_NAMES[match[2]]}.{match[3]}"
            if tensor.ndim == 4:
                tensor = tensor.flatten(1)  # [C, C, 1, 1] -> [C, C]
        converted[key] = tensor
    return converted


# diffusers config.json <-> our configs.
def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel config.json; unsupported options are refused."""
    _refuse_other_options(config, UNET_FIXED_OPTIONS, "UNet")
    down = config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    known_down = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in known_down for t in down):
        raise WeightsError(f"unsupported UNet down_block_types {down}: only {', '.join(known_down)} are supported")
    cross_attention = tuple(known_down[t] for t in down)
    mirrored = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross_attention)]
    if list(up) != mirrored:
        raise WeightsError(f"unsupported UNet up_block_types {up}: expected the mirror of the down path, {mirrored}")
    # diffusers' SD-1.x configs say "attention_head_dim" but mean the head COUNT (FACTS.md §2).
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    try:
        return UNetConfig(
            block_out_channels=tuple(config.get("block_out_channels", (320, 640, 1280, 1280))),
            cross_attention=cross_attention,
            layers_per_block=_uniform(config.get("layers_per_block", 2), "layers_per_block"),
            transformer_layers=_uniform(config.get("transformer_layers_per_block", 1), "transformer_layers_per_block"),
            num_heads=_uniform(heads, "attention_head_dim"),
            cross_attention_dim=_uniform(config.get("cross_attention_dim", 1280), "cross_attention_dim"),
            in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
            norm_groups=config.get("norm_num_groups", 32), dropout=config.get("dropout", 0.0),
            sample_size=config.get("sample_size") or 64)
    except ValueError as err:
        raise WeightsError(f"cannot build a UNet from this config.json: {err}") from None


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """A config.json that diffusers' ``UNet2DConditionModel.from_pretrained`` reads as this very UNet."""
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": cfg.sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.cross_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cfg.cross_attention)],
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "transformer_layers_per_block": cfg.transformer_layers, "attention_head_dim": cfg.num_heads,
        "cross_attention_dim": cfg.cross_attention_dim, "norm_num_groups": cfg.norm_groups,
        "dropout": cfg.dropout, **{option: accepted[0] for option, accepted in UNET_FIXED_OPTIONS.items()},
    }


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """Our VAEConfig from a diffusers AutoencoderKL config.json; unsupported options are refused."""
    _refuse_other_options(config, VAE_FIXED_OPTIONS, "VAE")
    channels = tuple(config.get("block_out_channels", (64,)))
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(config.get(name, [block])) != [block] * len(channels):
            raise WeightsError(f"unsupported VAE {name} {config.get(name)}: expected {block} at every level")
    try:
        return VAEConfig(
            block_out_channels=channels, layers_per_block=config.get("layers_per_block", 1),
            in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 4), norm_groups=config.get("norm_num_groups", 32),
            scaling_factor=config.get("scaling_factor", 0.18215), sample_size=config.get("sample_size", 512))
    except ValueError as err:
        raise WeightsError(f"cannot build a VAE from this config.json: {err}") from None


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """A config.json that diffusers' ``AutoencoderKL.from_pretrained`` reads as this very VAE."""
    levels = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_groups, "scaling_factor": cfg.scaling_factor, "sample_size": cfg.sample_size,
        **{option: accepted[0] for option, accepted in VAE_FIXED_OPTIONS.items()},
    }


def _refuse_other_options(config: dict, fixed: dict, what: str) -> None:
    for option, accepted in fixed.items():
        if option in config and config[option] not in accepted:
            raise WeightsError(f"this {what}'s config.json sets {option}={config[option]!r}, which this SD-1.5 "
                               f"implementation does not support (it needs {accepted[0]!r}).")


def _uniform(value, name: str):
    """diffusers allows one value per block; we support the same value everywhere."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise WeightsError(f"config.json sets {name}={value}; only one value for every block is supported")
        return value[0]
    return value


# Config from tensor shapes, for files without config.json. Heads and GroupNorm groups leave no trace in
# the shapes; SD-1.5's 8 and 32 are assumed (load_unet's ``config`` argument overrides).
def infer_unet_config(state: dict[str, torch.Tensor]) -> UNetConfig:
    levels = _count_layers(state, "down_blocks.")
    try:
        return UNetConfig(
            block_out_channels=tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                     for i in range(levels)),
            cross_attention=tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in state for i in range(levels)),
            layers_per_block=_count_layers(state, "down_blocks.0.resnets."),
            transformer_layers=_count_layers(state, "mid_block.attentions.0.transformer_blocks."),
            cross_attention_dim=state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            in_channels=state["conv_in.weight"].shape[1], out_channels=state["conv_out.weight"].shape[0])
    except (KeyError, ValueError) as err:
        raise WeightsError(f"cannot read a UNet config off these weights ({err}); they are incomplete or not a "
                           "UNet. Is this the right file?") from None


def infer_vae_config(state: dict[str, torch.Tensor]) -> VAEConfig:
    levels = _count_layers(state, "encoder.down_blocks.")
    try:
        return VAEConfig(
            block_out_channels=tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                     for i in range(levels)),
            layers_per_block=_count_layers(state, "encoder.down_blocks.0.resnets."),
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            latent_channels=state["post_quant_conv.weight"].shape[0])
    except (KeyError, ValueError) as err:
        raise WeightsError(f"cannot read a VAE config off these weights ({err}); they are incomplete or not a "
                           "VAE. Is this the right file?") from None


# Writing back out in the diffusers layout, so a fine-tuned model works in other tools.
def save_unet_diffusers(unet: UNet2DConditionModel, folder: str | os.PathLike) -> None:
    """Write ``diffusion_pytorch_model.safetensors`` + ``config.json`` (a diffusers ``unet/`` folder).
    Merge any LoRA into the weights first: the file must hold plain UNet keys."""
    _save_diffusers(unet, folder, unet_config_to_diffusers(unet.config))


def save_vae_diffusers(vae: AutoencoderKL, folder: str | os.PathLike) -> None:
    """Write ``diffusion_pytorch_model.safetensors`` + ``config.json`` (a diffusers ``vae/`` folder)."""
    _save_diffusers(vae, folder, vae_config_to_diffusers(vae.config))


def _save_diffusers(model: torch.nn.Module, folder: str | os.PathLike, config: dict) -> None:
    folder = Path(folder)
    with torch.device("meta"):
        plain_keys = set(type(model)(model.config).state_dict())
    state = model.state_dict()
    if set(state) != plain_keys:
        extra = sorted(set(state) - plain_keys)[:3]
        raise WeightsError(f"this {type(model).__name__} holds keys a plain one has not ({', '.join(extra)} ...): "
                           "merge LoRA (model/lora.py) before saving in the diffusers layout.")
    try:
        save_state_dict(state, folder / "diffusion_pytorch_model.safetensors")
        write_json(folder / "config.json", config)
    except OSError as err:
        raise WeightsError(f"cannot write to {folder} ({err}). Pick a folder you can write to.") from None


class Pipeline(NamedTuple):
    tokenizer: object  # model.tokenizer.CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL

    @property
    def default_size(self) -> int:
        """Image side in pixels the UNet was trained at (512 for SD-1.5)."""
        return self.unet.config.sample_size * self.vae.downsample_factor


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> Pipeline:
    """Everything SD-1.5 sampling needs, from a diffusers pipeline folder or an original single-file checkpoint.

    A folder must hold ``tokenizer/``, ``text_encoder/``, ``unet/`` and ``vae/``. A single file carries no
    tokenizer; SD-1.5's is CLIP's own vocabulary, which this project bundles.
    """
    from model.tokenizer import CLIPTokenizer  # here, not at the top: model.tokenizer imports this module

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"SD-1.5 weights not found: {path}. Pass a diffusers SD-1.5 folder (with unet/, vae/, "
                           "text_encoder/, tokenizer/) or an original single-file checkpoint (.safetensors/.ckpt).")
    if path.is_file() and not detect_single_file(path):
        raise WeightsError(f"{path} is not a whole SD-1.5 checkpoint (it has no model.diffusion_model.* UNet keys). "
                           "Pass the diffusers folder that holds it, or the original single-file checkpoint.")
    tokenizer = CLIPTokenizer() if path.is_file() else CLIPTokenizer.from_pretrained(path / "tokenizer")
    pipeline = Pipeline(tokenizer, load_text_encoder(path, dtype, device), load_unet(path, dtype, device),
                        load_vae(path, dtype, device))
    if pipeline.text_encoder.hidden_size != pipeline.unet.config.cross_attention_dim:
        raise WeightsError(f"{path} mixes models that do not fit together: the text encoder gives "
                           f"{pipeline.text_encoder.hidden_size}-wide states but the UNet reads "
                           f"{pipeline.unet.config.cross_attention_dim}-wide context.")
    return pipeline


# ---- Writing CLIP models and pipeline folders in the public layouts ----

def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically, like save_state_dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def text_config_json(cfg) -> dict:
    """transformers' CLIPTextConfig fields for our TextConfig."""
    return {"hidden_size": cfg.width, "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "max_position_embeddings": cfg.max_positions,
            "vocab_size": cfg.vocab_size, "hidden_act": cfg.act, "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": cfg.eot_id, "pad_token_id": 1}


def save_text_encoder(text_model, folder: Path) -> None:
    """An SD-style ``text_encoder/`` folder (transformers CLIPTextModel layout) for a CLIPTextTransformer."""
    state = {f"text_model.{key}": value for key, value in text_model.state_dict().items()}
    save_state_dict(state, folder / "model.safetensors")
    write_json(folder / "config.json", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                        **text_config_json(text_model.config)})


def save_clip_model(model: CLIPModel, folder: Path) -> None:
    """A transformers CLIPModel folder (model.safetensors + config.json), the layout load_clip reads."""
    vision = model.config.vision
    save_state_dict(model.state_dict(), folder / "model.safetensors")
    write_json(folder / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": model.config.projection_dim,
        "logit_scale_init_value": math.log(1 / 0.07), "text_config": text_config_json(model.config.text),
        "vision_config": {"hidden_size": vision.width, "intermediate_size": vision.mlp,
                          "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads,
                          "patch_size": vision.patch_size, "image_size": vision.image_size,
                          "hidden_act": vision.act, "layer_norm_eps": 1e-5, "num_channels": 3}})


def write_pipeline_files(folder: Path) -> None:
    """model_index.json and the SD-1.5 scheduler config (FACTS.md §2) that make a diffusers pipeline folder."""
    write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"})
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
