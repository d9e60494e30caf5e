"""The miniature's evaluation table: LongAlign's claims, measured exactly on held-out shapes-world scenes.

    python -m mini.evaluate --row "segment SFT=runs/mini/sft-segment/pipeline" \\
        --row "truncate SFT=runs/mini/sft-truncate/pipeline:truncate" -o eval.md

Every --row model generates the same held-out test scenes from the same initial noise. The table gives, per
row, the share of the captions' facts that hold in the pixels (all of them, and those a 77-token truncation
loses: LongAlign §3), the Fréchet distance of scorer image features to real renders, and the mean original
and text-relevant scores (§4; Table 2's Denscore-O and Denscore). Below it: Table 1 in miniature (text→image
R@1 on real renders) and the scorer's η. Each finished row is cached beside the output, so a stopped run, or
several processes sharing the rows, pick up finished rows; retrained weights make a cached row stale.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from mini import world
from mini.metrics import (LOST_FROM, SHIPPED, caption_statistics, fact_accuracy, frechet_distance, generate,
                          image_features, last_change, load_row_pipeline, load_scorer, mean_scores, parse_row,
                          renders, retrieval_table, scene_noise, write_report)
from model.preference import KINDS

EVAL_FILE = "eval_shapes.md"
CACHE_VERSION = 3  # raise when a row's numbers would change for the same settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", default=[], metavar="NAME=PATH[:ENCODING]",
                   help="a model to evaluate: a pipeline folder, or a LoRA .safetensors on --lora-base; "
                        "ENCODING is segment (default) or truncate. Repeat for every row")
    p.add_argument("--lora-base", type=Path, help="the pipeline folder LoRA rows apply to")
    p.add_argument("--scenes", type=int, default=500, help="held-out test scenes (default 500)")
    p.add_argument("--sample-steps", type=int, default=10, help="DPM-Solver++ steps per image (default 10)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, shared by every row")
    p.add_argument("--scorer", type=Path, help=f"scorer weights (default: {SHIPPED / 'scorer'})")
    p.add_argument("--kind", choices=list(KINDS), help="scorer kind; inferred when left out")
    p.add_argument("--direction", type=Path,
                   help="the common direction V (default: direction.safetensors beside the scorer)")
    p.add_argument("-o", "--output", type=Path, default=Path(EVAL_FILE),
                   help=f"where the markdown table goes (default: ./{EVAL_FILE})")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="scorer weights dtype (default float32)")
    return p.parse_args(argv)


def eval_markdown(args, results: list[dict], stats: dict, table: dict, eta: torch.Tensor, fd_real: float) -> str:
    n = args.scenes
    lines = [f"Shapes world, {n} held-out test scenes (the same scenes and initial noise for every row), "
             f"DPM-Solver++ {args.sample_steps} steps, CFG {args.cfg}. Captions: {stats['min']}–{stats['max']} "
             f"CLIP tokens (mean {stats['mean']:.0f}); {stats['captions_losing']:.0f}% of captions have a fact "
             f"starting at token ≥ {LOST_FROM} (lost by 77-token truncation), which holds "
             f"{stats['facts_lost']:.1f}% of the {stats['facts']} facts; {stats['facts_after77']:.1f}% start "
             "after token 77.", "",
             "| model | facts, all (%) | facts starting ≥ 76 (%) | facts after token 77 (%) "
             "| layout, all / ≥ 76 (%) | shape (%) | Fréchet distance ↓ | score-O ×100 | score ×100 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['all']:.1f} | {r['lost']:.1f} | {r['after77']:.1f} | {r['layout']:.1f} / "
                     f"{r['layout_lost']:.1f} | {r['shape']:.1f} | {r['fd']:.3f} | {r['original']:.2f} "
                     f"| {r['relevant']:.2f} |")
    lines += ["", "Layout counts an object fact when its cell holds enough ink (≥ 5%), whatever the colour.",
              "", f"Fréchet distance between the scorer's image features of the generated and the real renders; "
              f"two disjoint sets of {n} real renders are {fd_real:.3f} apart (the floor). score-O is the "
              "original segment-level score C_X·C_P, score its text-relevant part C_X·C_P⊥ (Table 2's Denscore-O "
              "and Denscore).", "",
              f"Table 1 in miniature: text→image R@1 (%) over {n} held-out pairs of real renders, the miniature's "
              "scorer.", "",
              "| | Single (77-token truncation) | Average (mean of sentences) |", "|---|---|---|"]
    for row, label in (("original", "C(p) original"), ("relevant", "C⊥(p) text-relevant")):
        lines.append(f"| {label} | {table[row]['single']:.1f} | {table[row]['average']:.1f} |")
    lines += ["", f"Scorer η = C_P·V over the {n} captions: mean {eta.mean():.3f}, std {eta.std():.3f}, "
              f"range {eta.min():.3f}–{eta.max():.3f} (Figure 2(b): CLIP-H 0.3–0.6, Denscore 0.55–0.85, "
              "PickScore 0.85–0.95)."]
    return "\n".join(lines) + "\n"


def row_settings(row, args, scorer) -> dict:
    """What a cached row must match to be reused: its weights (and when they last changed) and the sampling."""
    return {"version": CACHE_VERSION, "path": str(row.path.resolve()), "weights_changed": last_change(row.path),
            "encoding": row.encoding, "scenes": args.scenes, "steps": args.sample_steps, "cfg": args.cfg,
            "seed": args.seed, "scorer": scorer.name}


def evaluate_row(row, args, scorer, direction, examples: list, real_features: torch.Tensor) -> dict:
    """One row of the table: generate the scenes with the row's model and measure them."""
    captions = [caption for _, caption in examples]
    pipe = load_row_pipeline(row, args.lora_base, args.device)
    images = generate(pipe, captions, row.encoding, scene_noise(args.scenes, pipe.vae, args.seed),
                      args.sample_steps, args.cfg, args.batch_size)
    features = image_features(scorer, images, args.batch_size)
    original, relevant = mean_scores(scorer, features, captions, direction)
    return {"name": row.name, **fact_accuracy(images, examples), "fd": frechet_distance(features, real_features),
            "original": original, "relevant": relevant}


