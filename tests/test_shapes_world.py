"""mini/world.py, the shapes world: its constants, renderer and checker agreement, captions and their token
offsets, and seeded disjoint splits."""
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data import to_tensor
from mini.world import (CELL_EDGES, COLORS, POSITIONS, EMPTY_TEMPLATE, TEMPLATES, Scene, ShapeObject, ShapesCaptions,
                        ShapesDataset, caption, cell_box, cell_slice, check_facts, render, random_scene,
                        sentence_token_starts, shapes_example, shapes_split, split_captions)
from model.longtext import split_sentences
from model.tokenizer import CLIPTokenizer

SCENES = shapes_split("test", 200)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_world_constants_are_the_spec():
    assert CELL_EDGES == [0, 21, 42, 64]
    assert cell_box(0) == (0, 0, 21, 21) and cell_box(5) == (42, 21, 64, 42) and cell_box(8) == (42, 42, 64, 64)
    assert cell_slice(5) == (slice(21, 42), slice(42, 64))
    assert POSITIONS == ("top left", "top middle", "top right", "middle left", "center", "middle right",
                         "bottom left", "bottom middle", "bottom right")
    assert COLORS == {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
                      "yellow": (235, 200, 20), "purple": (130, 50, 170), "orange": (240, 130, 20),
                      "cyan": (20, 190, 200), "black": (25, 25, 25)}


def test_scenes_follow_the_rules():
    for scene, _ in SCENES:
        cells = [o.cell for o in scene.objects]
        assert 4 <= len(cells) <= 9 and len(set(cells)) == len(cells)
        assert not set(scene.empty_mentioned) & set(cells)
        assert {o.shape for o in scene.objects} <= {"circle", "square", "triangle"}
    counts = {len(scene.objects) for scene, _ in SCENES}
    assert counts == set(range(4, 10))


def test_renders_are_pure_colours_inside_their_cells_at_the_right_size():
    white = (255, 255, 255)
    palette = set(COLORS.values()) | {white}
    for scene, _ in SCENES[:100]:
        pixels = np.asarray(render(scene))
        assert pixels.shape == (64, 64, 3)
        assert {tuple(p) for p in pixels.reshape(-1, 3)} <= palette  # no anti-aliasing: no mixed colours
        ink = np.any(pixels != 255, axis=-1)
        for cell in range(9):
            x0, y0, x1, y1 = cell_box(cell)
            obj = next((o for o in scene.objects if o.cell == cell), None)
            region = ink[y0:y1, x0:x1]
            if obj is None:
                assert not region.any()
                continue
            assert np.all(pixels[y0:y1, x0:x1][region] == COLORS[obj.color])
            alone = np.any(np.asarray(render(Scene((obj,), ()))) != 255, axis=-1)
            assert alone.sum() == region.sum()  # drawn alone, none of its ink falls outside its cell
            rows, cols = np.nonzero(region)
            width = cols.max() - cols.min() + 1
            expected = {"small": 0.50, "large": 0.85}[obj.size] * 21
            assert abs(width - expected) <= 1.5, (obj, width)


def test_renderer_and_checker_agree(tokenizer):
    holds, shapes = [], []
    for scene, text in SCENES:
        result = check_facts(render(scene), scene, text, tokenizer)
        holds += [f["holds"] for f in result["facts"]]
        shapes += [f["shape_holds"] for f in result["facts"] if f["kind"] == "object"]
        assert len(result["facts"]) == len(split_sentences(text))
    assert np.mean(holds) >= 0.99, np.mean(holds)
    assert np.mean(shapes) >= 0.95, np.mean(shapes)


def test_checker_rejects_wrong_colours_and_blank_or_inked_images():
    scene, _ = SCENES[0]
    wrong = Scene(tuple(ShapeObject(o.cell, o.shape, "blue" if o.color != "blue" else "red", o.size, o.jitter)
                        for o in scene.objects), scene.empty_mentioned)
    result = check_facts(render(wrong), scene)
    objects = [f for f in result["facts"] if f["kind"] == "object"]
    assert not any(f["holds"] for f in objects) and all(f["color_fraction"] == 0 for f in objects)

    blank = check_facts(Image.new("RGB", (64, 64), "white"), scene)
    assert all(f["holds"] == (f["kind"] == "empty") for f in blank["facts"])

    scene_with_empty = next(s for s, _ in SCENES if s.empty_mentioned)
    black = check_facts(Image.new("RGB", (64, 64), COLORS["black"]), scene_with_empty)
    assert not any(f["holds"] for f in black["facts"] if f["kind"] == "empty")


