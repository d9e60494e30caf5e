"""Public checkpoint layouts turned into ours: key renaming rules and config translation.

Stable Diffusion 1.5 and the CLIP scorers are published in several layouts: diffusers / transformers folders,
the original single-file checkpoint (the key names of CompVis' ``ldm`` code), open_clip state dicts. Our
modules use the diffusers / transformers key names, so those load as they are. This module holds the pure
rules for the rest: it renames keys, translates config.json files both ways and reads configs off tensor
shapes. Reading and writing files is ``model/weights.py``'s job.
"""
from __future__ import annotations

import math
import re
from enum import StrEnum

import torch

from model.clip import CONFIGS as CLIP_CONFIGS, CLIPConfig, TextConfig, VisionConfig
from model.unet import UNetConfig
from model.vae import VAEConfig

State = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """A weights path or file that cannot be used; the message names the problem and the fix. Defined here,
    because the rules below raise it too; callers import it from ``model.weights``."""


class Layout(StrEnum):
    """Every layout the loaders recognise; a loaded model's ``layout`` attribute is one of these."""
    DIFFUSERS = "diffusers"            # diffusers unet/ and vae/ folders
    TRANSFORMERS = "transformers"      # transformers CLIPModel / CLIPTextModel folders (SD's text_encoder/)
    SINGLE_FILE = "sd-single-file"     # the original single-file SD checkpoint, each model under its prefix
    LDM = "ldm"                        # one model in the original (ldm) names, without a prefix
    OPEN_CLIP = "open_clip"            # open_clip CLIP state dicts (HPSv2)
    LORA = "lora"                      # LoRA files as model/lora.py writes them


# The original single file holds each model under one prefix; everything else in it (the DDPM buffers,
# model_ema.*) is ignored.
SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                        "text_encoder": "cond_stage_model.transformer."}


def is_single_file(keys) -> bool:
    """Whether these keys are those of an original single-file checkpoint."""
    return any(k.startswith(tuple(SINGLE_FILE_PREFIXES.values())) for k in keys)


def _count_layers(state: State, prefix: str) -> int:
    """1 + the largest N among keys ``prefix + "N."``; 0 when there are none."""
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


# ---- open_clip -> transformers (CLIP) ----
# Keys are renamed by prefix, then inside the blocks; open_clip's fused attention input projection is split
# into q, k, v, and the two projections are transposed.

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


def is_open_clip(state: State) -> bool:
    return any(k.startswith(("visual.", "transformer.resblocks.")) for k in state)


def open_clip_to_transformers(state: State) -> State:
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


# ---- ldm -> diffusers (UNet) ----
# Whole-prefix renames first; the numbered input/output blocks are then placed by arithmetic, since each
# level holds ``stride`` = layers_per_block + 1 entries.

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


def unet_from_ldm(state: State) -> State:
    """Rename an original-layout UNet state dict (``model.diffusion_model.`` removed) to diffusers keys.

    No tensor changes shape. Works for any number of levels and layers per block, so test models convert too.
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


# ---- ldm -> diffusers (VAE), and the VAE attention's old names ----
# (pattern, replacement) pairs for re.sub. The decoder's levels are numbered from the finest in ldm but from
# the coarsest in diffusers; vae_from_ldm flips them first.

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


def vae_from_ldm(state: State) -> State:
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


def modern_vae_attention(state: State) -> State:
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


# ---- diffusers config.json <-> our UNet and VAE configs ----

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
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",), "cross_attention_norm": (None,),
}
VAE_FIXED_OPTIONS = {
    "act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,),
    "use_quant_conv": (True,), "use_post_quant_conv": (True,), "mid_block_add_attention": (True,),
}
DOWN_BLOCK_CROSS_ATTENTION = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel config.json; unsupported options are refused."""
    _refuse_other_options(config, UNET_FIXED_OPTIONS, "UNet")
    down = config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    if any(t not in DOWN_BLOCK_CROSS_ATTENTION for t in down):
        raise WeightsError(f"unsupported UNet down_block_types {down}: only "
                           f"{', '.join(DOWN_BLOCK_CROSS_ATTENTION)} are supported")
    cross_attention = tuple(DOWN_BLOCK_CROSS_ATTENTION[t] for t in down)
    mirrored = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross_attention)]
    if list(up) != mirrored:
        raise WeightsError(f"unsupported UNet up_block_types {up}: expected the mirror of the down path, {mirrored}")
    # diffusers' SD-1.x configs say "attention_head_dim" but mean the head COUNT (8 heads in SD-1.5).
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


