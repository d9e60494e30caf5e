"""Reading public checkpoints into our modules, strictly, and writing them back out.

A weights path may be a diffusers / transformers folder, the original single-file Stable Diffusion checkpoint
or an open_clip state dict. This module reads the files (safetensors, or torch pickles through
``weights_only=True`` only), hands foreign key names to the rules in ``model/convert.py``, builds the model
and loads it strictly: every key and every shape is checked, and a problem is reported by name together
with the layout we detected, never as a bare traceback from deep inside torch. The writers produce the
diffusers / transformers layouts, so a fine-tuned model also works in other tools.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.clip import CLIPModel, CLIPTextModel, CLIPTextTransformer
from model.convert import (SINGLE_FILE_PREFIXES, Layout, WeightsError, clip_config_to_transformers,
                           infer_clip_config, infer_text_config, infer_unet_config, infer_vae_config, is_open_clip,
                           is_single_file, modern_vae_attention, open_clip_to_transformers,
                           text_config_to_transformers, unet_config_from_diffusers, unet_config_to_diffusers,
                           unet_from_ldm, vae_config_from_diffusers, vae_config_to_diffusers, vae_from_ldm)
from model.meta import empty_model
from model.scheduler import SD15_DDIM_CONFIG, read_scheduler_config
from model.tokenizer import CLIPTokenizer, load_tokenizer
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel, UNetConfig
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL, VAEConfig

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TRANSFORMERS_CLIP_FILES = ["model.safetensors", "pytorch_model.bin",
                           "model.fp16.safetensors", "pytorch_model.fp16.bin"]  # fp16: a variant="fp16" download
OPEN_CLIP_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]  # as laion's CLIP-H repo has
DIFFUSERS_MODEL_FILES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                         "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]
IGNORED_SUFFIXES = ("position_ids",)  # a buffer older transformers files carry; we recompute it


# ---- Reading raw state dicts ----

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
    raise WeightsError(f"unknown weights format '{path.suffix}' for {path}: use .safetensors (preferred) or a torch "
                       f"pickle ({', '.join(PICKLE_SUFFIXES)}).")


@contextmanager
def _open_safetensors(path: Path):
    """``safe_open``, with a truncated or corrupt file reported as a WeightsError."""
    try:
        with safe_open(str(path), "pt") as file:
            yield file
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err}). It may be truncated or corrupt: "
                           "download it again.") from None


def _read_safetensors(path: Path, only_prefix: str | None) -> dict[str, torch.Tensor]:
    with _open_safetensors(path) as file:
        keys = list(file.keys())
        wanted = [k for k in keys if only_prefix and k.startswith(only_prefix)] or keys
        return {k: file.get_tensor(k) for k in wanted}


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
    raise WeightsError(f"no {what} weights in {folder}: expected one of {', '.join(names)}. Pass the folder that "
                       "holds them, or the weights file itself.")


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


def _read_weights(path: Path, names: list[str], what: str,
                  single_file_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict at ``path`` (a weights file, or a folder holding one of ``names``) and the config.json
    beside it, if any. Of an original single-file safetensors checkpoint only the keys under
    ``single_file_prefix`` are read."""
    if path.is_dir():
        path = find_file(path, names, what)
    return read_state_dict(path, single_file_prefix), read_config(path.parent)


