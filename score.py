"""Score images against a long prompt with a CLIP preference scorer, split LongAlign-style (paper §4).

    python score.py image.png prompt.txt                     # one image; prompt.txt holds the prompt
    python score.py outputs/ "samples/*.png" --prompt "..."  # many images (folders, globs), ranked
    python score.py --fit-direction prompts.txt -o V.safetensors        # fit the common direction V
    python score.py --retrieval manifest.jsonl --max-sentences 1,2,3,4,6,8   # the paper's Tables 1 and 4
    python score.py --eval-shapes --row "segment SFT=runs/mini/sft-segment/pipeline" \
        --row "truncate SFT=runs/mini/sft-truncate/pipeline:truncate" -o eval.md   # the miniature's table

Each image gets (×100, as papers report them):
    original     C_X·C_P       the segment-level score: the mean cosine of the image with each sentence
    relevant     C_X·C_P⊥      the part that depends on this particular prompt
    irrelevant   η·C_X·V       the part any caption would earn (V: the common direction, η = C_P·V)
original = relevant + irrelevant. The split needs V: --direction, or direction.safetensors beside the
scorer; without one only the original score is shown. Scorers: PickScore_v1, HPSv2, Denscore, CLIP-H
(model/preference.py lists where to get them); any layout model/weights.py reads.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import data
from model.diffusion import DPMSolverSampler, NoiseSchedule, sample_loop
from model.longtext import LongPromptEncoder, split_sentences
from model.lora import load_lora
from model.preference import (KINDS, Scorer, common_direction, fit_direction, load_direction, recall_at_1,
                              save_direction, similarities)
from model.weights import WeightsError, load_pipeline

DEFAULT_SCORER = Path(__file__).resolve().parent / "weights" / "mini" / "scorer"
DIRECTION_FILE = "direction.safetensors"  # looked for beside the scorer when --direction is not given
EVAL_FILE = "eval_shapes.md"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEXT_BATCH = 64  # prompts per text-encoder pass


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="IMAGE... PROMPT_FILE",
                        help="images (files, folders or glob patterns), then a text file holding the prompt "
                             "(leave it out when --prompt is given)")
    parser.add_argument("--prompt", help="the prompt text itself, instead of a prompt file")
    parser.add_argument("--scorer", type=Path, default=None,
                        help=f"scorer weights: a transformers CLIPModel folder or an open_clip file "
                             f"(default: {DEFAULT_SCORER})")
    parser.add_argument("--kind", choices=list(KINDS),
                        help="scorer kind, which sets the preprocessing; inferred when left out (open_clip "
                             "layout -> hpsv2, else a name in the path, else clip)")
    parser.add_argument("--direction", type=Path,
                        help=f"the common direction V (.safetensors from --fit-direction); default: "
                             f"{DIRECTION_FILE} beside the scorer, when there is one")
    parser.add_argument("--single", action="store_true",
                        help="encode the whole prompt as one text truncated to 77 tokens instead of per sentence")
    parser.add_argument("--max-sentences", default=None,
                        help="use only the first N sentences; with --retrieval a list such as 1,2,3,4,6,8 "
                             "(the paper's Table 4)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--fit-direction", type=Path, metavar="PROMPTS",
                        help="fit V on these prompts (.txt: one per line; .jsonl: 'caption' or 'prompt' "
                             "fields) and save it to --output")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"where --fit-direction writes V (default: ./{DIRECTION_FILE}) or --eval-shapes "
                             f"its markdown table (default: ./{EVAL_FILE})")
    parser.add_argument("--retrieval", type=Path, metavar="MANIFEST",
                        help="text->image R@1 on a .jsonl of {\"image\": path relative to the manifest, "
                             "\"caption\": text}")
    g = parser.add_argument_group("the shapes-world evaluation (issue 7; model/README's miniature table)")
    g.add_argument("--eval-shapes", action="store_true",
                   help="generate held-out test scenes with every --row model and measure fact accuracy, "
                        "Fréchet distance of scorer features, Table 1 retrieval and η; writes markdown to -o")
    g.add_argument("--row", action="append", default=[], metavar="NAME=PATH[:ENCODING]",
                   help="a model to evaluate: a pipeline folder, or a LoRA .safetensors on --lora-base; "
                        "ENCODING is segment (default) or truncate. Repeat for every row")
    g.add_argument("--lora-base", type=Path, help="the pipeline folder LoRA rows apply to")
    g.add_argument("--scenes", type=int, default=500, help="held-out test scenes (default 500)")
    g.add_argument("--sample-steps", type=int, default=10, help="DPM-Solver++ steps per image (default 10)")
    g.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise, shared by every row")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="scorer weights dtype (default float32)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------

def scorer_path(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    if DEFAULT_SCORER.exists():
        return DEFAULT_SCORER
    sources = "; ".join(f"{kind.name}: {kind.source}" for kind in KINDS.values())
    raise CliError(f"no --scorer given and no default scorer at {DEFAULT_SCORER}. Pass --scorer PATH with one "
                   f"of: {sources}")


def parse_max_sentences(text: str | None, many: bool) -> list[int | None]:
    if text is None:
        return [None]
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise CliError(f"--max-sentences takes whole numbers separated by commas; got '{text}'") from None
    if any(v < 1 for v in values) or (len(values) > 1 and not many):
        raise CliError(f"--max-sentences takes {'numbers' if many else 'one number'} of at least 1; got '{text}' "
                       "(a list is for --retrieval)")
    return values


def read_text(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {what} {path} as UTF-8 text ({err})") from None
    if not text.strip():
        raise CliError(f"{what} {path} is empty; write the prompt in it, or pass --prompt")
    return text


def read_prompts(path: Path) -> list[str]:
    """A prompt corpus: one prompt per line, or a .jsonl whose lines carry 'caption' or 'prompt'."""
    return data.PromptDataset(path).prompts


def collect_images(patterns: list[str]) -> list[Path]:
    """Expand folders (their image files, sorted) and glob patterns; keep plain paths as given."""
    images = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            images += found
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern))
            if not found:
                raise CliError(f"no files match {pattern}")
            images += found
        else:
            images.append(path)
    return images


def load_image(path: Path) -> Image.Image:
    """Open an image fully, so a broken file fails here with its name; any mode is accepted and converted later."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise CliError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CliError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None