# ---- transformers config.json <-> our CLIP configs ----

# transformers' defaults for the two values the shapes cannot tell; a config.json may omit a default value.
TRANSFORMERS_DEFAULTS = {"text": {"num_attention_heads": 8, "hidden_act": "quick_gelu"},
                         "vision": {"num_attention_heads": 12, "hidden_act": "quick_gelu"}}


def text_config_to_transformers(cfg: TextConfig) -> dict:
    """transformers' CLIPTextConfig fields for our TextConfig."""
    return {"hidden_size": cfg.width, "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "max_position_embeddings": cfg.max_positions,
            "vocab_size": cfg.vocab_size, "hidden_act": cfg.act, "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": cfg.eot_id, "pad_token_id": 1}


def clip_config_to_transformers(cfg: CLIPConfig) -> dict:
    """A config.json that transformers' ``CLIPModel.from_pretrained`` reads as this very CLIP model."""
    vision = cfg.vision
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.projection_dim,
            "logit_scale_init_value": math.log(1 / 0.07), "text_config": text_config_to_transformers(cfg.text),
            "vision_config": {"hidden_size": vision.width, "intermediate_size": vision.mlp,
                              "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads,
                              "patch_size": vision.patch_size, "image_size": vision.image_size,
                              "hidden_act": vision.act, "layer_norm_eps": 1e-5, "num_channels": 3}}


# ---- Configs read off tensor shapes, for files without config.json ----

def infer_text_config(state: State, hf_config: dict | None = None,
                      layout: Layout = Layout.TRANSFORMERS) -> TextConfig:
    """The text tower's config from the ``text_model.*`` tensor shapes (heads and activation: see
    :func:`_tower_config`). ``hf_config`` is the text part of a transformers config.json."""
    vocab_size, width = _shape(state, "text_model.embeddings.token_embedding.weight", layout)
    shapes = dict(width=width, vocab_size=vocab_size,
                  max_positions=_shape(state, "text_model.embeddings.position_embedding.weight", layout)[0],
                  mlp=_shape(state, "text_model.encoder.layers.0.mlp.fc1.weight", layout)[0],
                  layers=_count_layers(state, "text_model.encoder.layers."))
    return _tower_config(TextConfig, "text", shapes, hf_config, layout)


def infer_vision_config(state: State, hf_config: dict | None = None,
                        layout: Layout = Layout.TRANSFORMERS) -> VisionConfig:
    """The vision tower's config from the ``vision_model.*`` tensor shapes; 257 positions at patch 14 -> 224 px."""
    width, _, patch, _ = _shape(state, "vision_model.embeddings.patch_embedding.weight", layout)
    positions = _shape(state, "vision_model.embeddings.position_embedding.weight", layout)[0]
    shapes = dict(width=width, patch_size=patch, image_size=patch * math.isqrt(positions - 1),
                  mlp=_shape(state, "vision_model.encoder.layers.0.mlp.fc1.weight", layout)[0],
                  layers=_count_layers(state, "vision_model.encoder.layers."))
    return _tower_config(VisionConfig, "vision", shapes, hf_config, layout)


