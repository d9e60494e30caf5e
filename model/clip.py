"""CLIP: the text encoder of Stable Diffusion 1.5 and the image+text model behind every preference scorer.

One pre-LayerNorm transformer serves both towers (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"; the layout of transformers' ``CLIPModel``):

    x = x + self_attn(layer_norm1(x))        # causal in the text tower, full in the vision tower
    x = x + mlp(layer_norm2(x))              # fc1 -> quick_gelu (ViT-L/14) or exact GELU (ViT-H/14) -> fc2

- Text: token + learned position embeddings -> encoder -> ``final_layer_norm``. Stable Diffusion conditions on
  all 77 states of ``last_hidden_state``; a CLIP score pools the state at the first ``<eot>``.
- Vision: 14×14 patches (a conv without bias) after a class token, + position embeddings -> ``pre_layrnorm``
  -> encoder -> ``post_layernorm`` on the class token.
- ``CLIPModel`` projects both pooled vectors (Linear, no bias) into one shared space.

Module attribute names follow transformers' key names (misspelt ``pre_layrnorm`` included), so a
transformers state dict loads with no renaming. ``model/convert.py`` converts the other layouts.

The second half of the file is the scorers' image preprocessing (transformers' ``CLIPImageProcessor`` and
open_clip's HPSv2 transform), written in torch so the reward stage can backpropagate through it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

LAYER_NORM_EPS = 1e-5  # every public CLIP tower


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's sigmoid approximation of GELU, x·σ(1.702x); ViT-L/14 was trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # F.gelu is the exact erf form (ViT-H/14)


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TowerConfig:
    """What the two towers share: a stack of ``layers`` pre-LN blocks of ``width`` with ``heads`` heads."""
    width: int
    layers: int
    heads: int
    mlp: int  # hidden width of the feed-forward
    act: str  # "quick_gelu" or "gelu"

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{self.act}': use one of {', '.join(ACTIVATIONS)}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")


@dataclass(frozen=True)
class TextConfig(TowerConfig):
    vocab_size: int
    max_positions: int
    eot_id: int = 49407  # <|endoftext|>; text pooling reads the state at its first occurrence


@dataclass(frozen=True)
class VisionConfig(TowerConfig):
    patch_size: int
    image_size: int

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches, plus the class token


@dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int


CONFIGS = {
    # OpenAI CLIP ViT-L/14; its text tower is SD-1.5's text encoder.
    "vit-l-14": CLIPConfig(
        text=TextConfig(width=768, layers=12, heads=12, mlp=3072, act="quick_gelu", vocab_size=49408,
                        max_positions=77),
        vision=VisionConfig(width=1024, layers=24, heads=16, mlp=4096, act="quick_gelu", patch_size=14,
                            image_size=224),
        projection_dim=768),
    # laion CLIP-ViT-H-14, and PickScore_v1, HPSv2 and Denscore, which are fine-tuned from it.
    # The vision heads are 80 wide (1280 / 16), not the usual 64.
    "vit-h-14": CLIPConfig(
        text=TextConfig(width=1024, layers=24, heads=16, mlp=4096, act="gelu", vocab_size=49408,
                        max_positions=77),
        vision=VisionConfig(width=1280, layers=32, heads=16, mlp=5120, act="gelu", patch_size=14,
                            image_size=224),
        projection_dim=1024),
    # For tests: the real classes, the real vocabulary and image size, small widths (64-wide heads, so the
    # open_clip rule "heads = width / 64" holds here too).
    "test": CLIPConfig(
        text=TextConfig(width=128, layers=2, heads=2, mlp=256, act="gelu", vocab_size=49408, max_positions=77),
        vision=VisionConfig(width=128, layers=2, heads=2, mlp=256, act="gelu", patch_size=32, image_size=224),
        projection_dim=64),
    # The shipped miniature: scorer and frozen text encoder of the shapes world, sized for a CPU.
    # The text is narrow because its 49408-row token table is stored twice (scorer/ and text_encoder/); the
    # 7×7 patches of the 224-px input are enough to tell nine flat-coloured cells apart.
    "mini": CLIPConfig(
        text=TextConfig(width=64, layers=2, heads=2, mlp=256, act="gelu", vocab_size=49408, max_positions=77),
        vision=VisionConfig(width=64, layers=2, heads=2, mlp=256, act="gelu", patch_size=32, image_size=224),
        projection_dim=64),
}


# ----------------------------------------------------------------------------------------------------------
# The transformer block shared by both towers
# ----------------------------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    """Multi-head self-attention; all four projections carry a bias in both towers."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split_heads(t):  # [B, L, W] -> [B, heads, L, W / heads]
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LN residual block: attention, then the MLP."""

    def __init__(self, cfg: TowerConfig, causal: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.self_attn = CLIPAttention(cfg.width, cfg.heads, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TowerConfig, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------------------

def trimmed_length(rows: int, max_positions: int) -> int:
    """How many leading positions to encode when only the first ``rows`` text states are read.

    The text tower is causal (state i sees tokens 0..i), so later positions cannot change the states read.
    Rounding up to a multiple of 16 (at most ``max_positions``) leaves a compiled encoder few shapes (16, 32,
    48, 64, 77) and the attention kernels the vector lanes of the full length: on one CPU thread the states
    read are bit for bit those of all positions (a threaded BLAS may split small sums differently).
    """
    return min(max_positions, -(-rows // 16) * 16)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    """Token ids [B, L] -> ``last_hidden_state`` [B, L, width]: causal mask only, then the final LayerNorm.

    There is no padding mask: under the causal mask no state before the first ``<eot>`` can see the padding,
    and SD-1.5 was trained with every one of the 77 states exactly as computed here.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, causal=True)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))

    def pool(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The state at the FIRST ``<eot>`` of each row, as CLIP pools text: [B, L, W] -> [B, W].

        The first, because SD-1.5 pads with ``<eot>`` too; ``argmax`` over a bool mask returns the first hit.
        """
        is_eot = ids == self.config.eot_id
        if not torch.compiler.is_compiling() and not bool(is_eot.any(dim=1).all()):  # a data read: eager only
            raise ValueError(f"every row of ids needs an <eot> ({self.config.eot_id}) to pool at; frame the "
                             "texts with the tokenizer, which ends each one with it")
        first_eot = is_eot.int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_eot]

    def pooled_length(self, ids: torch.Tensor) -> int:
        """The positions of ids [B, L] that :meth:`pool` reads through: each row's first ``<eot>``, rounded by
        :func:`trimmed_length`; all L for a row without one (pool says so) and in a compiled graph."""
        if torch.compiler.is_compiling() or not ids.numel():
            return ids.shape[1]
        is_eot = ids == self.config.eot_id
        ends = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1) + 1, ids.shape[1])
        return trimmed_length(int(ends.max()), ids.shape[1])

    def _check_ids(self, ids: torch.Tensor) -> None:
        cfg = self.config
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor [batch, length]; got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > cfg.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens do not fit the text encoder's {cfg.max_positions} "
                             "positions; split the text (model/longtext.py) or truncate it")
        if not torch.compiler.is_compiling() and ids.numel() and (  # reads the data: not in a compiled graph
                int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in 0..{cfg.vocab_size - 1}; got {int(ids.min())}..{int(ids.max())}")


class CLIPTextModel(nn.Module):
    """SD-1.5's text encoder (CLIP ViT-L/14's text tower); its keys are ``text_model.*``, as in the public files."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)

    @property
    def config(self) -> TextConfig:
        return self.text_model.config

    @property
    def hidden_size(self) -> int:
        return self.config.width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> ``last_hidden_state`` [B, L, hidden_size]."""
        return self.text_model(ids)


# ----------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------

class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.patch_embedding.weight.dtype)  # preprocessing hands over fp32
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, W, h, w] -> [B, h·w, W]
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([class_token, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """Normalized pixels [B, 3, S, S] -> the pooled image vector [B, width] (``post_layernorm`` of the class token)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)  # sic: the public key name
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [batch, 3, {size}, {size}]; got {tuple(pixels.shape)}. Run them "
                             "through preprocess_images / preprocess_tensor first")
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(hidden[:, 0])


