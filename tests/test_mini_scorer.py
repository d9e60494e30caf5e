"""The miniature's separate scorer (mini/scorer.py, ``python -m mini.pretrain --stage scorer``): facts read
back from captions equal the scenes, every hard negative is false and one fact away, the word-level colour
swap equals the diagnosis's regenerated caption, the losses equal a brute-force count, and the stage trains,
checks itself on held-out renders and resumes exactly."""
import json
import math
import random

import torch

from mini import pretrain, scorer, world
from mini.probes import same_wording_caption, swap_two_colours
from model.longtext import split_sentences
from model.weights import load_clip


def fact_of(obj) -> scorer.Fact:
    return scorer.Fact(obj.cell, obj.color, obj.shape, obj.size)


def test_a_captions_words_give_back_its_scene():
    for scene, caption in world.shapes_split("train", 200):
        objects = scorer.scene_objects(split_sentences(caption))
        assert objects == {o.cell: fact_of(o) for o in scene.objects}
        assert all(scorer.holds(scorer.parse_fact(s), objects) for s in split_sentences(caption))


def differences(a: scorer.Fact, b: scorer.Fact) -> int:
    return sum(getattr(a, k) != getattr(b, k) for k in ("cell", "color", "shape", "size"))


def test_one_word_negatives_are_false_and_one_fact_away():
    rng, seen = random.Random(0), 0
    for scene, caption in world.shapes_split("train", 100):
        sentences = split_sentences(caption)
        objects = scorer.scene_objects(sentences)
        for sentence in sentences:
            for wrong in scorer.one_word_negatives(sentence, objects, rng):
                assert not scorer.holds(scorer.parse_fact(wrong), objects), (sentence, wrong)
                assert differences(scorer.parse_fact(wrong), scorer.parse_fact(sentence)) == 1
                seen += 1
    assert seen > 1500


def test_negative_captions_are_false_and_keep_the_wording():
    rng = random.Random(0)
    for scene, caption in world.shapes_split("train", 100):
        sentences = split_sentences(caption)
        objects = scorer.scene_objects(sentences)
        for name, make in scorer.NEGATIVE_CAPTION_MAKERS.items():
            wrong = make(sentences, rng)
            if wrong is None:
                continue
            changed = [i for i, (a, b) in enumerate(zip(sentences, wrong)) if a != b]
            assert len(wrong) == len(sentences) and len(changed) == (2 if name == "swap two colours" else 1), name
            assert not all(scorer.holds(scorer.parse_fact(s), objects) for s in wrong), name


def test_the_word_swap_equals_the_diagnosis_caption_of_the_swapped_scene():
    rng = random.Random(0)
    for index, (scene, caption) in enumerate(world.shapes_split("test", 50)):
        swapped = swap_two_colours(scene, rng)
        if swapped is None:
            continue
        expected = split_sentences(same_wording_caption("test", index, swapped))
        sentences = split_sentences(caption)
        a, b = [i for i, (x, y) in enumerate(zip(sentences, expected)) if x != y]
        fa, fb = scorer.parse_fact(sentences[a]), scorer.parse_fact(sentences[b])
        ours = list(sentences)
        ours[a] = scorer.with_fact(ours[a], fa, scorer.Fact(fa.cell, fb.color, fa.shape, fa.size))
        ours[b] = scorer.with_fact(ours[b], fb, scorer.Fact(fb.cell, fa.color, fb.shape, fb.size))
        assert ours == expected


def test_the_sentence_loss_equals_a_brute_force_sum():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    truth = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    terms = []
    for i in range(3):
        false = sum(math.exp(logits[i, j]) for j in range(5) if not truth[i, j])
        terms += [-math.log(math.exp(logits[i, j]) / (math.exp(logits[i, j]) + false)) for j in range(5) if truth[i, j]]
    assert abs(scorer.sentence_loss(logits, truth).item() - sum(terms) / len(terms)) < 1e-5


def test_the_caption_loss_counts_each_images_own_negatives_only():
    image = torch.nn.functional.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    prompts, negative = torch.randn(2, 4), torch.randn(4)
    loss = scorer.caption_loss(10.0, image, prompts, [(1, negative)])
    row0 = torch.log_softmax(10 * image[0] @ prompts.T, 0)[0]
    row1 = torch.log_softmax(torch.cat([10 * image[1] @ prompts.T, (10 * image[1] @ negative)[None]]), 0)[1]
    columns = torch.log_softmax(10 * prompts @ image.T, 1).diagonal()
    expected = 0.5 * (-(row0 + row1) / 2 - columns.mean())
    assert abs(loss.item() - expected.item()) < 1e-5


def scorer_args(out, steps, *extra):
    return ["--stage", "scorer", "--data", "shapes:16", "--from-scratch", "test", "--out", str(out),
            "--batch-size", "4", "--steps", str(steps), "--lr", "1e-3", "--warmup", "1", "--workers", "0",
            "--direction-prompts", "8", "--heldout", "6", "--save-every", "2", *extra]


def test_the_scorer_stage_trains_checks_itself_and_resumes_exactly(tmp_path):
    straight = pretrain.main(scorer_args(tmp_path / "a", 4))
    pretrain.main(scorer_args(tmp_path / "b", 2))
    resumed = pretrain.main(scorer_args(tmp_path / "b", 4, "--resume"))
    assert [r["loss"] for r in straight[2:]] == [r["loss"] for r in resumed]
    assert all(0 <= r["fact_acc"] <= 1 for r in straight)
    checks = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [2, 4] and all(0 <= c["heldout_r1"] <= 100 for c in checks)
    model = load_clip(tmp_path / "a" / "scorer")
    assert model.config.projection_dim == 64 and (tmp_path / "a" / "scorer" / "direction.safetensors").is_file()