def cached_row(row, args, scorer, direction, examples: list, real_features: torch.Tensor) -> dict:
    """The row's numbers from its cache file beside the output when its settings match, else measured now."""
    name = re.sub(r"[^A-Za-z0-9.=-]+", "_", row.name)
    cache = args.output.parent / f"{args.output.name}.rows" / f"{name}.json"
    settings = row_settings(row, args, scorer)
    if cache.is_file() and json.loads(cache.read_text())["settings"] == settings:
        return json.loads(cache.read_text())["result"]
    started = time.time()
    result = evaluate_row(row, args, scorer, direction, examples, real_features)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"settings": settings, "result": result}))
    print(f"{row.name}: facts {result['all']:.1f}%, {time.time() - started:.0f} s", file=sys.stderr)
    return result


def run(args) -> str:
    """Measure every row and the reference numbers; returns the markdown table."""
    rows = [parse_row(spec) for spec in args.row]
    if args.scenes < 2 or args.sample_steps < 1 or args.batch_size < 1:
        raise ValueError("--scenes must be at least 2, --sample-steps and --batch-size at least 1")
    scorer, direction = load_scorer(args.scorer, args.direction, args.device, kind=args.kind,
                                    dtype=getattr(torch, args.dtype))
    examples = world.shapes_split("test", args.scenes)
    real_features = image_features(scorer, renders(examples), args.batch_size)
    # The Fréchet distance between two disjoint real sets: what a perfect generator would score at this n.
    other = image_features(scorer, renders(world.shapes_split("val", args.scenes)), args.batch_size)
    fd_real = frechet_distance(real_features, other)
    table, eta = retrieval_table(scorer, real_features, [caption for _, caption in examples], direction)
    stats = caption_statistics(examples, scorer.tokenizer)
    results = [cached_row(row, args, scorer, direction, examples, real_features) for row in rows]
    return eval_markdown(args, results, stats, table, eta, fd_real)


def main(argv: list[str] | None = None) -> int:
    return write_report(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
