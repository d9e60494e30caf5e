"""Long-caption image datasets and prompt lists: layouts, preprocessing, caption dropout, bad records, errors,
and what a --data spec means (a path, or the shapes world)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data import (CaptionImageDataset, PromptDataset, default_resolution, first_captions, image_dataset,
                  prompt_dataset, resize_and_center_crop, to_tensor, validation_images, validation_prompts)
from mini.world import ShapesCaptions, ShapesDataset, render, shapes_example, split_captions, write_shapes_manifest


def solid(path, color, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_manifest(path, entries):
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n", encoding="utf-8")
    return path


def test_preprocessing_resizes_the_shorter_side_and_crops_the_centre():
    # Three vertical stripes, 30 px each: after resizing 90x40 -> 36x16 and cropping 16, only the middle
    # (green) stripe remains.
    image = Image.new("RGB", (90, 40), (255, 0, 0))
    image.paste((0, 255, 0), (30, 0, 60, 40))
    image.paste((0, 0, 255), (60, 0, 90, 40))
    cropped = resize_and_center_crop(image, 16)
    assert cropped.size == (16, 16)
    pixels = np.asarray(cropped)
    assert np.all(pixels[:, 4:12, 1] > 200) and np.all(pixels[:, 4:12, [0, 2]] < 60)
    tall = resize_and_center_crop(Image.new("RGB", (20, 50)), 16)
    assert tall.size == (16, 16)


def test_to_tensor_maps_to_minus_one_one():
    image = Image.new("RGB", (8, 8), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 4, 8))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert torch.all(tensor[:, :, :4] == -1) and torch.all(tensor[:, :, 4:] == 1)


def test_manifest_dataset_loads_relative_paths_and_batches(tmp_path):
    solid(tmp_path / "imgs" / "a.png", (255, 0, 0))
    solid(tmp_path / "imgs" / "sub" / "b.jpg", (0, 0, 255), size=(16, 30))
    manifest = write_manifest(tmp_path / "train.jsonl", [
        {"image": "imgs/a.png", "caption": "A red thing. It is red."},
        {"image": "imgs/sub/b.jpg", "caption": "  A blue thing.  ", "extra": 1},
    ])
    data = CaptionImageDataset(manifest, resolution=16, caption_dropout=0.0)
    assert len(data) == 2
    first, second = data[0], data[1]
    assert first["caption"] == "A red thing. It is red." and second["caption"] == "A blue thing."
    assert first["image"].shape == (3, 16, 16)
    torch.testing.assert_close(first["image"][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 16) and len(batch["caption"]) == 2


def test_folder_dataset_pairs_images_with_txt_and_skips_missing_captions(tmp_path, caplog):
    solid(tmp_path / "one.png", (0, 255, 0))
    (tmp_path / "one.txt").write_text("A green square.\n")
    solid(tmp_path / "nested" / "two.jpg", (0, 0, 0))
    (tmp_path / "nested" / "two.txt").write_text("Black.")
    solid(tmp_path / "no_caption.png", (9, 9, 9))
    (tmp_path / "empty.txt").write_text("   ")
    solid(tmp_path / "empty.png", (9, 9, 9))
    with caplog.at_level(logging.WARNING):
        data = CaptionImageDataset(tmp_path, resolution=8, caption_dropout=0.0)
    assert sorted(data[i]["caption"] for i in range(len(data))) == ["A green square.", "Black."]
    assert [r.message for r in caplog.records if "skipped 2 of 4 records" in r.message]


def test_bad_records_are_skipped_with_a_count_never_a_crash(tmp_path, caplog):
    solid(tmp_path / "good0.png", (255, 0, 0))
    solid(tmp_path / "good1.png", (0, 255, 0))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"image": "good0.png", "caption": "red"},
        {"image": "missing.png", "caption": "gone"},
        {"image": "corrupt.png", "caption": "broken"},
        {"image": "good1.png", "caption": ""},
        {"image": "good1.png", "caption": "green"},
    ])
    with caplog.at_level(logging.WARNING):
        data = CaptionImageDataset(manifest, resolution=8, caption_dropout=0.0)
        assert len(data) == 3  # the missing file and the empty caption are found up front
        assert any("skipped 2 of 5 records" in r.message for r in caplog.records)
        captions = [data[i]["caption"] for i in range(len(data))]  # a whole epoch, corrupt image included
    assert captions == ["red", "green", "green"]  # the corrupt record is replaced by the next readable one
    warnings = [r.message for r in caplog.records if "unreadable image" in r.message]
    assert len(warnings) == 1 and "corrupt.png" in warnings[0] and "1 unreadable so far" in warnings[0]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        CaptionImageDataset(tmp_path, resolution=100)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        CaptionImageDataset(tmp_path / "empty_dir", resolution=64)
    with pytest.raises(ValueError, match="data source not found"):
        CaptionImageDataset(tmp_path / "nope", resolution=64)
    solid(tmp_path / "a.png", (0, 0, 0))
    bad_key = tmp_path / "bad_key.jsonl"
    bad_key.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"line 3: missing key 'caption'"):
        CaptionImageDataset(bad_key, resolution=8)
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text('{"image": "a.png", "caption": "x"}\n{"image": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        CaptionImageDataset(bad_json, resolution=8)
    nothing_usable = write_manifest(tmp_path / "none.jsonl", [{"image": "gone.png", "caption": "x"}])
    with pytest.raises(ValueError, match="no usable images"):
        CaptionImageDataset(nothing_usable, resolution=8)


def test_caption_dropout_rate_is_deterministic_and_varies_by_epoch(tmp_path):
    solid(tmp_path / "a.png", (0, 0, 0))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "caption": f"c{i}"} for i in range(200)])

    def dropped(data):
        return [data[i]["caption"] == "" for i in range(len(data))]

    data = CaptionImageDataset(manifest, resolution=8, caption_dropout=0.25, seed=3)
    epoch0 = dropped(data)
    assert 0.15 < np.mean(epoch0) < 0.35
    assert dropped(CaptionImageDataset(manifest, resolution=8, caption_dropout=0.25, seed=3)) == epoch0
    data.set_epoch(1)
    assert dropped(data) != epoch0
    assert not any(dropped(CaptionImageDataset(manifest, resolution=8, caption_dropout=0.0)))
    assert all(dropped(CaptionImageDataset(manifest, resolution=8, caption_dropout=1.0)))


def test_prompt_dataset_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n   \nsecond prompt  \n")
    assert list(PromptDataset(txt)) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a long caption"}\n\n{"prompt": "a prompt", "id": 2}\n{"prompt": " "}\n')
    assert list(PromptDataset(jsonl)) == ["a long caption", "a prompt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "ok"}\n{"text": "no key"}\n')
    with pytest.raises(ValueError, match=r'line 2: needs a "caption" or "prompt"'):
        PromptDataset(bad)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        PromptDataset(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match="prompt file not found"):
        PromptDataset(tmp_path / "missing.txt")


def test_shapes_manifest_loads_as_real_data(tmp_path):
    manifest = write_shapes_manifest(tmp_path / "shapes", "val", 5)
    data = CaptionImageDataset(manifest, resolution=64, caption_dropout=0.0)
    assert len(data) == 5
    for index in range(5):
        scene, text = shapes_example("val", index)
        item = data[index]
        assert item["caption"] == text
        assert torch.equal(item["image"], to_tensor(render(scene)))  # PNG is lossless; 64 px needs no resize
    first = json.loads(manifest.read_text().splitlines()[0])
    assert first["split"] == "val" and first["index"] == 0


def test_a_shapes_spec_names_the_shapes_world():
    shapes = image_dataset("shapes:6", 64, caption_dropout=1.0, seed=1)
    assert isinstance(shapes, ShapesDataset) and len(shapes) == 6 and shapes.seed == 1
    assert shapes[2]["image"].shape == (3, 64, 64) and shapes[2]["caption"] == ""  # every caption dropped
    assert first_captions(shapes, 10) == split_captions("train", 6)  # never dropped, at most len(dataset)
    assert len(image_dataset("shapes", 64, 0.1, 0)) == 100_000  # the default number of training scenes
    prompts = prompt_dataset("shapes:4")
    assert isinstance(prompts, ShapesCaptions) and first_captions(prompts, 4) == split_captions("train", 4)
    assert validation_prompts("shapes:4", prompts, 2) == split_captions("val", 2)  # held out, not training
    held_out = validation_images("shapes:4", shapes, 2)
    assert torch.equal(held_out[1], to_tensor(render(shapes_example("val", 1)[0])))
    assert default_resolution("shapes") == default_resolution("shapes:9") == 64


def test_bad_shapes_specs_get_one_line_errors():
    with pytest.raises(ValueError, match="use --resolution 64") as err:
        image_dataset("shapes", 512, 0.1, 0)
    assert "\n" not in str(err.value)
    for bad in ("shapes:0", "shapes:x", "shapes:", "shapes:-3"):
        with pytest.raises(ValueError, match="shapes:N"):
            prompt_dataset(bad)
    with pytest.raises(ValueError, match="caption dropout"):
        image_dataset("shapes:4", 64, 1.5, 0)


def test_a_path_spec_reads_files(tmp_path):
    solid(tmp_path / "a.png", (0, 0, 0))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "caption": f"c{i}"} for i in range(3)])
    images = image_dataset(manifest, 8, caption_dropout=1.0, seed=0)
    assert isinstance(images, CaptionImageDataset) and images[0]["caption"] == ""
    assert first_captions(images, 5) == ["c0", "c1", "c2"] and validation_prompts(manifest, images, 2) == ["c0", "c1"]
    assert default_resolution(manifest) == 512
    assert validation_images(manifest, images, 5).shape == (3, 3, 8, 8)  # at most as many as there are
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    assert isinstance(prompt_dataset(prompts), PromptDataset) and first_captions(prompt_dataset(prompts), 1) == ["one"]
    with pytest.raises(ValueError, match="text file, but images are needed") as err:  # a prompt list for sft
        image_dataset(prompts, 64, 0.1, 0)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="prompt file not found"):
        prompt_dataset(tmp_path / "missing.txt")


def test_the_releases_columns_in_jsonl_and_csv_with_an_image_root(tmp_path):
    solid(tmp_path / "images" / "x" / "a.png", (255, 0, 0))
    solid(tmp_path / "images" / "b.png", (0, 0, 255))
    (tmp_path / "lists").mkdir()
    jsonl = write_manifest(tmp_path / "lists" / "train.jsonl", [
        {"path": "x/a.png", "caption": "A red square.\n\nIt is red."},
        {"path": str(tmp_path / "images" / "b.png"), "caption": "Blue."},  # absolute paths stay as they are
    ])
    csv_file = tmp_path / "lists" / "train.csv"
    csv_file.write_text('path,caption\nx/a.png,"A red square.\n\nIt is red."\nb.png,Blue.\n', encoding="utf-8")
    for manifest in (jsonl, csv_file):
        images = image_dataset(manifest, 8, caption_dropout=0.0, seed=0, image_root=tmp_path / "images")
        assert first_captions(images, 2) == ["A red square. It is red.", "Blue."]  # "\n\n" made a space
        torch.testing.assert_close(images[0]["image"][:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    beside = tmp_path / "beside.csv"  # without an image root, paths are relative to the manifest's folder
    beside.write_text("image,caption,width\nimages/b.png,Blue.,24\n", encoding="utf-8")
    assert first_captions(image_dataset(beside, 8, 0.0, 0), 1) == ["Blue."]
    no_caption = tmp_path / "bad.csv"
    no_caption.write_text("path,text\nimages/b.png,Blue.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.csv line 2: missing key 'caption'; a CSV manifest needs the columns"):
        image_dataset(no_caption, 8, 0.0, 0)
    with pytest.raises(ValueError, match="image root only applies to a JSONL or CSV manifest, not to a folder"):
        image_dataset(tmp_path / "images", 8, 0.0, 0, image_root=tmp_path)


def test_small_images_are_said_to_be_upscaled_once_per_dataset(tmp_path, caplog):
    for i in range(120):
        solid(tmp_path / "small" / f"{i:03d}.png", (i, 0, 0), size=(12, 30))
        (tmp_path / "small" / f"{i:03d}.txt").write_text(f"caption {i}")
    solid(tmp_path / "small" / "large.png", (0, 0, 0), size=(16, 40))
    (tmp_path / "small" / "large.txt").write_text("large")
    with caplog.at_level(logging.WARNING):
        data = CaptionImageDataset(tmp_path / "small", resolution=16, caption_dropout=0.0)
        for i in range(len(data)):
            assert data[i]["image"].shape == (3, 16, 16)
    notes = [r.message for r in caplog.records]
    assert notes == ["note: 100 of the first 100 images are smaller than 16 px on the shorter side and are upscaled"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        CaptionImageDataset(tmp_path / "small", resolution=8, caption_dropout=0.0)
    assert not caplog.records  # nothing to say when every image is large enough