def test_checker_thresholds_follow_the_definition():
    # One small red square of 5x5 = 25 px in the 21x21 = 441 px top-left cell is 5.7% ink: the fact holds.
    # Light pixels (distance from white <= 60) are not ink, whatever their colour.
    scene = Scene((ShapeObject(0, "square", "red", "small", (0, 0)),), (4,))
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    pixels[0:5, 0:5] = COLORS["red"]
    assert check_facts(pixels, scene)["facts"][0]["holds"]
    pixels[0:5, 0:5] = (255, 255, 255)
    pixels[0:4, 0:5] = COLORS["red"]  # 20 px = 4.5% < 5%
    assert not check_facts(pixels, scene)["facts"][0]["holds"]
    pixels[0:10, 0:10] = (230, 220, 220)  # faint: distance from white about 46, not ink
    assert check_facts(pixels, scene)["facts"][0]["ink_fraction"] == 0
    pixels[21:25, 21:24] = COLORS["black"]  # 12 px of 441 in the center = 2.7% < 3%: still empty
    assert check_facts(pixels, scene)["facts"][1]["holds"]
    pixels[21:25, 21:25] = COLORS["black"]  # 16 px = 3.6%: no longer empty
    assert not check_facts(pixels, scene)["facts"][1]["holds"]
    with pytest.raises(ValueError, match="64×64"):
        check_facts(np.zeros((32, 32, 3)), scene)


def test_captions_use_the_templates_one_sentence_per_fact():
    patterns = [re.escape(t).replace(r"\{", "{").replace(r"\}", "}").format(
        size="(small|large)", color=f"({'|'.join(COLORS)})", shape="(circle|square|triangle)",
        position=f"({'|'.join(POSITIONS)})") for t in (*TEMPLATES, EMPTY_TEMPLATE)]
    shuffled, templates_used = 0, set()
    for scene, text in SCENES:
        sentences = split_sentences(text)
        assert len(sentences) == len(scene.objects) + len(scene.empty_mentioned)
        for sentence in sentences:
            matches = [i for i, p in enumerate(patterns) if re.fullmatch(p, sentence)]
            assert len(matches) == 1, sentence
            templates_used.add(matches[0])
        cells = [next(i for i, p in enumerate(POSITIONS) if p in s) for s in sentences]
        assert sorted(cells) == sorted([o.cell for o in scene.objects] + list(scene.empty_mentioned))
        for obj in scene.objects:
            assert any(f"{obj.size} {obj.color} {obj.shape}" in s and POSITIONS[obj.cell] in s for s in sentences)
        shuffled += cells != sorted(cells)
    assert templates_used == {0, 1, 2, 3}
    assert shuffled > 150


def test_token_starts_match_the_whole_caption(tokenizer):
    for scene, text in SCENES[:50]:
        sentences = split_sentences(text)
        ids = tokenizer.encode(text)
        starts = sentence_token_starts(sentences, tokenizer)
        assert starts[0] == 1  # index 0 is <sot>
        for sentence, start in zip(sentences, starts):
            own = tokenizer.encode(sentence)
            assert ids[start - 1:start - 1 + len(own)] == own
        assert starts[-1] - 1 + len(tokenizer.encode(sentences[-1])) == len(ids)


def test_caption_lengths_make_truncation_lose_facts(tokenizer):
    # With the spec's templates a sentence is 5-13 tokens and a caption has at most 9 sentences, so
    # captions run to about 40-120 tokens. What matters is that plain 77-token truncation loses facts.
    lengths, after_77, any_lost = [], [], []
    for scene, text in SCENES:
        facts = check_facts(render(scene), scene, text, tokenizer)["facts"]
        lengths.append(len(tokenizer.encode(text)))
        after_77 += [f["token_start"] >= 77 for f in facts]
        any_lost.append(any(f["token_start"] >= 76 for f in facts))
    assert 40 <= min(lengths) and max(lengths) <= 125
    assert np.mean(any_lost) >= 0.3       # a fact wholly lost to truncation in about 40% of captions
    assert 0.03 <= np.mean(after_77) <= 0.2


def test_splits_are_seeded_and_disjoint():
    assert shapes_example("train", 7) == shapes_example("train", 7)
    texts = {split: {t for _, t in shapes_split(split, 100)} for split in ("train", "val", "test")}
    assert len(texts["train"]) == 100
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    rng = random.Random(2_000_000_000 + 3)
    scene = random_scene(rng)
    assert (scene, caption(scene, rng)) == SCENES[3]  # test split = its own seed range
    with pytest.raises(ValueError, match="unknown split"):
        shapes_example("dev", 0)


def test_shapes_dataset_renders_on_the_fly():
    data = ShapesDataset("train", 50, caption_dropout=0.2)
    scene, text = shapes_example("train", 4)
    item = data[4]
    assert torch.equal(item["image"], to_tensor(render(scene)))
    assert item["caption"] in (text, "")
    assert 0 < sum(data[i]["caption"] == "" for i in range(50)) < 25
    assert all(data.caption_of(i) == shapes_example("train", i)[1] for i in range(50))  # never dropped
    with pytest.raises(IndexError):  # the first n examples end at n, though the split goes on
        data[50]
    prompts = ShapesCaptions(5)
    with pytest.raises(IndexError):
        prompts[5]
    assert len(prompts) == 5 and list(prompts) == split_captions("train", 5)
