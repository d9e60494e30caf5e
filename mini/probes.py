"""The instruments of the miniature's diagnosis (``python -m mini.diagnose``): a linear probe, where a drawn
colour comes from, and captions with exactly one error put in.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from mini import world
from mini.metrics import renders
from mini.world import Scene, ShapeObject
from model.preference import Scorer


def ridge_probe_accuracy(train_x, train_y, test_x, test_y, n_classes: int, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a one-vs-all ridge regression onto one-hot labels (with a bias column)."""
    def with_bias(x):
        return np.concatenate([x, np.ones((len(x), 1))], axis=1)
    a, b = with_bias(train_x), with_bias(test_x)
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ np.eye(n_classes)[train_y])
    return float(((b @ weights).argmax(1) == test_y).mean())


def other_colours(scene: Scene, obj: ShapeObject) -> set[str]:
    """The colours the caption names for objects other than ``obj``, ``obj``'s own colour left out."""
    return {o.color for o in scene.objects if o is not obj} - {obj.color}


def colour_source(image: np.ndarray, scene: Scene, obj: ShapeObject) -> str:
    """Where the colour drawn in ``obj``'s cell comes from, judged by the palette colour most of its ink is
    nearest to: the named colour, another object's colour (a binding error), a colour the caption does not
    name, or no object drawn (too little ink)."""
    ink, nearest = world.ink_and_nearest_colour(image[world.cell_slice(obj.cell)].astype(np.float64))
    if ink.mean() < world.OBJECT_MIN_INK:
        return "no object drawn"
    dominant = list(world.COLORS)[np.bincount(nearest[ink], minlength=len(world.COLORS)).argmax()]
    if dominant == obj.color:
        return "the named colour"
    return "another object's colour" if dominant in other_colours(scene, obj) else "a colour the caption does not name"


def same_wording_caption(split: str, index: int, scene: Scene) -> str:
    """The caption ``world.shapes_example(split, index)`` would give ``scene``: the same random templates and
    sentence order as the example's own caption (the generator's random state after drawing its scene)."""
    rng = random.Random(world.SPLIT_SEED_BASE[split] + index)
    world.random_scene(rng)
    return world.caption(scene, rng)


def swap_two_colours(scene: Scene, rng: random.Random) -> Scene | None:
    """Two objects of different colours trade colours (a binding error); None when all colours are equal."""
    pairs = [(a, b) for a in range(len(scene.objects)) for b in range(a)
             if scene.objects[a].color != scene.objects[b].color]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    objects = list(scene.objects)
    objects[a], objects[b] = (dataclasses.replace(objects[a], color=scene.objects[b].color),
                              dataclasses.replace(objects[b], color=scene.objects[a].color))
    return dataclasses.replace(scene, objects=tuple(objects))


def replace_one_colour(scene: Scene, rng: random.Random) -> Scene | None:
    """One object takes a colour no object of the scene has; None when the scene uses all eight."""
    unused = [c for c in world.COLORS if c not in {o.color for o in scene.objects}]
    if not unused:
        return None
    k, objects = rng.randrange(len(scene.objects)), list(scene.objects)
    objects[k] = dataclasses.replace(objects[k], color=rng.choice(unused))
    return dataclasses.replace(scene, objects=tuple(objects))


def move_one_object(scene: Scene, rng: random.Random) -> Scene | None:
    """One object moves to a cell the caption does not mention; None when every cell is mentioned."""
    taken = {o.cell for o in scene.objects} | set(scene.empty_mentioned)
    free = [c for c in range(len(world.POSITIONS)) if c not in taken]
    if not free:
        return None
    k, objects = rng.randrange(len(scene.objects)), list(scene.objects)
    objects[k] = dataclasses.replace(objects[k], cell=rng.choice(free))
    return dataclasses.replace(scene, objects=tuple(objects))


CAPTION_ERRORS = {"two objects' colours swapped": swap_two_colours, "one colour replaced": replace_one_colour,
          "one object moved": move_one_object}


@torch.no_grad()
def error_margins(scorer: Scorer, direction: torch.Tensor | None, split: str, examples: list, images: torch.Tensor,
                  true, put_error, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor] | None:
    """True minus wrong score, (original, text-relevant) [K], over the K examples of ``split`` whose caption
    ``put_error`` can change (worded and ordered like the true one); None when it changes none. ``true`` holds
    the score parts of all the examples with their own captions, ``images`` their renders in [0, 1]."""
    changed = [(i, put_error(scene, rng)) for i, (scene, _) in enumerate(examples)]
    kept = [(i, scene) for i, scene in changed if scene is not None]
    if not kept:
        return None
    index = torch.tensor([i for i, _ in kept])
    wrong = scorer.score(images[index], [same_wording_caption(split, i, scene) for i, scene in kept], direction)
    return true.original[index] - wrong.original, true.relevant[index] - wrong.relevant


def scorer_error_table(scorer: Scorer, direction: torch.Tensor, n_scenes: int) -> list[str]:
    """Markdown rows: how often the true caption outscores the same caption with one error put in, over the
    first ``n_scenes`` held-out real renders, for the original score and its text-relevant part (§4)."""
    examples = world.shapes_split("test", n_scenes)
    images = renders(examples).permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
        true = scorer.score(images, [caption for _, caption in examples], direction)
    rng = random.Random(0)
    rows = ["| error put into the caption | renders | true caption scores higher: original (%) | "
            "text-relevant (%) | mean margin ×100, original / text-relevant |", "|---|---|---|---|---|"]
    for name, put_error in CAPTION_ERRORS.items():
        margins = error_margins(scorer, direction, "test", examples, images, true, put_error, rng)
        if margins is None:
            rows.append(f"| {name} | 0 | | | |")
            continue
        original, relevant = margins
        rows.append(f"| {name} | {len(original)} | {100 * (original > 0).float().mean():.1f} | "
                    f"{100 * (relevant > 0).float().mean():.1f} | "
                    f"{100 * original.mean():.2f} / {100 * relevant.mean():.2f} |")
    return rows
