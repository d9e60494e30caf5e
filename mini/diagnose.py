"""Where does the miniature lose the caption: in the text encoder or the UNet? And does its scorer notice?

Four measurements on a trained miniature pipeline (default: the shipped ``weights/mini``):

1. **Linear probes of the text encoder.** For random single sentences of the shapes world, a ridge
   regression from the sentence's last kept row (its final "." token: segment encoding drops <eot>, so this
   is the last row the UNet sees for that sentence, and causal attention has shown it the whole sentence)
   predicts the object's cell, colour, shape and size. Accuracy on held-out sentences next to chance. High
   accuracy means every fact of a sentence reaches the UNet's context in a linearly readable form.
2. **How much the UNet uses the caption.** The ε-prediction MSE on training scenes at fixed timesteps, with
   the scene's own caption, another scene's caption, and the empty caption. The ratio "other / own" is
   the caption's worth at that noise level: 1.0 means the UNet ignores the text there.
3. **Where a generated object's colour comes from.** For held-out captions, the dominant colour of each
   object's cell in the generated image: the named colour, the colour of another object in the same caption
   (a binding error), a colour the caption never names, or no object at all. If the UNet read colours
   but bound them to the wrong cells, the second share would dominate.
4. **Whether the preference scorer sees those errors.** For held-out real renders, the scorer's score with
   the true caption against the same caption with one error put in, worded and ordered the same way: two
   objects' colours swapped (the UNet's binding error), one colour replaced by a colour the scene lacks, one
   object moved to a cell the caption does not mention. The share of renders where the true caption scores
   higher, for the original score and its text-relevant part (LongAlign §4). Near 50% means the reward
   cannot teach the model to avoid that error.

    python -m mini.diagnose
    python -m mini.diagnose --weights runs/mini/sft-segment/pipeline --scenes 64
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data import to_tensor
from mini import world
from mini.metrics import SHIPPED, generate, load_scorer, renders, scene_noise
from mini.world import Scene, ShapeObject
from model.diffusion import NoiseSchedule
from model.longtext import LongPromptEncoder
from model.preference import Scorer
from model.tokenizer import frame
from model.weights import load_pipeline

TIMESTEPS = (100, 300, 500, 700, 850, 950)


def random_sentence(rng: random.Random) -> tuple[str, dict[str, int]]:
    """One object sentence of the shapes world and the class index of each of its four attributes."""
    cell, color = rng.randrange(len(world.POSITIONS)), rng.choice(list(world.COLORS))
    shape, size = rng.choice(world.SHAPES), rng.choice(list(world.SIZES))
    sentence = rng.choice(world.TEMPLATES).format(size=size, color=color, shape=shape, position=world.POSITIONS[cell])
    labels = {"cell": cell, "colour": list(world.COLORS).index(color), "shape": world.SHAPES.index(shape),
              "size": list(world.SIZES).index(size)}
    return sentence, labels


@torch.no_grad()
def last_kept_states(pipeline, sentences: list[str]) -> np.ndarray:
    """The text encoder's last-layer state at each sentence's last content token (row len(ids) of
    [sot] + ids + [eot] + pads), the last row segment encoding keeps: [N, D]."""
    ids = [pipeline.tokenizer.encode(s) for s in sentences]
    hidden = pipeline.text_encoder(torch.tensor([frame(i) for i in ids]))
    return torch.stack([hidden[n, len(i)] for n, i in enumerate(ids)]).float().numpy()


def ridge_probe_accuracy(train_x, train_y, test_x, test_y, n_classes: int, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a one-vs-all ridge regression onto one-hot labels (with a bias column)."""
    def with_bias(x):
        return np.concatenate([x, np.ones((len(x), 1))], axis=1)
    a, b = with_bias(train_x), with_bias(test_x)
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ np.eye(n_classes)[train_y])
    return float(((b @ weights).argmax(1) == test_y).mean())


