"""WebDataset-style tar shards: shard names, the samples inside a shard, items preprocessed as files on disk
are, and each epoch's split over ranks and DataLoader workers with an exact resume (2 ranks × 2 workers,
through runtime.endless_batches and real DataLoader worker processes)."""
import io
import itertools
import json
import logging
import tarfile

import pytest
import torch
from PIL import Image

from data import (CaptionImageDataset, ShardDataset, data_order, image_dataset, resize_and_center_crop,
                  to_tensor)
from model import runtime
from model.shards import epoch_split, expand_braces, shard_paths

SIZES = (6, 7, 6, 5, 6, 8, 6, 7)  # samples in each of the 8 shards: uneven, as real last shards are
BATCH, WORKERS, WORLD = 2, 2, 2


def add_member(tar, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def image_bytes(color, size=(24, 16), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def write_shards(folder, sizes=SIZES):
    """Shards train-00000.tar ...; sample i of shard s has the caption "s{s} i{i}" (every other one in JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, size in enumerate(sizes):
        with tarfile.open(folder / f"train-{s:05d}.tar", "w") as tar:
            for i in range(size):
                key = f"{s:05d}{i:04d}"
                add_member(tar, f"{key}.png", image_bytes((30 * s, 20 * i, 0)))
                if i % 2:
                    add_member(tar, f"{key}.json", json.dumps({"caption": f"s{s} i{i}", "width": 24}).encode())
                else:
                    add_member(tar, f"{key}.txt", f"s{s} i{i}".encode())
    return str(folder / f"train-{{00000..{len(sizes) - 1:05d}}}.tar")


def shard_of(caption: str) -> int:
    return int(caption.split()[0][1:])


class WorkerTagged(ShardDataset):
    """Each caption says which DataLoader worker read it."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return {**item, "caption": f"{item['caption']}|{torch.utils.data.get_worker_info().id}"}


def env(rank, world=WORLD):
    return runtime.Env(rank, world, torch.device("cpu"), None)


def read_batches(dataset, position, n, rank, workers=WORKERS):
    batches = runtime.endless_batches(dataset, position, BATCH, 7, workers, env(rank))
    return list(itertools.islice(batches, n))


def test_brace_patterns_expand_as_webdataset_names_shards(tmp_path):
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    spec = write_shards(tmp_path / "shards", (1, 1, 1))
    assert spec.endswith("train-{00000..00002}.tar")
    three = [tmp_path / "shards" / f"train-0000{s}.tar" for s in range(3)]
    assert shard_paths(spec) == three
    assert shard_paths(tmp_path / "shards") == three  # a folder of .tar files
    assert shard_paths(three[1]) == [three[1]]
    assert shard_paths(tmp_path / "m.jsonl") is None and shard_paths("shapes:4") is None
    with pytest.raises(ValueError, match=r"2 of the 5 shards .* are missing, e.g. .*train-00003.tar") as err:
        shard_paths(str(tmp_path / "shards" / "train-{00000..00004}.tar"))
    assert "\n" not in str(err.value)


def test_a_shard_is_read_and_preprocessed_as_files_are(tmp_path, caplog):
    colors = {"a": (255, 0, 0), "sub/b": (0, 255, 0), "c": (0, 0, 255), "d": (9, 9, 9)}
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        add_member(tar, "a.jpg", image_bytes(colors["a"], (40, 20), "JPEG"))
        add_member(tar, "a.txt", b"A red thing.\n\nIt is red.")
        add_member(tar, "a.cls", b"3")  # other members of a sample are ignored
        add_member(tar, "sub/b.webp", image_bytes(colors["sub/b"], fmt="WEBP"))
        add_member(tar, "sub/b.json", json.dumps({"caption": " A green thing. "}).encode())
        add_member(tar, "c.jpeg", image_bytes(colors["c"], fmt="JPEG"))
        add_member(tar, "c.json", b'{"text": "no caption field"}')
        add_member(tar, "d.png", image_bytes(colors["d"]))  # no caption at all
    with caplog.at_level(logging.WARNING):
        shards = image_dataset(tmp_path / "one.tar", 16, caption_dropout=0.0, seed=0)
    assert isinstance(shards, ShardDataset) and len(shards) == 2
    assert [r.message for r in caplog.records if "skipped 2 of 4 records" in r.message]
    assert [shards[i]["caption"] for i in range(2)] == ["A red thing. It is red.", "A green thing."]  # "\n\n" made a space
    with Image.open(io.BytesIO(image_bytes(colors["a"], (40, 20), "JPEG"))) as image:
        expected = to_tensor(resize_and_center_crop(image.convert("RGB"), 16))
    assert torch.equal(shards[0]["image"], expected)
    assert all(shards.__class__([tmp_path / "one.tar"], 16, caption_dropout=1.0)[i]["caption"] == "" for i in range(2))
    with pytest.raises(ValueError, match="image root only applies to a JSONL or CSV manifest, not to tar shards"):
        image_dataset(tmp_path / "one.tar", 16, 0.0, 0, image_root=tmp_path)
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ValueError, match="broken.tar is not a readable uncompressed tar file") as err:
        image_dataset(tmp_path / "broken.tar", 16, 0.0, 0)
    assert "\n" not in str(err.value)


def test_two_ranks_and_two_workers_each_read_their_own_shards(tmp_path):
    dataset = WorkerTagged(shard_paths(write_shards(tmp_path / "shards")), 16, caption_dropout=0.0)
    per_epoch = len(dataset.epoch_order(0, 7, BATCH, WORKERS, 0, WORLD)) // BATCH
    assert per_epoch == 2 * ((5 + 6) // BATCH)  # 2 streams a rank, each given at least the 2 smallest shards' worth
    streams, seen = {}, []
    for rank in range(WORLD):
        assert len(dataset.epoch_order(0, 7, BATCH, WORKERS, rank, WORLD)) // BATCH == per_epoch  # equal steps
        for k, batch in enumerate(read_batches(dataset, runtime.DataPosition(), per_epoch, rank)):
            captions, workers = zip(*(caption.split("|") for caption in batch["caption"]))
            assert set(workers) == {str(k % WORKERS)}  # the DataLoader's round-robin over its workers
            streams.setdefault((rank, workers[0]), set()).update(shard_of(c) for c in captions)
            seen += captions
    assert len(seen) == len(set(seen)) == WORLD * per_epoch * BATCH  # disjoint samples
    assert len(streams) == WORLD * WORKERS
    assert sum(len(s) for s in streams.values()) == len(SIZES)  # no shard read by two (rank, worker) pairs
    assert set().union(*streams.values()) == set(range(len(SIZES)))  # and every shard read


@pytest.mark.parametrize("rank", range(WORLD))
def test_a_resume_mid_epoch_reads_what_an_uninterrupted_run_reads_next(tmp_path, rank):
    spec = write_shards(tmp_path / "shards")
    per_epoch = len(ShardDataset(shard_paths(spec), 16).epoch_order(0, 7, BATCH, WORKERS, rank, WORLD)) // BATCH
    whole = read_batches(ShardDataset(shard_paths(spec), 16, caption_dropout=0.3, seed=7), runtime.DataPosition(),
                         per_epoch + 3, rank)
    position = runtime.DataPosition()
    first = read_batches(ShardDataset(shard_paths(spec), 16, caption_dropout=0.3, seed=7), position, 3, rank)
    assert (position.epoch, position.batches) == (0, 3)
    saved = runtime.DataPosition(position.epoch, position.batches)  # what a checkpoint holds
    rest = read_batches(ShardDataset(shard_paths(spec), 16, caption_dropout=0.3, seed=7), saved, per_epoch, rank)
    assert (saved.epoch, saved.batches) == (1, 3)  # continued into the next epoch
    for a, b in zip(whole, first + rest, strict=True):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    epochs = [sorted(c for batch in part for c in batch["caption"]) for part in (whole[:3], whole[per_epoch:])]
    assert epochs[0] != epochs[1]  # a new epoch deals the shards anew


def test_the_split_is_exact_and_refuses_what_cannot_be_split(tmp_path):
    sizes = [5, 3, 4]
    # 3 shards over 2 ranks: one stream a rank, cut to what the smallest shard (3) holds: one batch of 2
    orders = [epoch_split(sizes, 0, 0, 2, workers=2, rank=rank, world=2) for rank in range(2)]
    assert [len(order) for order in orders] == [2, 2] and not set(orders[0]) & set(orders[1])
    with pytest.raises(ValueError, match="3 shards with usable samples cannot be split over 4 ranks"):
        epoch_split(sizes, 0, 0, 2, workers=0, rank=0, world=4)
    dataset = ShardDataset(shard_paths(write_shards(tmp_path / "shards", (3, 3))), 16)
    with pytest.raises(ValueError, match="fewer than 4 samples, one batch .* lower the batch size") as err:
        data_order(dataset, 4, 2, 1)
    assert "\n" not in str(err.value)
    assert data_order(dataset, 2, 2, 1) == {"ranks": 1, "workers": 2, "batch_size": 2}
    (tmp_path / "a.png").write_bytes(image_bytes((0, 0, 0)))
    (tmp_path / "a.txt").write_text("black")
    assert data_order(CaptionImageDataset(tmp_path, 16), 4, 2, 8) == {}  # DistributedSampler's order is global
