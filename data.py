"""Datasets: long-caption image sets and prompt lists, and the ``--data`` specs the training script reads.

- CaptionImageDataset: the layouts people already have for long-caption training data (LongAlign's stage 1
  trains on such image-caption pairs): a JSONL or CSV manifest with an image path ("image", or "path" as in the
  authors' released dataset) and a "caption" per row, or a folder of images with same-named .txt captions.
  Images are resized (shorter side) and centre-cropped to the training resolution and mapped to [-1, 1];
  captions lose every "\n\n" (as the authors' training code does) and are dropped to "" at a fixed rate (10% in
  the authors' runs) for classifier-free guidance.
- ShardDataset: the same pairs in WebDataset-style tar shards, split over ranks and loader workers.
- PromptDataset: prompts only, for the reward stage (LongAlign §4 needs prompts, not images).
- image_dataset / prompt_dataset / first_captions / validation_prompts / validation_images /
  default_resolution: what a ``--data`` spec means. A path is one of the layouts above; ``shapes`` or
  ``shapes:N`` is the miniature's synthetic world (``mini/world.py``), made on the fly.

Every image dataset item is a dict {"image": FloatTensor [3, H, W] in [-1, 1], "caption": str}.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from model import shards

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # every image file read


# ---- Shared pieces: preprocessing and caption dropout ----

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


# ---- Long-caption image datasets ----

@dataclass(frozen=True)
class Record:
    image: Path  # or a shards.TarMember, which opens and answers is_file() as a Path does
    caption: str


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad image
SIZE_SAMPLE = 100  # image headers read at construction to say how many images are upscaled


def clean_caption(text: str) -> str:
    """A caption as trained on: without outer blanks, and with each paragraph break "\n\n" made one space.
    The authors' training code deletes it outright; their sentence split cuts at every ".", so nothing merges
    for them, but split_sentences wants a blank after a full stop, so a space keeps "red.\n\nIt" two segments."""
    return text.replace("\n\n", " ").strip()


class CaptionImageDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a JSONL/CSV manifest or a folder of images with same-named .txt files.

    Bad records never stop an epoch and are never silent. Missing files and empty captions are found up
    front (cheaply: existence and text only) and skipped with one warning that gives the count. An image that
    turns out to be unreadable at read time is replaced by the next readable record, and each one found is
    logged with the running count. Images smaller than the resolution are upscaled; one line at construction
    says how many of the first ones are. Call ``set_epoch`` each epoch so caption dropout varies between epochs.
    """

    def __init__(self, source, resolution: int, caption_dropout: float = 0.1, seed: int = 0,
                 image_root: str | Path | None = None):
        check_resolution(resolution)
        check_caption_dropout(caption_dropout)
        self.resolution, self.caption_dropout, self.seed, self.epoch = resolution, caption_dropout, seed, 0
        records, source = self.find_records(source, image_root), self.label(source)
        self.records = [r for r in records if r.caption and r.image.is_file()]
        skipped = len(records) - len(self.records)
        if not self.records:
            raise ValueError(f"no usable images found in {source} ({len(records)} records, {skipped} with a "
                             "missing image file or an empty caption).")
        if skipped:
            examples = [str(r.image) for r in records if not (r.caption and r.image.is_file())][:3]
            log.warning("%s: skipped %d of %d records (missing image file or empty caption), e.g. %s",
                        source, skipped, len(records), ", ".join(examples))
        note_upscaled(self.records[:SIZE_SAMPLE], resolution)
        self.unreadable: set[int] = set()

    def find_records(self, source, image_root) -> list[Record]:
        """Every record of a manifest (relative paths under ``image_root``, default its folder) or a folder."""
        source = Path(source)
        if source.is_file():
            return read_manifest(source, image_root)
        refuse_image_root(image_root, f"a folder of images ({source})")
        return read_caption_folder(source)

    def label(self, source) -> str:
        """How messages name the data."""
        return str(source)

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
        source = self.records[index].image
        try:
            with source.open("rb") as file, Image.open(file) as image:
                image.load()
                return ImageOps.exif_transpose(image).convert("RGB")
        except UNREADABLE as err:
            self.unreadable.add(index)
            log.warning("unreadable image %s (%s): replaced by another record; %d unreadable so far in this "
                        "process", source, err, len(self.unreadable))
            return None


def refuse_image_root(image_root: str | Path | None, layout: str) -> None:
    if image_root is not None:
        raise ValueError(f"an image root only applies to a JSONL or CSV manifest, not to {layout}; leave it out")


def note_upscaled(records: list[Record], resolution: int) -> None:
    """One line (never one per image) when images of ``records`` are smaller than the training resolution:
    resize_and_center_crop upscales them, which trains on blur. Only headers are read (PIL decodes lazily)."""
    small = 0
    for record in records:
        with contextlib.suppress(*UNREADABLE), record.image.open("rb") as file, Image.open(file) as image:
            small += min(image.size) < resolution
    if small:
        log.warning("note: %d of the first %d images are smaller than %d px on the shorter side and are upscaled",
                    small, len(records), resolution)


MANIFEST_HELP = {".csv": "a CSV manifest needs the columns path (or image) and caption",
                 ".jsonl": 'every line must look like {"image": "relative/path.png", "caption": "..."} ("path" '
                           'may stand for "image")'}