def find_direction(arg: Path | None, scorer_location: Path, scorer: Scorer) -> torch.Tensor | None:
    if arg is None:
        beside = (scorer_location if scorer_location.is_dir() else scorer_location.parent) / DIRECTION_FILE
        if not beside.is_file():
            return None
        arg = beside
    return load_direction(arg, scorer.embed_dim)


# ---------------------------------------------------------------------------------------------------------
# Embeddings (computed once, in batches, with a progress bar)
# ---------------------------------------------------------------------------------------------------------

def embed_images(scorer: Scorer, paths: list[Path], batch_size: int) -> torch.Tensor:
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(paths), batch_size), desc="images", disable=len(paths) <= batch_size):
            images = [load_image(path) for path in paths[start:start + batch_size]]
            chunks.append(scorer.encode_images(images).float().cpu())
    return torch.cat(chunks)


def embed_prompts(scorer: Scorer, prompts: list[str], single: bool,
                  max_sentences: list[int | None]) -> dict[int | None, torch.Tensor]:
    """C_P [N, P] for every value of ``max_sentences``, from one encoding pass over the prompts."""
    out = {k: [] for k in max_sentences}
    for start in tqdm(range(0, len(prompts), TEXT_BATCH), desc="text" + (" (single)" if single else ""),
                      disable=len(prompts) <= TEXT_BATCH):
        encoded = scorer.encode_prompts(prompts[start:start + TEXT_BATCH], single=single)
        for k in max_sentences:
            out[k].append(encoded.prompt_embedding(None if single else k).cpu())
    return {k: torch.cat(parts) for k, parts in out.items()}


