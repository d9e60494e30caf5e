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
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from model.preference import (KINDS, Scorer, common_direction, fit_direction, load_direction, recall_at_1,
                              save_direction, similarities)
from model.weights import WeightsError

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
    lines = [line for line in read_text(path, "prompt list").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    return [record.get("caption") or record.get("prompt") or "" for record in read_jsonl(path, lines)]


def read_jsonl(path: Path, lines: list[str]) -> list[dict]:
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CliError(f"{path} line {number} is not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise CliError(f"{path} line {number} is not a JSON object")
        records.append(record)
    return records


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
    records = read_jsonl(args.retrieval, [line for line in read_text(args.retrieval, "manifest").splitlines()
                                          if line.strip()])
    missing = [n for n, r in enumerate(records, 1) if not r.get("image") or not str(r.get("caption", "")).strip()]
    if missing:
        raise CliError(f"{args.retrieval} line {missing[0]} needs both \"image\" and \"caption\"")
    paths = [args.retrieval.parent / r["image"] for r in records]
    captions = [r["caption"] for r in records]
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
