"""WebDataset-style tar shards: shard names with brace ranges, the samples inside a shard, and each epoch's
split of the shards over ranks and DataLoader workers.

None of this is LongAlign. It is how large image-caption sets are usually stored (the paper's stage 1 trains
on about 2 M pairs): tar files whose members share a key stem (``000123.jpg`` with ``000123.txt`` or
``000123.json``), named ``train-{00000..00099}.tar``. ``data.ShardDataset`` builds the training dataset on it.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero-padded to the first bound's width), and
    ``{x,y}`` -> x, y; several braces multiply, left to right (WebDataset's shard-name convention)."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, dots, last = match.group(1).partition("..")
    if dots and first.isdigit() and last.isdigit():
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        choices = match.group(1).split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def shard_paths(spec: str | Path) -> list[Path] | None:
    """The tar shards a data spec names, or None when it names none: a spec with braces expands
    (``shards/train-{00000..00099}.tar``), a ``.tar`` file is one shard, and a folder holding ``.tar`` files
    means those, sorted. Only uncompressed tars: reading a member by its offset needs a seekable file."""
    text, path = str(spec), Path(spec)
    if "{" in text:
        paths = [Path(name) for name in expand_braces(text)]
    elif path.suffix == ".tar":
        paths = [path]
    elif path.is_dir() and any(path.glob("*.tar")):
        paths = sorted(path.glob("*.tar"))
    else:
        return None
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(paths)} shards of {spec} are missing, e.g. {missing[0]}; "
                         "check the pattern or the folder")
    return paths


@dataclass(frozen=True)
class TarMember:
    """A file inside a tar shard, opened like a path on disk: one seek and one read in the shard, in whichever
    process (DataLoader worker) asks, so no open tar handle is ever shared between processes."""
    shard: Path
    offset: int
    size: int
    name: str

    def open(self, mode: str = "rb") -> io.BytesIO:
        with open(self.shard, mode) as file:
            file.seek(self.offset)
            return io.BytesIO(file.read(self.size))

    def is_file(self) -> bool:
        return self.shard.is_file()

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


def read_shard(shard: Path, image_suffixes: tuple[str, ...]) -> list[tuple[TarMember, str]]:
    """(image, caption) of every sample of one shard, in member order. Members sharing a key (the name up to
    the first dot of the file name, as in WebDataset) form a sample: the image is KEY.<one of image_suffixes>,
    the caption KEY.txt, else the "caption" field of KEY.json, else "". Only headers and captions are read."""
    images, captions = {}, {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                key, suffix = f"{folder}/{stem}", "." + suffix.lower()
                if member.isfile() and suffix in image_suffixes:
                    images.setdefault(key, TarMember(shard, member.offset_data, member.size, member.name))
                elif member.isfile() and suffix in (".txt", ".json"):
                    captions[key, suffix] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{shard} is not a readable uncompressed tar file ({err}); re-create it or leave it "
                         "out") from None
    return [(member, caption_of(captions, key)) for key, member in images.items()]


def caption_of(captions: dict, key: str) -> str:
    if (key, ".txt") in captions:
        return captions[key, ".txt"]
    with contextlib.suppress(json.JSONDecodeError):
        entry = json.loads(captions.get((key, ".json"), "{}"))
        if isinstance(entry, dict) and isinstance(entry.get("caption"), str):
            return entry["caption"]
    return ""


def epoch_split(sizes: list[int], epoch: int, seed: int, batch_size: int, workers: int, rank: int,
                world: int) -> list[int]:
    """This rank's sample positions in ``epoch`` (0 .. sum(sizes)-1, shard after shard), batch after batch.

    The shards are dealt, in an order seeded by (seed, epoch), to the ranks and then to each rank's streams,
    one stream per DataLoader worker (fewer when a rank has fewer shards than workers). Each stream reads its
    own shards, every shard in a seeded order. Batch k comes from stream k % streams, as the DataLoader hands
    batch k to worker k % workers: with at least world × workers shards no two workers read the same shard.
    Every stream gives the same number of batches, in every epoch, so all ranks take the same steps. A pure
    function of its arguments, so a run resumed at any batch reads what an uninterrupted one would.
    """
    if len(sizes) < world:
        raise ValueError(f"{len(sizes)} shards with usable samples cannot be split over {world} ranks; write the "
                         "data into more shards or run fewer processes")
    streams = max(1, min(workers, len(sizes) // world))
    fewest = len(sizes) // world // streams  # shards dealt to every stream, whatever the order
    batches = sum(sorted(sizes)[:fewest]) // batch_size  # what the smallest such stream holds
    if batches == 0:
        raise ValueError(f"a stream of shards holds fewer than {batch_size} samples, one batch (the shards are "
                         f"split over {world} ranks × {streams} workers); lower the batch size or the workers")
    starts = np.cumsum([0, *sizes])
    dealt = np.random.default_rng([seed, epoch]).permutation(len(sizes))[rank::world]
    mine = [[int(starts[s]) + int(i) for s in stream for i in np.random.default_rng([seed, epoch, s]).permutation(
        sizes[s])] for stream in (dealt[w::streams] for w in range(streams))]
    return [i for k in range(batches) for stream in mine for i in stream[k * batch_size:(k + 1) * batch_size]]
