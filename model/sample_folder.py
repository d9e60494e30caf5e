"""Sampled images on disk: the PNG with its settings, and the folder an evaluation such as LongAlign's Table 2
samples into (one image per long prompt).

- A PNG keeps its prompt and settings in a "parameters" text chunk, as other SD tools do, and is written
  atomically, so a crash never leaves half an image.
- The prompt file: .txt with one prompt a line (empty lines skipped), or JSONL whose objects hold "prompt"
  (or "caption"), an optional integer "seed" and an optional file "name". Prompt i (its place among the
  prompts) gets the seed it names, else ``first_seed + i``, and the file NAME.png, else its 5-digit index.
- The folder is flat: the PNGs and ``manifest.jsonl``, one line per image with its file, index, prompt, seed
  and the sampling settings, which is what FID tools (pytorch-fid, clean-fid) and score pairing read.
- Several processes share the work by fixed batches (``rank_batches``), so a batch holds the same prompts
  whatever the number of processes and gives the same images. Each process appends the manifest lines of
  its images to its own file before the images appear; once all are done, one process merges them
  (``merge_manifest``). A rerun finds what is already there (``images_on_disk``) and skips it.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from model.weights import atomic_write

SEED_RANGE = range(-2**63, 2**64)  # what torch.Generator.manual_seed takes
MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest-rank{}.jsonl"  # each process appends only to its own


def png_parameters(prompt: str, seed: int, settings: dict) -> PngInfo:
    """The prompt and settings in the common 'parameters' text-chunk convention (AUTOMATIC1111's web UI)."""
    s, info = settings, PngInfo()
    line = (f"Steps: {s['steps']}, Sampler: {s['sampler'].upper()}, CFG scale: {s['cfg']}, Seed: {seed}, "
            f"Size: {s['width']}x{s['height']}, Model: {s['weights']}, Encoding: {s['encoding']}, "
            f"Max tokens: {s['max_tokens']}")
    if s["lora"] is not None:
        line += f", LoRA: {s['lora']}"
    if s.get("longsd") is not None:
        line += f", LongSD: {s['longsd']}, T5: {s['t5']}"
    info.add_text("parameters", f"{prompt}\nNegative prompt: {s['negative']}\n{line}")
    return info


def write_png(path: Path, image: Image.Image, prompt: str, seed: int, settings: dict) -> None:
    """The image with its parameters chunk; ``settings`` holds steps, sampler, cfg, width, height, weights,
    encoding, max_tokens, lora (a name or None) and negative."""
    info = png_parameters(prompt, seed, settings)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


class PromptItem(NamedTuple):
    index: int
    prompt: str
    seed: int
    file: str


def read_prompt_file(path: Path, first_seed: int) -> list[PromptItem]:
    """The prompts of a .txt or JSONL file, with the seed and the file name of each."""
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}. Pass a .txt (one prompt per line) or .jsonl file.")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".jsonl":
        entries = [json_entry(line, path, number) for number, line in enumerate(lines, start=1) if line.strip()]
    else:
        entries = [{"prompt": line} for line in lines if line.strip()]
    if not entries:
        raise ValueError(f"no prompts found in {path}.")
    items = [prompt_item(i, entry, first_seed, path) for i, entry in enumerate(entries)]
    twice = [file for file, count in Counter(item.file for item in items).items() if count > 1]
    if twice:
        raise ValueError(f"{path}: {len(twice)} file names are taken by two prompts or more (e.g. {twice[0]}); "
                         "give each prompt its own \"name\"")
    return items


def json_entry(line: str, path: Path, number: int) -> dict:
    """One JSONL line as an object with a prompt, and the line's number for error messages."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {number} is not valid JSON ({err})") from None
    if not isinstance(entry, dict) or not {"prompt", "caption"} & entry.keys():
        raise ValueError(f'{path} line {number}: expected an object with a "prompt" or "caption", e.g. '
                         '{"prompt": "a red fox in the snow", "seed": 7, "name": "fox"}')
    return {**entry, "line": number}


def prompt_item(index: int, entry: dict, first_seed: int, path: Path) -> PromptItem:
    where = f"{path} line {entry['line']}" if "line" in entry else f"{path}, prompt {index}"
    prompt, seed = entry.get("prompt", entry.get("caption")), entry.get("seed", first_seed + index)
    name = entry.get("name", f"{index:05d}")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: the prompt must be a string, got {prompt!r}")
    if type(seed) is not int or seed not in SEED_RANGE:
        raise ValueError(f'{where}: "seed" must be a whole number in [-2**63, 2**64), got {seed!r}')
    if not isinstance(name, str) or not name or name.startswith(".") or Path(name).name != name:
        raise ValueError(f'{where}: "name" must be a plain file name, without folders, got {name!r}')
    return PromptItem(index, prompt.strip(), seed, name if name.lower().endswith(".png") else f"{name}.png")


def rank_batches(items: list[PromptItem], batch_size: int, rank: int, world: int) -> list[list[PromptItem]]:
    """Batches of ``batch_size`` consecutive prompts; process ``rank`` of ``world`` takes every world-th one.

    Batch-level, not prompt-level, striding: batched matrix products round differently at another batch
    size or with other batch mates, so a fixed batch is what makes one process and N give the same pixels.
    """
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[rank::world]


def manifest_line(item: PromptItem, settings: dict) -> dict:
    return {"file": item.file, "index": item.index, "prompt": item.prompt, "seed": item.seed, **settings}


def manifest_records(folder: Path) -> dict[str, dict]:
    """file -> its manifest line, from manifest.jsonl and the processes' files not merged yet (later lines win)."""
    records = {}
    for path in [folder / MANIFEST, *sorted(folder.glob(RANK_MANIFEST.format("*")))]:
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a last line cut short by a crash: its image never followed
                continue
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records[record["file"]] = record
    return records


def images_on_disk(folder: Path, items: list[PromptItem], settings: dict) -> set[str]:
    """The files of ``items`` already in ``folder``, each checked to be the image these settings would make."""
    records, done = manifest_records(folder), set()
    for item in (item for item in items if (folder / item.file).is_file()):
        expected, record = manifest_line(item, settings), records.get(item.file, {})
        differs = [key for key, value in expected.items() if record.get(key) != value]
        if differs:
            why = f"its manifest line differs in {', '.join(differs)}" if record else "no manifest line names it"
            raise ValueError(f"{folder / item.file} was not made from this prompt with these settings ({why}); "
                             "pass another --out-dir, or the settings it was made with")
        done.add(item.file)
    return done


def append_line(lines, item: PromptItem, settings: dict) -> None:
    """Record an image in a process's own manifest file; call it before the image is written, so that every
    image on disk has its line (a line whose image never came is dropped by ``merge_manifest``)."""
    lines.write(json.dumps(manifest_line(item, settings)) + "\n")
    lines.flush()


def merge_manifest(folder: Path) -> int:
    """Once every process is done: one manifest.jsonl of the images on disk, in index order; returns its length."""
    records = manifest_records(folder)
    kept = sorted((r for file, r in records.items() if (folder / file).is_file()), key=lambda r: r.get("index", -1))
    text = "".join(json.dumps(record) + "\n" for record in kept)
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for part in folder.glob(RANK_MANIFEST.format("*")):
        part.unlink()
    return len(kept)