def infer_clip_config(state: State, hf_config: dict | None = None,
                      layout: Layout = Layout.TRANSFORMERS) -> CLIPConfig:
    """A CLIPModel config from transformers-layout shapes, with a CLIPModel config.json when there is one."""
    text_json = vision_json = None
    if hf_config is not None:  # very old files call the sections "..._config_dict"
        text_json = hf_config.get("text_config") or hf_config.get("text_config_dict") or {}
        vision_json = hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {}
    return CLIPConfig(text=infer_text_config(state, text_json, layout),
                      vision=infer_vision_config(state, vision_json, layout),
                      projection_dim=_shape(state, "text_projection.weight", layout)[0])


def _tower_config(config_class, tower: str, shapes: dict, hf_config: dict | None, layout: Layout):
    """Add the two things the shapes cannot show, the head count and the activation: from config.json when
    there is one, else from the public config (``model.clip.CONFIGS``) with exactly these shapes (so ViT-L/14
    gets quick_gelu, ViT-H/14 GELU and 80-wide vision heads). Other shapes are refused: they fit any head
    count that divides the width, with either activation."""
    if hf_config is not None:
        defaults = TRANSFORMERS_DEFAULTS[tower]
        heads, act = (hf_config.get(key, defaults[key]) for key in ("num_attention_heads", "hidden_act"))
    else:
        known = [getattr(cfg, tower) for cfg in CLIP_CONFIGS.values()]
        match = next((cfg for cfg in known if all(getattr(cfg, f) == v for f, v in shapes.items())), None)
        if match is None:
            raise WeightsError(f"the CLIP {tower} tower of these weights ({layout}; width {shapes['width']}, "
                               f"layers {shapes['layers']}) matches no known config ({', '.join(CLIP_CONFIGS)}), "
                               "and its head count and activation do not show in shapes. Load it from a folder "
                               "whose config.json sets num_attention_heads and hidden_act (for an SD checkpoint: "
                               "a diffusers folder's text_encoder/).")
        heads, act = match.heads, match.act
    try:
        return config_class(**shapes, heads=heads, act=act)
    except ValueError as err:
        raise WeightsError(f"cannot build a CLIP {tower} tower from these weights (detected layout: {layout}): "
                           f"{err}. Check config.json.") from None


def _shape(state: State, key: str, layout: Layout) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"these weights hold no '{key}' (detected layout: {layout}), so they are not the CLIP "
                           "model expected here. Is this the right file?")
    return tuple(state[key].shape)


# Heads and GroupNorm groups leave no trace in the shapes; SD-1.5's 8 and 32 are assumed (the loaders'
# ``config`` argument overrides).
def infer_unet_config(state: State) -> UNetConfig:
    """A UNet config from diffusers-layout shapes."""
    levels = _count_layers(state, "down_blocks.")
    return _read_off("UNet", lambda: UNetConfig(
        block_out_channels=tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)),
        cross_attention=tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in state for i in range(levels)),
        layers_per_block=_count_layers(state, "down_blocks.0.resnets."),
        transformer_layers=_count_layers(state, "mid_block.attentions.0.transformer_blocks."),
        cross_attention_dim=state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        in_channels=state["conv_in.weight"].shape[1], out_channels=state["conv_out.weight"].shape[0]))


def infer_vae_config(state: State) -> VAEConfig:
    """A VAE config from diffusers-layout shapes."""
    levels = _count_layers(state, "encoder.down_blocks.")
    return _read_off("VAE", lambda: VAEConfig(
        block_out_channels=tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                 for i in range(levels)),
        layers_per_block=_count_layers(state, "encoder.down_blocks.0.resnets."),
        in_channels=state["encoder.conv_in.weight"].shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["post_quant_conv.weight"].shape[0]))


def _read_off(model: str, build):
    """``build()``, with a missing tensor or an impossible config reported as a WeightsError."""
    try:
        return build()
    except (KeyError, ValueError) as err:
        raise WeightsError(f"cannot read a {model} config off these weights ({err}); they are incomplete or not "
                           f"a {model}. Is this the right file?") from None
