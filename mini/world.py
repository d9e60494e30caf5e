"""The shapes world: a 64×64 world of coloured shapes on a 3×3 grid whose long captions are lists of facts
that can all be checked in the pixels.

A scene holds 4 to 9 circles, squares and triangles in distinct cells. Its caption has one sentence per
object ("A small blue square sits in the center.") plus some "The top right is empty." sentences, shuffled,
so a caption runs past CLIP's 77 tokens often enough for plain truncation to lose facts (LongAlign §3's
problem), while every fact stays decidable from the image alone (:func:`check_facts`). Example ``i`` of a
split is a pure function of (split, i), and the splits use disjoint seeds.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import caption_dropped, to_tensor
from model.longtext import split_sentences
from model.tokenizer import CLIPTokenizer

CANVAS = 64
GRID = 3
# Cell k of a row or column covers [k*64//3, (k+1)*64//3): 0-21, 21-42, 42-64 (the last one runs to 64).
CELL_EDGES = [k * CANVAS // GRID for k in range(GRID)] + [CANVAS]
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
          "purple": (130, 50, 170), "orange": (240, 130, 20), "cyan": (20, 190, 200), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.50, "large": 0.85}  # fraction of the cell side
MAX_JITTER = 2                           # pixels, and never beyond the cell
TEMPLATES = ("There is a {size} {color} {shape} in the {position}.",
             "In the {position}, you can see a {size} {color} {shape}.",
             "A {size} {color} {shape} sits in the {position}.")
EMPTY_TEMPLATE = "The {position} is empty."
EMPTY_MENTION_RATE = 0.5                 # each empty cell gets its sentence with this probability

INK_DISTANCE = 60          # a pixel is ink when its RGB distance from white exceeds this
OBJECT_MIN_INK = 0.05      # an object fact needs at least this share of the cell in ink
EMPTY_MAX_INK = 0.03       # an empty fact needs less than this
# Secondary shape test: the share of the ink's bounding box that is ink. A square fills it (1.0), a disc
# about π/4 ≈ 0.79, an upright triangle about 0.5; the cut-offs sit between these.
SQUARE_MIN_FILL, CIRCLE_MIN_FILL = 0.9, 0.65

SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}  # disjoint seed ranges
SPLIT_SIZE = 1_000_000_000


@dataclass(frozen=True)
class ShapeObject:
    cell: int            # 0..8, row by row (index into POSITIONS)
    shape: str
    color: str
    size: str
    jitter: tuple[int, int]  # (dx, dy) pixels from the centred placement


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    empty_mentioned: tuple[int, ...]  # the empty cells whose "The {position} is empty." is a fact


# ----------------------------------------------------------------------------------------------------------
# Scenes and their pictures
# ----------------------------------------------------------------------------------------------------------

def cell_box(cell: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a grid cell, end-exclusive."""
    row, col = divmod(cell, GRID)
    return CELL_EDGES[col], CELL_EDGES[row], CELL_EDGES[col + 1], CELL_EDGES[row + 1]


def cell_slice(cell: int) -> tuple[slice, slice]:
    """The (rows, columns) index of a grid cell in an [H, W, ...] array."""
    x0, y0, x1, y1 = cell_box(cell)
    return slice(y0, y1), slice(x0, x1)


def random_scene(rng: random.Random) -> Scene:
    """4 to 9 objects in distinct cells; each empty cell is mentioned with probability EMPTY_MENTION_RATE."""
    cells = rng.sample(range(GRID * GRID), rng.randint(4, 9))
    objects = []
    for cell in sorted(cells):
        size = rng.choice(list(SIZES))
        reach = min(MAX_JITTER, _margin(cell, size))
        objects.append(ShapeObject(cell, rng.choice(SHAPES), rng.choice(list(COLORS)), size,
                                   (rng.randint(-reach, reach), rng.randint(-reach, reach))))
    empty = [c for c in range(GRID * GRID) if c not in cells and rng.random() < EMPTY_MENTION_RATE]
    return Scene(tuple(objects), tuple(empty))


def _side(cell: int, size: str) -> int:
    x0, y0, x1, y1 = cell_box(cell)
    return round(SIZES[size] * min(x1 - x0, y1 - y0))


def _margin(cell: int, size: str) -> int:
    x0, y0, x1, y1 = cell_box(cell)
    return (min(x1 - x0, y1 - y0) - _side(cell, size)) // 2


def render(scene: Scene) -> Image.Image:
    """Draw the scene on a white 64×64 canvas, without anti-aliasing, so every ink pixel has a pure colour."""
    image = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = cell_box(obj.cell)
        side = _side(obj.cell, obj.size)
        left = x0 + (x1 - x0 - side) // 2 + obj.jitter[0]
        top = y0 + (y1 - y0 - side) // 2 + obj.jitter[1]
        right, bottom = left + side - 1, top + side - 1  # PIL boxes include their last pixel
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=color)
        else:
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=color)
    return image