# ---------------------------------------------------------------------------------------------------------
# The three modes
# ---------------------------------------------------------------------------------------------------------

def run_scores(args, scorer: Scorer, direction: torch.Tensor | None) -> None:
    if args.prompt is not None:
        image_args, prompt = args.inputs, args.prompt
        if not prompt.strip():
            raise CliError("--prompt is empty")
    else:
        if len(args.inputs) < 2:
            raise CliError("give one or more images, then the prompt file (or pass the prompt with --prompt)")
        image_args, prompt_file = args.inputs[:-1], Path(args.inputs[-1])
        if prompt_file.suffix.lower() in IMAGE_SUFFIXES:
            raise CliError(f"the last argument must be the prompt file, not an image ({prompt_file}); "
                           "or pass the prompt with --prompt")
        prompt = read_text(prompt_file, "prompt file")
    if not image_args:
        raise CliError("no images given")
    paths = collect_images(image_args)
    (k,) = parse_max_sentences(args.max_sentences, many=False)

    encoded = scorer.encode_prompts([prompt], single=args.single, max_sentences=k)
    text = encoded.prompt_embedding().cpu()  # [1, P]
    images = embed_images(scorer, paths, args.batch_size)
    scores = similarities(text, images, direction)
    rows = []
    for i, path in enumerate(paths):
        row = {"image": str(path), "original": 100 * scores["original"][0, i].item(),
               "segments": int(encoded.segments_used()[0])}
        if direction is not None:
            row["relevant"] = 100 * scores["relevant"][0, i].item()
            row["irrelevant"] = row["original"] - row["relevant"]
            row["eta"] = (text[0] @ direction).item()
        rows.append(row)
    rank_by = "relevant" if direction is not None else "original"
    rows.sort(key=lambda r: -r[rank_by])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if direction is None:
        print("(no common direction: showing the original score only; fit one with --fit-direction)")
    columns = ["original", "relevant", "irrelevant", "eta"] if direction is not None else ["original"]
    print(f"{'rank':>4}  " + "  ".join(f"{c:>10}" for c in columns) + f"  {'segments':>8}  image")
    for row in rows:
        values = "  ".join(f"{row[c]:10.4f}" if c == "eta" else f"{row[c]:10.2f}" for c in columns)
        print(f"{row['rank']:>4}  {values}  {row['segments']:>8}  {row['image']}")


def run_fit_direction(args, scorer: Scorer) -> None:
    prompts = read_prompts(args.fit_direction)
    if not all(p.strip() for p in prompts):
        raise CliError(f"{args.fit_direction} has an entry without text")
    direction = fit_direction(scorer, prompts, batch_size=TEXT_BATCH, progress=len(prompts) > TEXT_BATCH)
    args.output = args.output or Path(DIRECTION_FILE)
    save_direction(args.output, direction, scorer, len(prompts))
    eta = embed_prompts(scorer, prompts[:TEXT_BATCH], False, [None])[None] @ direction
    print(f"saved V ({scorer.embed_dim} dims, {len(prompts)} prompts, scorer kind {scorer.kind.name}) to "
          f"{args.output}; η on the first {len(eta)} prompts: mean {eta.mean():.3f}, "
          f"range {eta.min():.3f}..{eta.max():.3f}")


