"""Tables 1 and 4 of LongAlign §4 in miniature, for one or more scorers, with Figure 2(b)'s η histogram.

    python -m mini.tables --scorer "first=weights/mini/clip" --scorer "separate=weights/mini/scorer" \\
        --heldout-log runs/mini/scorer/heldout.jsonl -o mini/tables.md --figures mini/figures

For each scorer, on the first --scenes held-out test renders and their captions:
- Table 1: text→image R@1 (%) for "Single" (the caption truncated to 77 tokens) and "Average" (the mean of the
  sentence embeddings, C_P), each for the original embedding C(p) and its text-relevant part C⊥(p);
- Table 4: R@1 of the Average embedding when only the first k sentences are kept, k = 1, 2, 3, 4, 6, 8;
- η = C_P·V, the share of the prompt embedding along the common direction V, as a histogram (Figure 2(b));
- how often the true caption outscores the same caption with one error put in (swapped colours, a
  replaced colour, a moved object), the test of whether the reward can see the errors the UNet makes.
With --heldout-log, also the scorer's held-out R@1 and swap preference against its training steps (PNG).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mini import world
from mini.metrics import image_features, load_scorer, renders, write_report
from mini.plots import histogram_chart, line_chart
from mini.probes import scorer_error_table
from model.preference import prompt_embeddings, recall_table

SENTENCE_COUNTS = (1, 2, 3, 4, 6, 8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scorer", action="append", required=True, metavar="NAME=FOLDER",
                   help="a scorer folder with its direction.safetensors; repeat to compare scorers")
    p.add_argument("--scenes", type=int, default=500, help="held-out test renders (default 500)")
    p.add_argument("--heldout-log", type=Path, help="a scorer run's heldout.jsonl, drawn as its training curve")
    p.add_argument("-o", "--output", type=Path, default=Path("tables.md"), help="the markdown tables")
    p.add_argument("--figures", type=Path, default=Path("figures"), help="folder for the PNG figures")
    return p.parse_args(argv)


def named_folder(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder:
        raise ValueError(f"--scorer takes NAME=FOLDER, got '{spec}'")
    return name.strip(), Path(folder)


def scorer_numbers(folder: Path, examples: list) -> dict:
    """Tables 1 and 4, η and the error table for one scorer."""
    scorer, direction = load_scorer(folder, None, dtype=torch.float32)
    captions = [caption for _, caption in examples]
    features = image_features(scorer, renders(examples), 64)
    average = prompt_embeddings(scorer, captions, max_sentences=(None, *SENTENCE_COUNTS))
    single = prompt_embeddings(scorer, captions, single=True)[None]
    table1 = recall_table({"single": single, "average": average[None]}, features, direction)
    table4 = recall_table({k: average[k] for k in SENTENCE_COUNTS}, features, direction)
    return {"table1": table1, "table4": table4, "eta": (average[None] @ direction.cpu()).numpy(),
            "errors": scorer_error_table(scorer, direction, len(examples))}


def markdown(numbers: dict[str, dict], n: int) -> str:
    lines = [f"Table 1 in miniature: text→image R@1 (%) over {n} held-out pairs of real renders.", "",
             "| scorer | Single, C | Single, C⊥ | Average, C | Average, C⊥ |", "|---|---|---|---|---|"]
    for name, x in numbers.items():
        t = x["table1"]
        lines.append(f"| {name} | {t['original']['single']:.1f} | {t['relevant']['single']:.1f} | "
                     f"{t['original']['average']:.1f} | {t['relevant']['average']:.1f} |")
    lines += ["", f"Table 4 in miniature: R@1 (%) of the Average embedding over the first k sentences "
              f"({n} pairs).", "", "| scorer | embedding | " + " | ".join(f"k = {k}" for k in SENTENCE_COUNTS) + " |",
              "|---|---|" + "---|" * len(SENTENCE_COUNTS)]
    for name, x in numbers.items():
        for row, label in (("original", "C"), ("relevant", "C⊥")):
            lines.append(f"| {name} | {label} | " + " | ".join(f"{x['table4'][row][k]:.1f}" for k in SENTENCE_COUNTS)
                         + " |")
    lines += ["", "η = C_P·V over the captions (Figure 2(b): CLIP-H 0.3–0.6, Denscore 0.55–0.85, PickScore "
              "0.85–0.95):", ""]
    lines += [f"- {name}: mean {x['eta'].mean():.3f}, std {x['eta'].std():.3f}, range {x['eta'].min():.3f}–"
              f"{x['eta'].max():.3f}" for name, x in numbers.items()]
    for name, x in numbers.items():
        lines += ["", f"Does the true caption beat one with an error put in? Scorer {name}, {n} held-out renders.",
                  "", *x["errors"]]
    return "\n".join(lines) + "\n"


def training_curve(log: Path, figures: Path) -> list[str]:
    """The scorer's held-out numbers by step: a PNG, and a markdown table (the last record of a step wins)."""
    records = {r["step"]: r for r in map(json.loads, log.read_text().splitlines())}
    steps = sorted(records)
    line_chart({"R@1, Average C": [(s, records[s]["heldout_r1"]) for s in steps],
                "true over swapped": [(s, records[s]["heldout_swap"]) for s in steps]},
               figures / "scorer_training.png", "the separate scorer on 500 held-out val renders", "training steps",
               "%")
    return ["", "The separate scorer in training (held-out val renders):", "", "| step | R@1, Average C (%) | "
            "true over swapped colours (%) |", "|---|---|---|",
            *[f"| {s} | {records[s]['heldout_r1']:.1f} | {records[s]['heldout_swap']:.1f} |" for s in steps]]


def run(args) -> str:
    if args.scenes < 2:
        raise ValueError(f"--scenes must be at least 2, got {args.scenes}")
    examples = world.shapes_split("test", args.scenes)
    numbers = {name: scorer_numbers(folder, examples) for name, folder in map(named_folder, args.scorer)}
    histogram_chart({name: x["eta"] for name, x in numbers.items()}, args.figures / "eta.png",
                    "η = C_P·V of held-out captions (Figure 2(b))", "η")
    text = markdown(numbers, args.scenes)
    if args.heldout_log:
        text += "\n".join(training_curve(args.heldout_log, args.figures)) + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    return write_report(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