def render_uint8(scenes: list[Scene]) -> torch.Tensor:
    """The true images of ``scenes``, uint8 [N, 3, 64, 64]."""
    return torch.stack([torch.from_numpy(np.array(render(scene))).permute(2, 0, 1) for scene in scenes])


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------

def fact_sentences(scene: Scene, rng: random.Random) -> list[tuple[int, str]]:
    """(cell, sentence) for every fact, in caption order: a random template per object, then shuffled."""
    facts = [(o.cell, rng.choice(TEMPLATES).format(size=o.size, color=o.color, shape=o.shape,
                                                      position=POSITIONS[o.cell])) for o in scene.objects]
    facts += [(c, EMPTY_TEMPLATE.format(position=POSITIONS[c])) for c in scene.empty_mentioned]
    rng.shuffle(facts)
    return facts


def caption(scene: Scene, rng: random.Random) -> str:
    """The scene's long caption: one sentence per fact, shuffled, joined by spaces."""
    return " ".join(sentence for _, sentence in fact_sentences(scene, rng))


@lru_cache(maxsize=1)
def _default_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def sentence_token_starts(sentences: list[str], tokenizer=None) -> list[int]:
    """Where each sentence of " ".join(sentences) starts in the framed token sequence [sot] + ids + [eot].

    Index 0 is <sot>, so the first sentence starts at 1. Plain 77-token truncation keeps content tokens
    1..75 only, so a sentence that starts at 76 or later is lost entirely. CLIP's pre-tokenizer splits at
    spaces, so the caption's ids are the concatenation of the sentences' ids.
    """
    tokenizer = tokenizer or _default_tokenizer()
    starts, position = [], 1
    for sentence in sentences:
        starts.append(position)
        position += len(tokenizer.encode(sentence))
    return starts


def sentence_cell(sentence: str) -> int:
    """The grid cell a shapes-world sentence talks about."""
    for cell, name in enumerate(POSITIONS):
        if re.search(rf"\b{name}\b", sentence):
            return cell
    raise ValueError(f"not a shapes-world sentence (it names no position): {sentence!r}")


# ----------------------------------------------------------------------------------------------------------
# Checking the facts in the pixels
# ----------------------------------------------------------------------------------------------------------

def check_facts(image: Image.Image | np.ndarray, scene: Scene, caption_text: str | None = None,
                tokenizer=None) -> dict:
    """Check every fact of ``scene`` in ``image``.

    - ink: RGB distance from white > 60;
    - an object fact holds when the cell's ink covers >= 5% of the cell AND more than half of the ink pixels
      are nearest (in RGB, among the 8 colours) to the named colour;
    - an empty fact holds when ink covers < 3% of the cell;
    - shape is a separate, secondary score: the ink's bounding-box fill (see SQUARE_MIN_FILL).

    With ``caption_text`` each fact also gets its sentence and ``token_start`` (see sentence_token_starts).
    Returns {"facts": [per-fact dict], "accuracy": share of facts that hold,
             "shape_accuracy": share of object facts whose shape test passes}.
    """
    ink, nearest = ink_and_nearest_colour(_as_rgb_array(image))
    facts = [_object_fact(obj, ink, nearest) for obj in scene.objects]
    facts += [_empty_fact(cell, ink) for cell in scene.empty_mentioned]
    if caption_text is not None:
        _attach_sentences(facts, caption_text, tokenizer)
    objects = [f for f in facts if f["kind"] == "object"]
    return {"facts": facts,
            "accuracy": float(np.mean([f["holds"] for f in facts])) if facts else 1.0,
            "shape_accuracy": float(np.mean([f["shape_holds"] for f in objects])) if objects else 1.0}


