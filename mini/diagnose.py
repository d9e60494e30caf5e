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
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data import to_tensor
from mini import world
from mini.metrics import SHIPPED, generate, load_scorer, scene_noise
from mini.probes import colour_source, other_colours, ridge_probe_accuracy, scorer_error_table
from model.diffusion import NoiseSchedule
from model.longtext import LongPromptEncoder
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
