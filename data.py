"""Datasets: long-caption image sets and prompt lists, and the ``--data`` specs the training script reads.

- CaptionImageDataset: the layouts people already have for long-caption training data (LongAlign's stage 1
  trains on such image-caption pairs): a JSONL manifest of {"image": path, "caption": text}, or a folder of
  images with same-named .txt captions. Images are resized (shorter side) and centre-cropped to the training
  resolution and mapped to [-1, 1]; captions are dropped to "" at a fixed rate (10% in the authors' runs) for
  classifier-free guidance.
- PromptDataset: prompts only, for the reward stage (LongAlign §4 needs prompts, not images).
- image_dataset / prompt_dataset / first_captions / validation_prompts / validation_images /
  default_resolution: what a ``--data`` spec means. A path is one of the layouts above; ``shapes`` or ``shapes:N`` is the miniature's
  synthetic world (``mini/world.py``), made on the fly.

Every image dataset item is a dict {"image": FloatTensor [3, H, W] in [-1, 1], "caption": str}.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # every image file read


# ----------------------------------------------------------------------------------------------------------
# Shared pieces: preprocessing and caption dropout
# ----------------------------------------------------------------------------------------------------------

def resize_and_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic), then cut the central square (the authors' SFT
    preprocessing at 512)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def caption_dropped(rate: float, seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` trains unconditionally in ``epoch``; a pure function of its arguments, so a
    resumed run and every DataLoader worker see the same drops."""
    return rate > 0 and np.random.default_rng([seed, epoch, index]).random() < rate


def check_caption_dropout(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption dropout must be a share in [0, 1], got {rate}")


def check_resolution(resolution: int) -> None:
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got "
                         f"{resolution}. Try {max(8, round(resolution / 8) * 8)}.")


# ----------------------------------------------------------------------------------------------------------
# Long-caption image datasets
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    image: Path
    caption: str


class CaptionImageDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a JSONL manifest or a folder of images with same-named .txt files.

    Bad records never stop an epoch and are never silent. Missing files and empty captions are found up
    front (cheaply: existence and text only) and skipped with one warning that gives the count. An image that
    turns out to be unreadable at read time is replaced by the next readable record, and each one found is
    logged with the running count. Call ``set_epoch`` each epoch so caption dropout varies between epochs.
    """

    def __init__(self, source: str | Path, resolution: int, caption_dropout: float = 0.1, seed: int = 0):
        check_resolution(resolution)
        check_caption_dropout(caption_dropout)
        self.resolution, self.caption_dropout, self.seed, self.epoch = resolution, caption_dropout, seed, 0
        source = Path(source)
        records = read_manifest(source) if source.is_file() else read_caption_folder(source)
        self.records = [r for r in records if r.caption and r.image.is_file()]
        skipped = len(records) - len(self.records)
        if not self.records:
            raise ValueError(f"no usable images found in {source} ({len(records)} records, {skipped} with a "
                             "missing image file or an empty caption).")
        if skipped:
            examples = [str(r.image) for r in records if not (r.caption and r.image.is_file())][:3]
            log.warning("%s: skipped %d of %d records (missing image file or empty caption), e.g. %s",
                        source, skipped, len(records), ", ".join(examples))
        self.unreadable: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def caption_of(self, index: int) -> str:
        """Record ``index``'s caption as written, without reading its image or dropping it."""
        return self.records[index].caption

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.records)):
            candidate = (index + offset) % len(self.records)
            if candidate in self.unreadable:
                continue
            image = self._read(candidate)
            if image is not None:
                caption = self.records[candidate].caption
                if caption_dropped(self.caption_dropout, self.seed, self.epoch, index):
                    caption = ""
                return {"image": to_tensor(resize_and_center_crop(image, self.resolution)), "caption": caption}
        raise RuntimeError(f"none of the {len(self.records)} images could be read; see the warnings above.")

    def _read(self, index: int) -> Image.Image | None:
        path = self.records[index].image
        try:
            with Image.open(path) as image:
                image.load()
                return ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            self.unreadable.add(index)
            log.warning("unreadable image %s (%s): replaced by another record; %d unreadable so far in this "
                        "process", path, err, len(self.unreadable))
            return None


def read_manifest(path: Path) -> list[Record]:
    """Records of a JSONL manifest; image paths are relative to the manifest's folder (or absolute)."""
    if not path.is_file():
        raise ValueError(f"manifest not found: {path}. Pass a JSONL file with one "
                         '{"image": "relative/path.png", "caption": "..."} object per line.')
    if path.suffix.lower() == ".txt":
        raise ValueError(f"{path} is a text file, but images are needed here: pass a JSONL manifest with one "
                         '{"image": "relative/path.png", "caption": "..."} object per line, or a folder of images '
                         "with same-named .txt captions (a list of prompts is only for the reward stage).")
    records = []
    for number, entry in json_lines(path):
        missing = [key for key in ("image", "caption") if key not in entry]
        if missing:
            raise ValueError(f"{path} line {number}: missing key {' and '.join(map(repr, missing))}; every "
                             'line must look like {"image": "relative/path.png", "caption": "..."}.')
        records.append(Record(path.parent / str(entry["image"]), str(entry["caption"]).strip()))
    return records