def ink_and_nearest_colour(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For RGB pixels [H, W, 3]: which are ink (distance from white > INK_DISTANCE), and the index (in COLORS
    order) of the palette colour nearest to each pixel, both [H, W]."""
    ink = np.linalg.norm(pixels - 255.0, axis=-1) > INK_DISTANCE
    nearest = np.argmin(np.linalg.norm(pixels[:, :, None, :] - _palette(), axis=-1), axis=-1)
    return ink, nearest


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"shapes-world images are {CANVAS}×{CANVAS} RGB, got an array of shape {pixels.shape}")
    return pixels


def _palette() -> np.ndarray:
    return np.array(list(COLORS.values()), dtype=np.float64)  # [8, 3] in COLORS order


def _object_fact(obj: ShapeObject, ink: np.ndarray, nearest: np.ndarray) -> dict:
    cell_ink = ink[cell_slice(obj.cell)]
    ink_fraction = float(cell_ink.mean())
    named = list(COLORS).index(obj.color)
    color_fraction = float((nearest[cell_slice(obj.cell)][cell_ink] == named).mean()) if cell_ink.any() else 0.0
    return {"kind": "object", "cell": obj.cell, "position": POSITIONS[obj.cell], "color": obj.color,
            "shape": obj.shape, "size": obj.size, "ink_fraction": ink_fraction, "color_fraction": color_fraction,
            "holds": ink_fraction >= OBJECT_MIN_INK and color_fraction > 0.5,
            "shape_seen": classify_shape(cell_ink), "shape_holds": classify_shape(cell_ink) == obj.shape}


def _empty_fact(cell: int, ink: np.ndarray) -> dict:
    ink_fraction = float(ink[cell_slice(cell)].mean())
    return {"kind": "empty", "cell": cell, "position": POSITIONS[cell], "ink_fraction": ink_fraction,
            "holds": ink_fraction < EMPTY_MAX_INK}


def classify_shape(cell_ink: np.ndarray) -> str | None:
    """Square, circle or triangle from how much of the ink's bounding box is ink; None without ink."""
    rows, cols = np.nonzero(cell_ink)
    if rows.size == 0:
        return None
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = rows.size / box_area
    return "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def _attach_sentences(facts: list[dict], caption_text: str, tokenizer) -> None:
    sentences = split_sentences(caption_text)
    starts = sentence_token_starts(sentences, tokenizer)
    by_cell = {sentence_cell(s): (s, start) for s, start in zip(sentences, starts)}
    for fact in facts:
        if fact["cell"] not in by_cell:
            raise ValueError(f"the caption has no sentence about the {fact['position']}, a fact of this scene.")
        fact["sentence"], fact["token_start"] = by_cell[fact["cell"]]


# ----------------------------------------------------------------------------------------------------------
# Seeded splits and the datasets built on them
# ----------------------------------------------------------------------------------------------------------

def check_split(split: str) -> None:
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_SEED_BASE)}.")


def check_index(index: int, n: int) -> None:
    """A dataset of the first ``n`` examples ends at ``n`` (IndexError, which also ends iteration over it)."""
    if not 0 <= index < n:
        raise IndexError(f"index {index} is outside this dataset of {n} examples")


def shapes_example(split: str, index: int) -> tuple[Scene, str]:
    """Scene and caption number ``index`` of ``split`` ("train", "val" or "test")."""
    check_split(split)
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"example index must be in [0, {SPLIT_SIZE}), got {index}")
    rng = random.Random(SPLIT_SEED_BASE[split] + index)
    scene = random_scene(rng)
    return scene, caption(scene, rng)


def shapes_split(split: str, n: int) -> list[tuple[Scene, str]]:
    """The first ``n`` (scene, caption) pairs of a split."""
    return [shapes_example(split, i) for i in range(n)]


def split_captions(split: str, n: int) -> list[str]:
    """The captions of the first ``n`` examples of a split."""
    return [text for _, text in shapes_split(split, n)]


def write_shapes_manifest(folder: str | Path, split: str, n: int) -> Path:
    """Render ``n`` examples of ``split`` as PNGs plus ``manifest.jsonl`` (the layout CaptionImageDataset reads).

    Each line also records its split and index, so the scene behind an image can be rebuilt for checking.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (scene, text) in enumerate(shapes_split(split, n)):
        name = f"images/{split}_{index:06d}.png"
        render(scene).save(folder / name)
        lines.append(json.dumps({"image": name, "caption": text, "split": split, "index": index}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


class ShapesDataset(torch.utils.data.Dataset):
    """The first ``n`` examples of a shapes-world split, rendered on the fly (no disk), with caption dropout."""

    def __init__(self, split: str, n: int, caption_dropout: float = 0.1, seed: int = 0):
        check_split(split)
        self.split, self.n, self.caption_dropout, self.seed, self.epoch = split, n, caption_dropout, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def caption_of(self, index: int) -> str:
        """Item ``index``'s caption as written, without rendering or dropout."""
        check_index(index, self.n)
        return shapes_example(self.split, index)[1]

    def __getitem__(self, index: int) -> dict:
        check_index(index, self.n)
        scene, text = shapes_example(self.split, index)
        if caption_dropped(self.caption_dropout, self.seed, self.epoch, index):
            text = ""
        return {"image": to_tensor(render(scene)), "caption": text}


class ShapesCaptions(torch.utils.data.Dataset):
    """The captions of the first ``n`` training scenes: the miniature's reward prompts."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> str:
        check_index(index, self.n)
        return shapes_example("train", index)[1]