def run_retrieval(args, scorer: Scorer, direction: torch.Tensor | None) -> None:
    records = data.read_manifest(args.retrieval)
    empty = next((r.image for r in records if not r.caption), None)
    if empty is not None:
        raise CliError(f"{args.retrieval}: the caption of {empty} is empty; every pair needs one")
    paths, captions = [r.image for r in records], [r.caption for r in records]
    ks = parse_max_sentences(args.max_sentences, many=True)

    images = embed_images(scorer, paths, args.batch_size)  # the one pass over the images
    average = embed_prompts(scorer, captions, single=False, max_sentences=list(dict.fromkeys([None, *ks])))
    single = embed_prompts(scorer, captions, single=True, max_sentences=[None])[None]
    source = "given"
    if direction is None:
        direction, source = common_direction(average[None]), "fitted on these captions"

    def table(columns: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        rows = {"original": {}, "relevant": {}}
        for name, text in columns.items():
            for row, matrix in similarities(text, images, direction).items():
                rows[row][name] = recall_at_1(matrix)
        return rows

    results = {"pairs": len(records), "direction": source,
               "table1": table({"single": single, "average": average[None]})}
    if args.max_sentences is not None:
        results["table4"] = table({str(k): average[k] for k in ks})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"text->image R@1 (%) over {len(records)} pairs, scorer {scorer.name} ({scorer.kind.name}), V {source}")
    for key, title in (("table1", "Table 1"), ("table4", "Table 4: max sentences")):
        if key in results:
            names = list(results[key]["original"])
            print(f"\n{title:<24}" + "".join(f"{n:>10}" for n in names))
            for row, label in (("original", "C(p)  original"), ("relevant", "C⊥(p) text-relevant")):
                print(f"{label:<24}" + "".join(f"{results[key][row][n]:10.2f}" for n in names))


# ---------------------------------------------------------------------------------------------------------
# The shapes-world evaluation (issue 7): the paper's claims, measured exactly on the miniature
# ---------------------------------------------------------------------------------------------------------

ENCODINGS = {"segment": "concat", "truncate": "truncate"}  # row suffix -> LongPromptEncoder strategy
LOST_FROM = 76  # plain truncation keeps content tokens 1..75: a sentence starting at 76 or later is lost


@dataclass
class EvalRow:
    name: str
    path: Path  # a pipeline folder, or a LoRA file applied to --lora-base
    encoding: str  # "segment" or "truncate"


def last_change(path: Path) -> float:
    """The newest modification time of a weights file, or of any file in a pipeline folder (links followed);
    0 for a missing path (loading it then reports the problem)."""
    if not path.is_dir():
        return path.stat().st_mtime if path.exists() else 0.0
    files = [Path(folder, name) for folder, _, names in os.walk(path, followlinks=True) for name in names]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def parse_row(spec: str) -> EvalRow:
    """'NAME=PATH[:ENCODING]' -> EvalRow; the name may hold '=' itself (ω=0.3), the path may not."""
    name, sep, rest = spec.rpartition("=")
    if not sep or not name.strip() or not rest:
        raise CliError(f"--row takes NAME=PATH[:ENCODING], got '{spec}'")
    path, _, encoding = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in ENCODINGS else (rest, "", "segment")
    return EvalRow(name.strip(), Path(path), encoding)


def load_row_pipeline(row: EvalRow, lora_base: Path | None, device: str):
    """The row's pipeline in fp32; a LoRA row is its file merged into --lora-base's UNet."""
    if row.path.suffix == ".safetensors":
        if lora_base is None:
            raise CliError(f"row '{row.name}' is a LoRA file; pass --lora-base with the pipeline it applies to")
        pipe = load_pipeline(lora_base, device=device)
        load_lora(pipe.unet, row.path)
        return pipe
    return load_pipeline(row.path, device=device)


def scene_noise(n: int, vae, seed: int) -> torch.Tensor:
    """The initial latents of all ``n`` scenes, drawn once, so every row starts image i from the same noise."""
    side = data.CANVAS // vae.downsample_factor
    return torch.randn((n, vae.config.latent_channels, side, side), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(pipe, captions: list[str], encoding: str, noise: torch.Tensor, args) -> torch.Tensor:
    """uint8 images [N, 3, 64, 64] for ``captions``: DPM-Solver++ with CFG, batch by batch."""
    encoder = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, strategy=ENCODINGS[encoding])
    uncond = encoder([""])
    device = next(pipe.unet.parameters()).device
    images = []
    with warnings.catch_warnings():  # truncation dropping tokens is the point of the baseline row
        warnings.filterwarnings("ignore", message=r".*dropped the prompt tokens")
        for start in tqdm(range(0, len(captions), args.batch_size), desc="generating", leave=False):
            cond = encoder(captions[start:start + args.batch_size])
            sampler = DPMSolverSampler(NoiseSchedule(), args.sample_steps)
            latents = sample_loop(pipe.unet, sampler, noise[start:start + len(cond)].to(device), cond, uncond,
                                  args.cfg, progress=False)
            pixels = pipe.vae.decode(latents / pipe.vae.scaling_factor).float()
            images.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(images)