# ----------------------------------------------------------------------------------------------------------
# Both towers
# ----------------------------------------------------------------------------------------------------------

class CLIPModel(nn.Module):
    """Text and image into one embedding space. Scores use cosines, so the logit scale is kept only to load it."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg.text)
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> text embeddings [B, projection_dim], projected, NOT normalized.

        Encodes only through the latest first ``<eot>`` (``pooled_length``): 20 tokens cost 32 positions, not 77.
        """
        if ids.dim() == 2:  # other shapes go on to the text tower's own error
            ids = ids[:, :self.text_model.pooled_length(ids)]
        return self.text_projection(self.text_model.pool(self.text_model(ids), ids))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [B, 3, S, S] -> image embeddings [B, projection_dim], projected, NOT normalized."""
        return self.visual_projection(self.vision_model(pixels))


# ----------------------------------------------------------------------------------------------------------
# Image preprocessing for the scorers
# ----------------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224


def preprocess_tensor(pixels: torch.Tensor, pad_to_square: bool = False, size: int = IMAGE_SIZE,
                      random_crop: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> normalized scorer input [B, 3, size, size] (fp32); differentiable.

    - ``pad_to_square=False`` (CLIP, PickScore, Denscore; transformers' CLIPImageProcessor): shortest side to
      ``size``, centre crop.
    - ``pad_to_square=True`` (HPSv2; open_clip's ResizeMaxSize): longest side to ``size``, then zero-pad
      (black, before normalization) to a square, the extra pixel going right / bottom.
    - ``random_crop=c`` (the reward stage, LongAlign §4): cut one random c×c window, the same for the whole
      batch (504 of 512 in the authors' release), and resize it straight to size×size, bilinear with
      antialiasing and no clamp, as the release's torchvision ``Resize((224, 224))`` on a tensor does; the
      reward's image gradient flows through exactly that. ``generator`` makes the crop reproducible.

    Otherwise resizing is bicubic with antialiasing, the filter PIL uses (a = -0.5, widened when shrinking),
    clamped to [0, 1] as PIL's 8-bit output is.
    """
    if pixels.dim() != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        raise ValueError(f"expected float images [batch, 3, H, W] in [0, 1]; got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    pixels = pixels.float()
    if random_crop is not None:
        pixels = _random_crop(pixels, random_crop, generator)
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    elif pad_to_square:
        pixels = _fit_longest_and_pad(pixels, size)
    else:
        pixels = _fit_shortest_and_crop(pixels, size)
    mean = pixels.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def preprocess_images(images: list[Image.Image], pad_to_square: bool = False, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images of any size and mode -> normalized scorer input [B, 3, size, size], as :func:`preprocess_tensor`."""
    if isinstance(images, Image.Image):
        images = [images]
    return torch.cat([preprocess_tensor(pil_to_tensor(image)[None], pad_to_square, size) for image in images])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> RGB float tensor [3, H, W] in [0, 1].

    Transparency is composited onto white, as transformers' CLIP processor does (open_clip drops alpha
    instead; generated images have none). 16-bit grayscale keeps its full range instead of being clipped
    at 255 as ``Image.convert`` would.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image; got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale files open in these modes
        gray = torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535.0).clamp(0, 1)
        return gray.expand(3, -1, -1).contiguous()
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    resized = F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0, 1)


def _fit_shortest_and_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)  # truncation, as transformers computes it
    pixels = _resize(pixels, *((size, new_long) if height <= width else (new_long, size)))
    top, left = (pixels.shape[-2] - size) // 2, (pixels.shape[-1] - size) // 2
    return pixels[..., top:top + size, left:left + size]


def _fit_longest_and_pad(pixels: torch.Tensor, size: int) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    pixels = _resize(pixels, new_height, new_width)
    pad_h, pad_w = size - new_height, size - new_width
    return F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def _random_crop(pixels: torch.Tensor, crop: int, generator: torch.Generator | None) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    if crop > min(height, width):
        raise ValueError(f"random crop {crop} is larger than the {height}×{width} images")
    top = int(torch.randint(0, height - crop + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop + 1, (), generator=generator))
    return pixels[..., top:top + crop, left:left + crop]
