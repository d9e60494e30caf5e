"""Figure 5 in miniature: how facts, image quality and the scores move over long reward runs, per ω.

    python -m mini.curves --seed-rows 0=runs/mini/curves/seed0.md.rows --seed-rows 1=runs/mini/curves/seed1.md.rows \\
        -o mini/curves.md --figures mini/figures

It reads the rows that ``python -m mini.evaluate`` cached for the reward checkpoints (mini/recipe.sh, stage
``curves``, names them "ω=W step S"; the SFT starting point is "SFT step 0" and belongs to every ω's curve) and
draws one PNG per measurement, a line per ω and noise seed (seed 1 dashed), with the table beside them:
facts (all, and after token 77), the Fréchet distance to real renders, and the original and text-relevant
scores C_X·C_P and C_X·C_P⊥ (LongAlign §4; Figure 5 plots the reward's two parts against steps).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mini.metrics import write_report
from mini.plots import line_chart

MEASURES = {"all": ("facts, all (%)", "curve_facts.png"),
            "after77": ("facts after token 77 (%)", "curve_facts_after77.png"),
            "fd": ("Fréchet distance to real renders", "curve_frechet.png"),
            "original": ("score-O ×100, C_X·C_P", "curve_score_original.png"),
            "relevant": ("score ×100, C_X·C_P⊥", "curve_score_relevant.png")}
DIGITS = {"all": ".1f", "after77": ".1f", "fd": ".3f", "original": ".2f", "relevant": ".2f"}
ROW_NAME = re.compile(r"^(?:ω=(?P<omega>[0-9.]+)|SFT) step (?P<step>\d+)$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-rows", action="append", required=True, metavar="SEED=FOLDER",
                   help="a noise seed and the row cache folder mini.evaluate wrote for it; repeat per seed")
    p.add_argument("-o", "--output", type=Path, default=Path("curves.md"), help="the markdown table")
    p.add_argument("--figures", type=Path, default=Path("figures"), help="folder for the PNG curves")
    return p.parse_args(argv)


def read_rows(folder: Path) -> dict[tuple[str | None, int], dict]:
    """{(ω or None for SFT, step): the row's numbers} from one seed's cache folder."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of cached rows; run python -m mini.evaluate with -o "
                         f"{folder.name.removesuffix('.rows')} first")
    rows = {}
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())["result"]
        match = ROW_NAME.match(result["name"])
        if match:
            rows[(match["omega"], int(match["step"]))] = result
    if not rows:
        raise ValueError(f"no rows named 'ω=W step S' or 'SFT step 0' in {folder}")
    return rows


def curves(by_seed: dict[str, dict], key: str) -> tuple[dict, dict]:
    """The series of one measurement, a line per (ω, seed) that starts at the SFT point, and their styles."""
    omegas = sorted({omega for rows in by_seed.values() for omega, _ in rows if omega is not None}, key=float)
    series, groups = {}, {}
    for dash, (seed, rows) in enumerate(by_seed.items()):
        for colour, omega in enumerate(omegas):
            points = [(step, row[key]) for (w, step), row in rows.items() if w == omega or w is None]
            label = f"ω={omega}, seed {seed}"
            series[label], groups[label] = points, (colour, dash)
    return series, groups


def table(by_seed: dict[str, dict]) -> list[str]:
    """A markdown row per (ω, step): every measurement, seed by seed."""
    seeds = list(by_seed)
    keys = sorted({k for rows in by_seed.values() for k in rows}, key=lambda k: (k[0] is not None, float(k[0] or 0), k[1]))
    head = "| run | step | " + " | ".join(f"{MEASURES[m][0]}, seed {s}" for m in MEASURES for s in seeds) + " |"
    lines = [head, "|---|---|" + "---|" * (len(MEASURES) * len(seeds))]
    for omega, step in keys:
        cells = []
        for measure in MEASURES:
            for seed in seeds:
                row = by_seed[seed].get((omega, step))
                cells.append("" if row is None else format(row[measure], DIGITS[measure]))
        lines.append(f"| {'SFT' if omega is None else f'ω={omega}'} | {step} | " + " | ".join(cells) + " |")
    return lines


def run(args) -> str:
    specs = [spec.partition("=") for spec in args.seed_rows]
    if any(not sep or not seed or not folder for seed, sep, folder in specs):
        raise ValueError(f"--seed-rows takes SEED=FOLDER, got {args.seed_rows}")
    by_seed = {seed: read_rows(Path(folder)) for seed, _, folder in specs}
    for key, (label, name) in MEASURES.items():
        series, groups = curves(by_seed, key)
        line_chart(series, args.figures / name, label + " over reward steps", "reward steps", label, groups)
    return "\n".join(table(by_seed)) + "\n"


def main(argv: list[str] | None = None) -> int:
    return write_report(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