def read_caption_folder(folder: Path) -> list[Record]:
    """Records of a folder (searched recursively): each image with the text of the same-named .txt file."""
    if not folder.is_dir():
        raise ValueError(f"data source not found: {folder}. Pass a JSONL manifest or a folder of images with "
                         "same-named .txt captions.")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images found in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return [Record(p, _read_text(p.with_suffix(".txt"))) for p in images]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""


def json_lines(path: Path):
    """(line number, JSON object) for every non-empty line of a JSONL file (see :func:`json_line`)."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield number, json_line(line, path, number)


def json_line(line: str, path: Path, number: int) -> dict:
    """One line of a JSONL file as a dict; anything else is a one-line ValueError naming the file and line."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {number} is not valid JSON ({err}).") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} line {number}: expected a JSON object, got {type(entry).__name__}.")
    return entry


class PromptDataset(torch.utils.data.Dataset):
    """Prompts for the reward stage: a .txt file with one prompt per line, or JSONL with "caption" or
    "prompt" per line. Empty lines are skipped."""

    def __init__(self, source: str | Path):
        source = Path(source)
        if not source.is_file():
            raise ValueError(f"prompt file not found: {source}. Pass a .txt (one prompt per line) or .jsonl file.")
        if source.suffix == ".jsonl":
            self.prompts = _jsonl_prompts(source)
        else:
            lines = source.read_text(encoding="utf-8").splitlines()
            self.prompts = [line.strip() for line in lines if line.strip()]
        if not self.prompts:
            raise ValueError(f"no prompts found in {source}.")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


def _jsonl_prompts(path: Path) -> list[str]:
    prompts = []
    for number, entry in json_lines(path):
        key = next((k for k in ("caption", "prompt") if k in entry), None)
        if key is None:
            raise ValueError(f'{path} line {number}: needs a "caption" or "prompt" key.')
        if str(entry[key]).strip():
            prompts.append(str(entry[key]).strip())
    return prompts


# ----------------------------------------------------------------------------------------------------------
# --data specs: a path, or the miniature's shapes world ("shapes", "shapes:N")
# ----------------------------------------------------------------------------------------------------------
# mini.world is imported inside these functions, not at the top: it builds on this module's preprocessing
# and caption dropout, and data on disk never needs the miniature.

SHAPES_SPEC = "shapes"
DEFAULT_SHAPES_COUNT = 100_000  # training scenes of a bare "shapes" spec
REAL_RESOLUTION = 512           # SD-1.5's training resolution


def shapes_count(spec: str | Path) -> int | None:
    """N, the number of training scenes, of a "shapes" / "shapes:N" spec; None for any other spec (a path)."""
    name, colon, count = str(spec).partition(":")
    if name != SHAPES_SPEC:
        return None
    if not colon:
        return DEFAULT_SHAPES_COUNT
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--data {spec}: the shapes world takes shapes:N with N a whole number of training "
                         f"scenes of at least 1, e.g. shapes:{DEFAULT_SHAPES_COUNT}")
    return int(count)


def image_dataset(spec: str | Path, resolution: int, caption_dropout: float, seed: int) -> torch.utils.data.Dataset:
    """The image-caption pairs a spec names: the shapes world's first N training scenes, or files on disk."""
    count = shapes_count(spec)
    if count is None:
        return CaptionImageDataset(spec, resolution, caption_dropout, seed)
    from mini import world
    if resolution != world.CANVAS:
        raise ValueError(f"the shapes world is {world.CANVAS}×{world.CANVAS} pixels, not {resolution}; "
                         f"use --resolution {world.CANVAS}")
    check_caption_dropout(caption_dropout)
    return world.ShapesDataset("train", count, caption_dropout, seed)


def prompt_dataset(spec: str | Path) -> torch.utils.data.Dataset:
    """The prompts a spec names: the captions of the shapes world's first N training scenes, or a prompt file."""
    count = shapes_count(spec)
    if count is None:
        return PromptDataset(spec)
    from mini import world
    return world.ShapesCaptions(count)


def first_captions(dataset, n: int) -> list[str]:
    """The first ``n`` captions of a dataset, without reading images or applying caption dropout."""
    read = getattr(dataset, "caption_of", dataset.__getitem__)  # a prompt dataset's items are its captions
    return [read(i) for i in range(min(n, len(dataset)))]


def validation_prompts(spec: str | Path, dataset, n: int) -> list[str]:
    """Fixed preview prompts: held-out ("val") scenes for the shapes world, else the data's first captions."""
    if shapes_count(spec) is None:
        return first_captions(dataset, n)
    from mini import world
    return world.split_captions("val", n)


def validation_images(spec: str | Path, dataset, n: int) -> torch.Tensor:
    """Fixed preview images [n, 3, H, W] in [-1, 1]: held-out ("val") scenes for the shapes world, else the
    data's first images (at most as many as there are)."""
    if shapes_count(spec) is not None:
        from mini import world
        dataset = world.ShapesDataset("val", n, caption_dropout=0.0)
    return torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])


def default_resolution(spec: str | Path) -> int:
    """The image side a spec trains at when --resolution is not given: 64 for the shapes world, else 512."""
    if shapes_count(spec) is None:
        return REAL_RESOLUTION
    from mini import world
    return world.CANVAS
