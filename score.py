"""Score images against a long prompt with a CLIP preference scorer, split LongAlign-style (paper §4).

    python score.py image.png prompt.txt                     # one image; prompt.txt holds the prompt
    python score.py outputs/ "samples/*.png" --prompt "..."  # many images (folders, globs), ranked
    python score.py --fit-direction prompts.txt -o V.safetensors        # fit the common direction V
    python score.py --retrieval manifest.jsonl --max-sentences 1,2,3,4,6,8   # the paper's Tables 1 and 4

Each image gets (×100, as papers report them):
    original     C_X·C_P       the segment-level score: the mean cosine of the image with each sentence
    relevant     C_X·C_P⊥      the part that depends on this particular prompt
    irrelevant   η·C_X·V       the part any caption would earn (V: the common direction, η = C_P·V)
original = relevant + irrelevant. The split needs V: --direction, or direction.safetensors beside the
scorer; without one only the original score is shown. Scorers: PickScore_v1, HPSv2, Denscore, CLIP-H
(model/preference.py lists where to get them); any layout model/weights.py reads. The miniature's own
evaluation table is made by `python -m mini.evaluate`.
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

import data
from model.preference import (DIRECTION_FILE, KINDS, TEXT_BATCH, Scorer, common_direction, find_direction,
                              fit_direction, prompt_embeddings, recall_table, save_direction, similarities)

DEFAULT_SCORER = Path(__file__).resolve().parent / "weights" / "mini" / "scorer"
# Flags that left this script, by prefix, and the command that has them now.
MOVED_FLAGS = {"--eval": "python -m mini.evaluate"}


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
                        help=f"where --fit-direction writes V (default: ./{DIRECTION_FILE})")
    parser.add_argument("--retrieval", type=Path, metavar="MANIFEST",
                        help="text->image R@1 on a .jsonl of {\"image\": path relative to the manifest, "
                             "\"caption\": text}")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="scorer weights dtype (default float32)")
    args, unknown = parser.parse_known_args(argv)
    for flag in unknown:
        for prefix, command in MOVED_FLAGS.items():
            if flag.startswith(prefix):
                raise ValueError(f"{flag.split('=')[0]} is no longer part of score.py: run `{command}` "
                                 "(see its --help for the flags)")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------

def scorer_path(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    if DEFAULT_SCORER.exists():
        return DEFAULT_SCORER
    sources = "; ".join(f"{kind.name}: {kind.source}" for kind in KINDS.values())
    raise ValueError(f"no --scorer given and no default scorer at {DEFAULT_SCORER}. Pass --scorer PATH with one "
                     f"of: {sources}")


def parse_max_sentences(text: str | None, many: bool) -> list[int | None]:
    if text is None:
        return [None]
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--max-sentences takes whole numbers separated by commas; got '{text}'") from None
    if any(v < 1 for v in values) or (len(values) > 1 and not many):
        raise ValueError(f"--max-sentences takes {'numbers' if many else 'one number'} of at least 1; got "
                         f"'{text}' (a list is for --retrieval)")
    return values


def read_text(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {path} as UTF-8 text ({err})") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty; write the prompt in it, or pass --prompt")
    return text


def collect_images(patterns: list[str]) -> list[Path]:
    """Expand folders (their image files, sorted) and glob patterns; keep plain paths as given."""
    images = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no images ({', '.join(sorted(data.IMAGE_SUFFIXES))}) in folder {path}")
            images += found
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern))
            if not found:
                raise ValueError(f"no files match {pattern}")
            images += found
        else:
            images.append(path)
    return images


def prompt_and_images(args) -> tuple[str, list[Path]]:
    """The prompt (--prompt, or the last input as a prompt file) and the image paths of the inputs."""
    if args.prompt is not None:
        image_args, prompt = args.inputs, args.prompt
        if not prompt.strip():
            raise ValueError("--prompt is empty")
    else:
        if len(args.inputs) < 2:
            raise ValueError("give one or more images, then the prompt file (or pass the prompt with --prompt)")
        image_args, prompt_file = args.inputs[:-1], Path(args.inputs[-1])
        if prompt_file.suffix.lower() in data.IMAGE_SUFFIXES:
            raise ValueError(f"the last argument must be the prompt file, not an image ({prompt_file}); "
                             "or pass the prompt with --prompt")
        prompt = read_text(prompt_file, "prompt file")
    if not image_args:
        raise ValueError("no images given")
    return prompt, collect_images(image_args)


def load_image(path: Path) -> Image.Image:
    """Open an image fully, so a broken file fails here with its name; any mode is accepted and converted later."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise ValueError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None