def read_manifest(path: Path, image_root: Path | None = None) -> list[Record]:
    """Records of a JSONL manifest, or of a CSV one with a header row (.csv); an image path is read from
    "image" or "path" (the authors' release), and a relative one resolves against ``image_root`` (default: the
    manifest's folder)."""
    if not path.is_file():
        raise ValueError(f"manifest not found: {path}. Pass a JSONL file with one "
                         '{"image": "relative/path.png", "caption": "..."} object per line.')
    if path.suffix.lower() == ".txt":
        raise ValueError(f"{path} is a text file, but images are needed here: pass a JSONL manifest with one "
                         '{"image": "relative/path.png", "caption": "..."} object per line, or a folder of images '
                         "with same-named .txt captions (a list of prompts is only for the reward stage).")
    csv_file, root = path.suffix.lower() == ".csv", path.parent if image_root is None else Path(image_root)
    records = []
    for number, entry in (csv_rows(path) if csv_file else json_lines(path)):
        key = next((k for k in ("image", "path") if entry.get(k) is not None), None)
        missing = [name for name, found in (("'image'", key), ("'caption'", "caption" in entry)) if not found]
        if missing:
            raise ValueError(f"{path} line {number}: missing key {' and '.join(missing)}; "
                             f"{MANIFEST_HELP['.csv' if csv_file else '.jsonl']}.")
        records.append(Record(root / str(entry[key]), clean_caption(str(entry["caption"] or ""))))
    return records


def csv_rows(path: Path):
    """(line number, row as a dict of the header's columns) for every row of a CSV file."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = csv.DictReader(file)
        for row in rows:
            yield rows.line_num, row


def read_caption_folder(folder: Path) -> list[Record]:
    """Records of a folder (searched recursively): each image with the text of the same-named .txt file."""
    if not folder.is_dir():
        raise ValueError(f"data source not found: {folder}. Pass a JSONL or CSV manifest, tar shards, or a folder "
                         "of images with same-named .txt captions.")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images found in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return [Record(p, clean_caption(_read_text(p.with_suffix(".txt")))) for p in images]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


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


# ---- WebDataset-style tar shards ----

class ShardDataset(CaptionImageDataset):
    """Image-caption pairs in tar shards (model/shards.py), preprocessed as CaptionImageDataset's files are.

    The shards are indexed once at construction (tar headers and captions, never image data) and items are
    then read by offset. The other design, a streaming IterableDataset, needs no index and no seekable file,
    but each rank then takes as many batches as its shards hold, and a resume must replay every worker's
    position. The index costs one pass over the headers at start in every process (about a minute per
    million samples from a warm local disk) and holds every caption in memory, as a manifest does; in exchange
    ``epoch_order`` is an exact, equal split over ranks and workers, and a resume is the existing skip of
    used batches.
    """

    def __init__(self, tars: list[Path], resolution: int, caption_dropout: float = 0.1, seed: int = 0,
                 image_root: str | Path | None = None):
        super().__init__(tars, resolution, caption_dropout, seed, image_root)
        owners = [record.image.shard for record in self.records]
        self.sizes = [sum(1 for _ in group) for _, group in itertools.groupby(owners)]

    def find_records(self, source: list[Path], image_root) -> list[Record]:
        refuse_image_root(image_root, "tar shards")
        return [Record(member, clean_caption(caption)) for shard in source
                for member, caption in shards.read_shard(shard, IMAGE_SUFFIXES)]

    def label(self, source: list[Path]) -> str:
        return f"{source[0]}" if len(source) == 1 else f"the {len(source)} shards {source[0]} .. {source[-1]}"

    def epoch_order(self, epoch: int, seed: int, batch_size: int, workers: int, rank: int, world: int) -> list[int]:
        """This rank's item indices in ``epoch``, batch after batch (see model/shards.py ``epoch_split``)."""
        return shards.epoch_split(self.sizes, epoch, seed, batch_size, workers, rank, world)


def data_order(dataset, batch_size: int, workers: int, world: int) -> dict:
    """The settings besides the seed that fix a dataset's order, for a resume to refuse changing them: none
    for a map of items (DistributedSampler's global order is one for any number of ranks); ranks, workers and
    batch size for shards, which are split over them. Shards that give no batch raise a ValueError here."""
    if not isinstance(dataset, ShardDataset):
        return {}
    dataset.epoch_order(0, 0, batch_size, workers, 0, world)  # the same number of batches for all ranks, epochs
    return {"ranks": world, "workers": workers, "batch_size": batch_size}


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


# ---- --data specs: a path, or the miniature's shapes world ("shapes", "shapes:N") ----
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


def image_dataset(spec: str | Path, resolution: int, caption_dropout: float, seed: int,
                  image_root: str | Path | None = None) -> torch.utils.data.Dataset:
    """The image-caption pairs a spec names: the shapes world's first N training scenes, tar shards (a brace
    pattern such as ``shards/train-{00000..00099}.tar``, one ``.tar``, or a folder of them), or a manifest
    (relative image paths under ``image_root``, default its folder) or image folder."""
    count = shapes_count(spec)
    tars = shards.shard_paths(spec) if count is None else None
    if tars is not None:
        return ShardDataset(tars, resolution, caption_dropout, seed, image_root)
    if count is None:
        return CaptionImageDataset(spec, resolution, caption_dropout, seed, image_root)
    refuse_image_root(image_root, "the shapes world")
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