def probe_table(pipeline, n_train: int, n_test: int) -> list[str]:
    rng = random.Random(0)
    pairs = [random_sentence(rng) for _ in range(n_train + n_test)]
    states = last_kept_states(pipeline, [s for s, _ in pairs])
    rows = ["| attribute | classes | probe accuracy (%) | chance (%) |", "|---|---|---|---|"]
    for name in pairs[0][1]:
        labels = np.array([lab[name] for _, lab in pairs])
        n_classes = int(labels.max()) + 1
        accuracy = ridge_probe_accuracy(states[:n_train], labels[:n_train], states[n_train:], labels[n_train:],
                                        n_classes)
        rows.append(f"| {name} | {n_classes} | {100 * accuracy:.1f} | {100 / n_classes:.1f} |")
    return rows


@torch.no_grad()
def caption_use_table(pipeline, n_scenes: int) -> list[str]:
    examples = [world.shapes_example("train", i) for i in range(n_scenes)]
    images = torch.stack([to_tensor(world.render(scene)) for scene, _ in examples])
    captions = [caption for _, caption in examples]
    encoder = LongPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
    contexts = {"own": encoder(captions), "other": encoder(captions[1:] + captions[:1]),
                "empty": encoder([""] * n_scenes)}
    mean, _ = pipeline.vae.encode(images)
    latents = mean * pipeline.vae.scaling_factor
    schedule, generator = NoiseSchedule(), torch.Generator().manual_seed(0)
    rows = ["| timestep | ε-MSE, own caption | another scene's | empty | other / own |", "|---|---|---|---|---|"]
    for t in TIMESTEPS:
        timesteps = torch.full((n_scenes,), t)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = schedule.add_noise(latents, noise, timesteps)
        mse = {name: (pipeline.unet(noisy, timesteps, c) - noise).square().mean().item()
               for name, c in contexts.items()}
        rows.append(f"| {t} | {mse['own']:.4f} | {mse['other']:.4f} | {mse['empty']:.4f} | "
                    f"{mse['other'] / mse['own']:.3f} |")
    return rows


def other_colours(scene: Scene, obj: ShapeObject) -> set[str]:
    """The colours the caption names for objects other than ``obj``, ``obj``'s own colour left out."""
    return {o.color for o in scene.objects if o is not obj} - {obj.color}


def colour_source(image: np.ndarray, scene: Scene, obj: ShapeObject) -> str:
    """Where the colour drawn in ``obj``'s cell comes from (see the module's docstring, point 3)."""
    ink, nearest = world.ink_and_nearest_colour(image[world.cell_slice(obj.cell)].astype(np.float64))
    if ink.mean() < world.OBJECT_MIN_INK:
        return "no object drawn"
    dominant = list(world.COLORS)[np.bincount(nearest[ink], minlength=len(world.COLORS)).argmax()]
    if dominant == obj.color:
        return "the named colour"
    return "another object's colour" if dominant in other_colours(scene, obj) else "a colour the caption does not name"


def colour_source_table(pipeline, n_scenes: int) -> list[str]:
    examples = world.shapes_split("test", n_scenes)
    noise = scene_noise(n_scenes, pipeline.vae, seed=0)
    images = generate(pipeline, [caption for _, caption in examples], "segment", noise, steps=10, cfg=3.0,
                      batch_size=50)  # the evaluation table's sampler
    sources, wrong_in_caption = Counter(), []
    for image, (scene, _) in zip(images.numpy(), examples):
        for obj in scene.objects:
            sources[colour_source(image, scene, obj)] += 1
            wrong_in_caption.append(len(other_colours(scene, obj)) / (len(world.COLORS) - 1))
    total = sum(sources.values())
    rows = ["| drawn in the object's cell | share of objects (%) |", "|---|---|"]
    for name in ("the named colour", "another object's colour", "a colour the caption does not name",
                 "no object drawn"):
        rows.append(f"| {name} | {100 * sources[name] / total:.1f} |")
    wrong = sources["another object's colour"] + sources["a colour the caption does not name"]
    chance = 100 * float(np.mean(wrong_in_caption))
    share = 100 * sources["another object's colour"] / wrong if wrong else float("nan")
    rows.append(f"\nOf the wrong colours, {share:.1f}% belong to another object of the caption; "
                f"{chance:.1f}% would if wrong colours were drawn uniformly.")
    return rows


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