def renders(examples: list) -> torch.Tensor:
    """The true images of (scene, caption) examples, uint8 [N, 3, 64, 64]."""
    return torch.stack([torch.from_numpy(np.array(data.render(scene))).permute(2, 0, 1) for scene, _ in examples])


def image_features(scorer: Scorer, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The scorer's image embeddings [N, P] of uint8 images [N, 3, H, W] (the features of the Fréchet distance)."""
    with torch.no_grad():
        return torch.cat([scorer.encode_images(chunk.float().div(255).to(scorer.device)).float().cpu()
                          for chunk in images.split(batch_size)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula on features [N, P]: |μa − μb|² + tr(Σa + Σb − 2·(Σa^½ Σb Σa^½)^½), in float64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of the symmetric
    matrix Σa^½ Σb Σa^½, which avoids scipy's general (and sometimes complex) sqrtm.
    """
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def fact_accuracy(images: torch.Tensor, examples: list) -> dict[str, float]:
    """Fact accuracy (%) over all facts, the facts whose sentence starts at token 76+ / after 77, and shapes.

    "layout" is a weaker, secondary test: an object fact counts when its cell has enough ink, whatever the
    colour (empty facts as before), so it shows whether a model puts things in the right cells at all.
    """
    facts = []
    for image, (scene, caption) in zip(images, examples):
        facts += data.check_facts(image.permute(1, 2, 0).numpy(), scene, caption)["facts"]

    def share(chosen: list[dict], key: str = "holds") -> float:
        return 100.0 * sum(f[key] for f in chosen) / len(chosen) if chosen else float("nan")

    objects = [f for f in facts if f["kind"] == "object"]
    for fact in facts:
        fact["placed"] = fact["holds"] if fact["kind"] == "empty" else fact["ink_fraction"] >= data.OBJECT_MIN_INK
    lost = [f for f in facts if f["token_start"] >= LOST_FROM]
    return {"all": share(facts), "lost": share(lost), "after77": share([f for f in facts if f["token_start"] > 77]),
            "shape": share(objects, "shape_holds"), "layout": share(facts, "placed"),
            "layout_lost": share(lost, "placed")}


def caption_statistics(examples: list, tokenizer) -> dict[str, float]:
    """How long the held-out captions are, and how many facts plain 77-token truncation loses."""
    lengths, starts, any_lost = [], [], 0
    for _, caption in examples:
        sentences = split_sentences(caption)
        lengths.append(len(tokenizer.encode(caption)) + 2)
        fact_starts = data.sentence_token_starts(sentences, tokenizer)
        starts += fact_starts
        any_lost += max(fact_starts) >= LOST_FROM
    return {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths),
            "captions_losing": 100.0 * any_lost / len(examples),
            "facts_lost": 100.0 * sum(s >= LOST_FROM for s in starts) / len(starts),
            "facts_after77": 100.0 * sum(s > 77 for s in starts) / len(starts), "facts": len(starts)}


def retrieval_table(scorer: Scorer, real_features: torch.Tensor, captions: list[str],
                    direction: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Table 1 in miniature: text->image R@1 (%) for Single / Average × original / text-relevant, and η."""
    average = embed_prompts(scorer, captions, single=False, max_sentences=[None])[None]
    single = embed_prompts(scorer, captions, single=True, max_sentences=[None])[None]
    table = {"original": {}, "relevant": {}}
    for column, text in (("single", single), ("average", average)):
        for row, matrix in similarities(text, real_features, direction).items():
            table[row][column] = recall_at_1(matrix)
    return table, average @ direction.cpu()


def mean_scores(scorer: Scorer, features: torch.Tensor, captions: list[str], direction: torch.Tensor):
    """Mean original and text-relevant score (×100) of each image with its own caption (Table 2's Denscore-O
    and Denscore, in miniature)."""
    text = embed_prompts(scorer, captions, single=False, max_sentences=[None])[None]
    image_unit = torch.nn.functional.normalize(features, dim=-1)
    original = (text * image_unit).sum(-1)
    relevant = original - (text @ direction.cpu()) * (image_unit @ direction.cpu())
    return 100 * original.mean().item(), 100 * relevant.mean().item()


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


def run_eval_shapes(args, scorer: Scorer, direction: torch.Tensor | None) -> None:
    rows = [parse_row(spec) for spec in args.row]
    if args.scenes < 2 or args.sample_steps < 1:
        raise CliError("--scenes must be at least 2 and --sample-steps at least 1")
    if direction is None:
        raise CliError("--eval-shapes needs the common direction V: --direction, or direction.safetensors "
                       "beside the scorer")
    examples = data.shapes_split("test", args.scenes)
    captions = [caption for _, caption in examples]
    real = renders(examples)
    real_features = image_features(scorer, real, args.batch_size)
    # The Fréchet distance between two disjoint real sets: what a perfect generator would score at this n.
    other = renders(data.shapes_split("val", args.scenes))
    fd_real = frechet_distance(real_features, image_features(scorer, other, args.batch_size))
    table, eta = retrieval_table(scorer, real_features, captions, direction)
    stats = caption_statistics(examples, scorer.tokenizer)

    output = args.output or Path(EVAL_FILE)
    results = []
    for row in rows:
        # Each row's numbers are kept beside the output, so a stopped run (or several processes, one per row)
        # picks up finished rows instead of generating them again; retrained weights make the cache stale.
        cache = output.parent / f"{output.name}.rows" / f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', row.name)}.json"
        settings = {"version": 3, "path": str(row.path.resolve()), "weights_changed": last_change(row.path),
                    "encoding": row.encoding,
                    "scenes": args.scenes, "steps": args.sample_steps, "cfg": args.cfg, "seed": args.seed,
                    "scorer": scorer.name}
        if cache.is_file() and json.loads(cache.read_text())["settings"] == settings:
            results.append(json.loads(cache.read_text())["result"])
            continue
        started = time.time()
        pipe = load_row_pipeline(row, args.lora_base, args.device)
        images = generate(pipe, captions, row.encoding, scene_noise(args.scenes, pipe.vae, args.seed), args)
        features = image_features(scorer, images, args.batch_size)
        original, relevant = mean_scores(scorer, features, captions, direction)
        results.append({"name": row.name, **fact_accuracy(images, examples),
                        "fd": frechet_distance(features, real_features), "original": original,
                        "relevant": relevant})
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"settings": settings, "result": results[-1]}))
        print(f"{row.name}: facts {results[-1]['all']:.1f}%, {time.time() - started:.0f} s", file=sys.stderr)
    markdown = eval_markdown(args, results, stats, table, eta, fd_real)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise CliError("--batch-size must be at least 1")
        if not (args.fit_direction or args.retrieval or args.eval_shapes or args.inputs):
            raise CliError("nothing to do: give images and a prompt, --fit-direction, --retrieval or "
                           "--eval-shapes (see --help)")
        location = scorer_path(args.scorer)
        scorer = Scorer.load(location, kind=args.kind, dtype=getattr(torch, args.dtype), device=args.device)
        if args.fit_direction:
            run_fit_direction(args, scorer)
            return 0
        direction = find_direction(args.direction, location, scorer)
        if args.eval_shapes:
            run_eval_shapes(args, scorer, direction)
        elif args.retrieval:
            run_retrieval(args, scorer, direction)
        else:
            run_scores(args, scorer, direction)
    except (CliError, WeightsError, ValueError) as err:
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"score.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