def detect_single_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an original single-file SD checkpoint: one file holding the models under
    ``model.diffusion_model.`` / ``first_stage_model.`` / ``cond_stage_model.transformer.``.

    A safetensors file is judged by its header alone; a pickle is unpickled, memory-mapped when it can be
    (see read_state_dict).
    """
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix != ".safetensors":
        return is_single_file(read_state_dict(path))
    with _open_safetensors(path) as file:
        return is_single_file(file.keys())


# ---- Strict loading ----

def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], model_name: str,
                     layout: Layout, source: str | None = None, show: int = 8) -> None:
    """Raise a WeightsError naming every missing key, unexpected key and wrong shape of ``state`` against
    the ``expected`` shapes; ``layout`` (and ``source``, e.g. the file) say what we thought the file was."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong_shape):
        return

    def listing(keys, describe=str):
        extra = f" ... and {len(keys) - show} more" if len(keys) > show else ""
        return ", ".join(describe(k) for k in keys[:show]) + extra

    origin = f"detected layout: {layout}" + (f", from {source}" if source else "")
    lines = [f"these weights do not fit {model_name} ({origin}). Is this the right model file?"]
    if missing:
        lines.append(f"  missing {len(missing)} keys: {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} keys: {listing(unexpected)}")
    if wrong_shape:
        lines.append("  wrong shapes: " + listing(
            wrong_shape, lambda k: f"{k} {tuple(state[k].shape)} != expected {tuple(expected[k])}"))
    raise WeightsError("\n".join(lines))


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], layout: Layout,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.nn.Module:
    """Copy ``state`` into ``module`` after :func:`check_state_dict`; ``module.layout`` records ``layout``."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    expected = {k: v.shape for k, v in module.state_dict().items() if not k.endswith(IGNORED_SUFFIXES)}
    check_state_dict(state, expected, type(module).__name__, layout)
    module.load_state_dict(state, strict=False, assign=False)
    module.layout = layout
    return module.to(device=device, dtype=dtype)


# ---- Building CLIP models ----

def load_text_encoder(path: str | os.PathLike, dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> CLIPTextModel:
    """SD-1.5's CLIP text encoder from any public layout.

    ``path``: an SD-1.5 diffusers folder, its ``text_encoder/`` subfolder, the ``model.safetensors`` in it, or
    an original single-file checkpoint (.safetensors, or a .ckpt pickle) holding the encoder under
    ``cond_stage_model.transformer.``. ``model.layout`` records which layout was found.
    """
    path = Path(path)
    if (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    prefix = SINGLE_FILE_PREFIXES["text_encoder"]
    state, hf_config = _read_weights(path, TRANSFORMERS_CLIP_FILES, "text encoder", prefix)
    layout = Layout.TRANSFORMERS
    if any(k.startswith(prefix) for k in state):
        layout, hf_config = Layout.SINGLE_FILE, None
        state = with_prefix(state, prefix)
    if not any(k.startswith("text_model.") for k in state):
        # transformers >= 5 and the oldest single files store the tower without its "text_model." wrapper
        state = {"text_model." + k: v for k, v in state.items()}
    cfg = infer_text_config(state, hf_config, layout)
    return load_strict(empty_model(lambda: CLIPTextModel(cfg), device), state, layout, dtype, device)


def load_clip(path: str | os.PathLike, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> CLIPModel:
    """A CLIP image+text model, the body of every scorer.

    ``path``: a transformers CLIPModel folder or weights file (laion CLIP-H, PickScore_v1, Denscore), or an
    open_clip state dict (HPSv2: a .pt/.bin pickle holding ``state_dict``, or safetensors; keys may carry
    ``module.``). ``model.layout`` is Layout.TRANSFORMERS or Layout.OPEN_CLIP; the scorer picks HPSv2's
    padded preprocessing by it.
    """
    state, hf_config = _read_weights(Path(path), TRANSFORMERS_CLIP_FILES + OPEN_CLIP_FILES, "CLIP")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = with_prefix(state, "module.")
    layout = Layout.TRANSFORMERS
    if is_open_clip(state):
        layout, hf_config = Layout.OPEN_CLIP, None
        state = open_clip_to_transformers(state)
    cfg = infer_clip_config(state, hf_config, layout)
    return load_strict(empty_model(lambda: CLIPModel(cfg), device), state, layout, dtype, device)


# ---- Building the SD-1.5 UNet and VAE ----
# Each accepts a diffusers SD-1.5 folder, its unet/ or vae/ subfolder, the weights file itself, or the
# original single-file checkpoint; the config comes from config.json when there is one, else from the shapes.

def load_unet(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              config: UNetConfig | str | None = None) -> UNet2DConditionModel:
    """SD-1.5's UNet from a diffusers folder / ``unet/`` subfolder / weights file, or an original checkpoint.

    ``config`` (a UNetConfig or a name in ``model.unet.CONFIGS``) overrides config.json and the shapes; it is
    only needed for a file without config.json whose head count or GroupNorm groups are not SD-1.5's
    (8 and 32), since no tensor shape shows those two.
    """
    state, hf_config, layout = _read_component(Path(path), "unet")
    if layout is not Layout.DIFFUSERS:
        state = unet_from_ldm(state)
    _expect_model(state, "time_embedding.linear_1.weight", "a UNet", path)
    cfg = UNET_CONFIGS[config] if isinstance(config, str) else config
    cfg = cfg or (unet_config_from_diffusers(hf_config) if hf_config else infer_unet_config(state))
    return load_strict(empty_model(lambda: UNet2DConditionModel(cfg), device), state, layout, dtype, device).eval()


def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             config: VAEConfig | str | None = None) -> AutoencoderKL:
    """SD-1.5's VAE from a diffusers folder / ``vae/`` subfolder / weights file, an original checkpoint, or a
    stand-alone ldm VAE file (``vae-ft-mse-840000-ema-pruned.safetensors``). Legacy attention names
    (query/key/value/proj_attn) and 1×1-conv attention weights are accepted. ``config``: as in load_unet."""
    state, hf_config, layout = _read_component(Path(path), "vae")
    if layout is not Layout.DIFFUSERS:
        state = vae_from_ldm(state)
    state = modern_vae_attention(state)
    _expect_model(state, "encoder.conv_in.weight", "a VAE", path)
    cfg = VAE_CONFIGS[config] if isinstance(config, str) else config
    cfg = cfg or (vae_config_from_diffusers(hf_config) if hf_config else infer_vae_config(state))
    return load_strict(empty_model(lambda: AutoencoderKL(cfg), device), state, layout, dtype, device).eval()


# A key only the original (ldm) names have, per model: it tells a stand-alone ldm file from a diffusers one.
LDM_MARKERS = {"unet": "input_blocks.0.0.weight", "vae": "encoder.down.0.block.0.conv1.weight"}
DIFFUSERS_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def _read_component(path: Path, component: str) -> tuple[dict[str, torch.Tensor], dict | None, Layout]:
    """(state dict, diffusers config.json or None, layout) for ``component`` ("unet" or "vae") at ``path``.

    Of an original single-file checkpoint only that model's entries are kept, prefix removed.
    """
    if (path / component).is_dir():
        path = path / component
    prefix = SINGLE_FILE_PREFIXES[component]
    state, hf_config = _read_weights(path, DIFFUSERS_MODEL_FILES, component.upper(), prefix)
    if is_single_file(state):
        state = with_prefix(state, prefix)
        if not state:
            raise WeightsError(f"{path} is an original single-file checkpoint without {component.upper()} "
                               f"weights (no '{prefix}*' keys). Pass a checkpoint that has them, or a diffusers "
                               "folder.")
        return state, None, Layout.SINGLE_FILE
    expected_class = DIFFUSERS_CLASSES[component]
    if hf_config is not None and hf_config.get("_class_name", expected_class) != expected_class:
        raise WeightsError(f"{path} holds {hf_config['_class_name']} (its config.json says so), not the "
                           f"{expected_class} expected here. Pass the {component}/ folder.")
    if LDM_MARKERS[component] in state:
        return state, None, Layout.LDM
    return state, hf_config, Layout.DIFFUSERS


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


# ---- The whole pipeline ----

class Pipeline(NamedTuple):
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict | None = None  # the folder's scheduler_config.json; model/scheduler.py reads it

    @property
    def default_size(self) -> int:
        """Image side in pixels the UNet was trained at (512 for SD-1.5)."""
        return self.unet.config.sample_size * self.vae.downsample_factor


PIPELINE_PARTS = ("text_encoder", "unet", "vae")
PIPELINE_HINT = ("a diffusers SD-1.5 folder (with unet/, vae/, text_encoder/, tokenizer/) or an original single-file "
                 "checkpoint (.safetensors/.ckpt)")


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> Pipeline:
    """Everything SD-1.5 sampling needs, from a diffusers pipeline folder or an original single-file checkpoint.

    A folder holds ``text_encoder/``, ``unet/``, ``vae/`` and usually ``tokenizer/`` and ``scheduler/``; its
    files may be links (a Hugging Face cache snapshot). A single file carries no tokenizer; SD-1.5's is CLIP's
    own vocabulary, which this project bundles (see ``load_tokenizer``).
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"SD-1.5 weights not found: {path}. Pass {PIPELINE_HINT}.")
    if path.is_file() and not detect_single_file(path):
        raise WeightsError(f"{path} is not a whole SD-1.5 checkpoint (it has no model.diffusion_model.* UNet keys). "
                           "Pass the diffusers folder that holds it, or the original single-file checkpoint.")
    missing = [part + "/" for part in PIPELINE_PARTS if path.is_dir() and not (path / part).is_dir()]
    if missing:  # e.g. one part of a pipeline: the fix is its parent, never one more subfolder
        fix = (f"the pipeline folder that holds it, {path.parent}"
               if all((path.parent / part).is_dir() for part in PIPELINE_PARTS) else PIPELINE_HINT)
        raise WeightsError(f"{path} is not an SD-1.5 pipeline folder (it has no {', '.join(missing)}). Pass {fix}.")
    pipeline = Pipeline(load_tokenizer(path), load_text_encoder(path, dtype, device), load_unet(path, dtype, device),
                        load_vae(path, dtype, device), read_scheduler_config(path))
    if pipeline.text_encoder.hidden_size != pipeline.unet.config.cross_attention_dim:
        raise WeightsError(f"{path} mixes models that do not fit together: the text encoder gives "
                           f"{pipeline.text_encoder.hidden_size}-wide states but the UNet reads "
                           f"{pipeline.unet.config.cross_attention_dim}-wide context.")
    return pipeline