def embed_images(scorer: Scorer, paths: list[Path], batch_size: int) -> torch.Tensor:
    """Raw image embeddings [N, P] of image files, in batches, each file read once."""
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(paths), batch_size), desc="images", disable=len(paths) <= batch_size):
            images = [load_image(path) for path in paths[start:start + batch_size]]
            chunks.append(scorer.encode_images(images).float().cpu())
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------------------
# The three modes
# ---------------------------------------------------------------------------------------------------------

def score_rows(scorer: Scorer, prompt: str, paths: list[Path], direction: torch.Tensor | None, args) -> list[dict]:
    """One row per image: its scores ×100 (and η), ranked by the text-relevant score when V is known."""
    (k,) = parse_max_sentences(args.max_sentences, many=False)
    encoded = scorer.encode_prompts([prompt], single=args.single, max_sentences=k)
    text = encoded.prompt_embedding().cpu()  # [1, P]
    scores = similarities(text, embed_images(scorer, paths, args.batch_size), direction)
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
    return rows


def run_scores(args, scorer: Scorer, direction: torch.Tensor | None) -> None:
    prompt, paths = prompt_and_images(args)
    rows = score_rows(scorer, prompt, paths, direction, args)
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
    prompts = data.PromptDataset(args.fit_direction).prompts
    if not all(p.strip() for p in prompts):
        raise ValueError(f"{args.fit_direction} has an entry without text")
    direction = fit_direction(scorer, prompts, batch_size=TEXT_BATCH, progress=len(prompts) > TEXT_BATCH)
    args.output = args.output or Path(DIRECTION_FILE)
    save_direction(args.output, direction, scorer, len(prompts))
    eta = prompt_embeddings(scorer, prompts[:TEXT_BATCH])[None] @ direction
    print(f"saved V ({scorer.embed_dim} dims, {len(prompts)} prompts, scorer kind {scorer.kind.name}) to "
          f"{args.output}; η on the first {len(eta)} prompts: mean {eta.mean():.3f}, "
          f"range {eta.min():.3f}..{eta.max():.3f}")


def retrieval_results(args, scorer: Scorer, direction: torch.Tensor | None) -> dict:
    """Tables 1 and 4 (R@1 %) for the manifest's pairs, from one pass over the images."""
    records = data.read_manifest(args.retrieval)
    empty = next((r.image for r in records if not r.caption), None)
    if empty is not None:
        raise ValueError(f"{args.retrieval}: the caption of {empty} is empty; every pair needs one")
    captions = [r.caption for r in records]
    ks = parse_max_sentences(args.max_sentences, many=True)
    images = embed_images(scorer, [r.image for r in records], args.batch_size)
    average = prompt_embeddings(scorer, captions, max_sentences=list(dict.fromkeys([None, *ks])))
    single = prompt_embeddings(scorer, captions, single=True)[None]
    source = "given"
    if direction is None:
        direction, source = common_direction(average[None]), "fitted on these captions"
    results = {"pairs": len(records), "direction": source,
               "table1": recall_table({"single": single, "average": average[None]}, images, direction)}
    if args.max_sentences is not None:
        results["table4"] = recall_table({str(k): average[k] for k in ks}, images, direction)
    return results


def run_retrieval(args, scorer: Scorer, direction: torch.Tensor | None) -> None:
    results = retrieval_results(args, scorer, direction)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"text->image R@1 (%) over {results['pairs']} pairs, scorer {scorer.name} ({scorer.kind.name}), "
          f"V {results['direction']}")
    for key, title in (("table1", "Table 1"), ("table4", "Table 4: max sentences")):
        if key in results:
            names = list(results[key]["original"])
            print(f"\n{title:<24}" + "".join(f"{n:>10}" for n in names))
            for row, label in (("original", "C(p)  original"), ("relevant", "C⊥(p) text-relevant")):
                print(f"{label:<24}" + "".join(f"{results[key][row][n]:10.2f}" for n in names))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if not (args.fit_direction or args.retrieval or args.inputs):
            raise ValueError("nothing to do: give images and a prompt, --fit-direction or --retrieval (see --help)")
        location = scorer_path(args.scorer)
        scorer = Scorer.load(location, kind=args.kind, dtype=getattr(torch, args.dtype), device=args.device)
        if args.fit_direction:
            run_fit_direction(args, scorer)
            return 0
        direction = find_direction(args.direction, location, scorer.embed_dim)
        if args.retrieval:
            run_retrieval(args, scorer, direction)
        else:
            run_scores(args, scorer, direction)
    except ValueError as err:  # bad input, WeightsError included: one line, no traceback
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"score.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