ERRORS = {"two objects' colours swapped": swap_two_colours, "one colour replaced": replace_one_colour,
          "one object moved": move_one_object}


@torch.no_grad()
def scorer_error_table(scorer: Scorer, direction: torch.Tensor, n_scenes: int) -> list[str]:
    examples = world.shapes_split("test", n_scenes)
    images = renders(examples).permute(0, 3, 1, 2).float().div(255)
    true = scorer.score(images, [caption for _, caption in examples], direction)
    rng = random.Random(0)
    rows = ["| error put into the caption | renders | true caption scores higher: original (%) | "
            "text-relevant (%) | mean margin ×100, original / text-relevant |", "|---|---|---|---|---|"]
    for name, put_error in ERRORS.items():
        changed = [(i, put_error(scene, rng)) for i, (scene, _) in enumerate(examples)]
        kept = [(i, scene) for i, scene in changed if scene is not None]
        if not kept:
            rows.append(f"| {name} | 0 | | | |")
            continue
        index = torch.tensor([i for i, _ in kept])
        wrong = scorer.score(images[index], [same_wording_caption("test", i, scene) for i, scene in kept],
                             direction)
        original, relevant = true.original[index] - wrong.original, true.relevant[index] - wrong.relevant
        rows.append(f"| {name} | {len(kept)} | {100 * (original > 0).float().mean():.1f} | "
                    f"{100 * (relevant > 0).float().mean():.1f} | "
                    f"{100 * original.mean():.2f} / {100 * relevant.mean():.2f} |")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=SHIPPED, help="a miniature pipeline folder (default: the "
                   "shipped weights/mini)")
    p.add_argument("--scenes", type=int, default=64, help="training scenes for the caption-use table")
    p.add_argument("--colour-scenes", type=int, default=100, help="held-out scenes generated for the colour table")
    p.add_argument("--scorer", type=Path, help="the scorer for the last table (default: the pipeline's "
                   "scorer/, else the shipped weights/mini/scorer)")
    p.add_argument("--scorer-scenes", type=int, default=500, help="held-out real renders for the scorer table")
    p.add_argument("--probe-sentences", type=int, nargs=2, default=(2000, 1000), metavar=("TRAIN", "TEST"))
    return p.parse_args(argv)


def report(args) -> None:
    """Print the four tables (see the module's docstring)."""
    torch.manual_seed(0)
    pipeline = load_pipeline(args.weights, dtype=torch.float32)
    for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
        module.eval()
    print(f"{args.weights}\n\nText encoder: linear probes of each sentence's last kept row "
          f"({args.probe_sentences[0]} training, {args.probe_sentences[1]} held-out sentences)\n")
    print("\n".join(probe_table(pipeline, *args.probe_sentences)))
    print(f"\nUNet: does the caption lower the ε-loss? ({args.scenes} training scenes, same noise per row)\n")
    print("\n".join(caption_use_table(pipeline, args.scenes)))
    print(f"\nUNet: where does a generated object's colour come from? ({args.colour_scenes} held-out scenes, "
          "DPM-Solver++ 10 steps, CFG 3)\n")
    print("\n".join(colour_source_table(pipeline, args.colour_scenes)))
    own_scorer = args.weights / "scorer"
    scorer, direction = load_scorer(args.scorer or (own_scorer if own_scorer.is_dir() else None), None,
                                    dtype=torch.float32)
    print(f"\nScorer: does the true caption beat one with an error put in? ({args.scorer_scenes} held-out real "
          "renders)\n")
    print("\n".join(scorer_error_table(scorer, direction, args.scorer_scenes)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report(args)
    except ValueError as err:  # bad input (WeightsError included): one clear line, no traceback
        print(f"error: {' '.join(line.strip() for line in str(err).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