# ---- Writing the public layouts ----

def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic (``os.replace``), so a crash leaves the old file or the new one, never half a file;
    a ``write`` that fails leaves no temporary file behind either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


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


def save_text_encoder(text_model: CLIPTextTransformer, folder: Path) -> None:
    """An SD-style ``text_encoder/`` folder (transformers CLIPTextModel layout) for a CLIPTextTransformer."""
    state = {f"text_model.{key}": value for key, value in text_model.state_dict().items()}
    save_state_dict(state, folder / "model.safetensors")
    write_json(folder / "config.json", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                        **text_config_to_transformers(text_model.config)})


def save_clip_model(model: CLIPModel, folder: Path) -> None:
    """A transformers CLIPModel folder (model.safetensors + config.json), the layout load_clip reads."""
    save_state_dict(model.state_dict(), folder / "model.safetensors")
    write_json(folder / "config.json", clip_config_to_transformers(model.config))


def write_pipeline_files(folder: Path) -> None:
    """model_index.json and SD-1.5's DDIM scheduler config (as diffusers' ``DDIMScheduler`` reads it), which
    make a folder of unet/, vae/, text_encoder/ and tokenizer/ a diffusers pipeline folder."""
    write_json(folder / "scheduler" / "scheduler_config.json", SD15_DDIM_CONFIG)
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
