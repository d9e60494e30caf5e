"""Score images against a long prompt with a CLIP preference scorer, split LongAlign-style (paper §4).

    python score.py image.png prompt.txt                     # one image; prompt.txt holds the prompt
    python score.py outputs/ "samples/*.png" --prompt "..."  # many images (folders, globs), ranked
    python score.py --fit-direction prompts.txt -o V.safetensors        # fit the common direction V
    python score.py --retrieval manifest.jsonl --max-sentences 1,2,3,4,6,8   # the paper's Tables 1 and 4
    python score.py --eval samples/ --prompts prompts.jsonl --scorer Denscore  # the paper's Table 2

Each image gets (×100, as papers report them):
    original     C_X·C_P       the segment-level score: the mean cosine of the image with each sentence
    relevant     C_X·C_P⊥      the part that depends on this particular prompt
    irrelevant   η·C_X·V       the part any caption would earn (V: the common direction, η = C_P·V)
original = relevant + irrelevant. The split needs V: --direction, or direction.safetensors beside the
scorer; without one only the original score is shown. Scorers: PickScore_v1, HPSv2, Denscore, CLIP-H
(model/preference.py lists where to get them); any layout model/weights.py reads. The line on stderr
names the direction file used. The miniature's own evaluation table is made by `python -m mini.evaluate`.

--eval DIR --prompts FILE (DIR: the --out-dir of `sample.py --prompts FILE`) gives Table 2's mean ± 95% CI,
1.96·std/√n, of the original (Denscore-O) and text-relevant (Denscore) scores ×100, and each image's scores
in DIR/scores.jsonl (or --out). FILE: .txt, a prompt a line, or JSONL ("prompt" or "caption", optional
"name"); prompt i is its i-th non-empty entry, and its image the "file" of DIR/manifest.jsonl's line with
"index" i (and that prompt), else DIR/NAME.png, else DIR/00000.png (i in 5 digits). V, without a file, is
fitted on these prompts. In every mode a bad or missing image is skipped and named; none read: an error.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import data
from model.preference import (DIRECTION_FILE, KINDS, TEXT_BATCH, Scorer, common_direction, direction_path,
                              fit_direction, load_direction, prompt_embeddings, recall_table, save_direction,
                              similarities)
from model.weights import atomic_write

DEFAULT_SCORER = Path(__file__).resolve().parent / "weights" / "mini" / "scorer"
# The miniature's evaluation flags left this script (all begin so); the command that has them now.
MOVED_PREFIX, MOVED_TO = "--eval-", "python -m mini.evaluate"
SAMPLE_MANIFEST = "manifest.jsonl"  # what `sample.py --prompts FILE --out-dir DIR` writes into DIR
EVAL_SCORES = "scores.jsonl"        # --eval's per-image scores, by default in DIR


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
    parser.add_argument("-o", "--output", "--out", type=Path, default=None,
                        help=f"where --fit-direction writes V (default: ./{DIRECTION_FILE}), or --eval the "
                             f"per-image scores (default: DIR/{EVAL_SCORES})")
    parser.add_argument("--retrieval", type=Path, metavar="MANIFEST",
                        help="text->image R@1 on a .jsonl of {\"image\": path relative to the manifest, "
                             "\"caption\": text}; at least 2 pairs")
    parser.add_argument("--eval", type=Path, metavar="DIR",
                        help="Table 2: score the images of DIR against --prompts (pairing: see above)")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="with --eval: the prompt file DIR was sampled from (.txt or .jsonl)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="scorer weights dtype (default float32)")
    args, unknown = parser.parse_known_args(argv)
    moved = next((flag for flag in unknown if flag.startswith(MOVED_PREFIX)), None)
    if moved:
        raise ValueError(f"{moved.split('=')[0]} is no longer part of score.py: run `{MOVED_TO}` (see its --help "
                         "for the flags)")
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


def embed_images(scorer: Scorer, paths: list[Path], batch_size: int) -> tuple[torch.Tensor, list[int]]:
    """Raw image embeddings [n, P] of the files that read, in batches, each read once; and their indices.

    A file that does not read is skipped (one bad image in thousands costs only itself) and named on stderr;
    when none reads, that is the error (a lone file's own message)."""
    chunks, kept, skipped = [], [], []
    with torch.no_grad(), tqdm(total=len(paths), desc="images", unit="image", disable=len(paths) <= batch_size) as bar:
        for start in range(0, len(paths), batch_size):
            images = []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(load_image(paths[i]))
                    kept.append(i)
                except ValueError as err:
                    skipped.append(str(err))
            if images:
                chunks.append(scorer.encode_images(images).float().cpu())
            bar.set_postfix(skipped=len(skipped), refresh=False)
            bar.update(min(batch_size, len(paths) - start))
    if not chunks and len(skipped) == 1:
        raise ValueError(skipped[0])
    for note in skipped:
        print(f"skipped: {note}", file=sys.stderr)
    if not chunks:
        raise ValueError(f"none of the {len(paths)} images could be read (each is named above)")
    if skipped:
        print(f"skipped {len(skipped)} of {len(paths)} images; scored the other {len(kept)}", file=sys.stderr)
    return torch.cat(chunks), kept


def read_direction(args, location: Path, scorer: Scorer) -> tuple[torch.Tensor | None, str | None]:
    """V and its file, by the one rule of ``direction_path`` (--direction, else the file beside the scorer),
    named on stderr; (None, None) when there is none."""
    path = direction_path(args.direction, location)
    if path is None:
        return None, None
    direction = load_direction(path, scorer.embed_dim)
    print(f"common direction V: {path}{'' if args.direction else ' (found beside the scorer)'}", file=sys.stderr)
    return direction, f"from {path}"


# ---------------------------------------------------------------------------------------------------------
# The four modes
# ---------------------------------------------------------------------------------------------------------

def score_rows(args, scorer: Scorer, location: Path) -> list[dict]:
    """One row per image that reads: its scores ×100 (and η), ranked by the text-relevant score when V is known."""
    prompt, paths = prompt_and_images(args)
    direction, _ = read_direction(args, location, scorer)
    (k,) = parse_max_sentences(args.max_sentences, many=False)
    encoded = scorer.encode_prompts([prompt], single=args.single, max_sentences=k)
    text = encoded.prompt_embedding().cpu()  # [1, P]
    images, kept = embed_images(scorer, paths, args.batch_size)
    scores = similarities(text, images, direction)
    rows = []
    for i, path in enumerate([paths[j] for j in kept]):
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


def show_scores(rows: list[dict], scorer: Scorer) -> None:
    split = "relevant" in rows[0]
    if not split:
        print("(no common direction: showing the original score only; fit one with --fit-direction)")
    columns = ["original", "relevant", "irrelevant", "eta"] if split else ["original"]
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


def retrieval_results(args, scorer: Scorer, location: Path) -> dict:
    """Tables 1 and 4 (R@1 %) for the manifest's pairs, from one pass over the images."""
    records = data.read_manifest(args.retrieval)
    empty = next((r.image for r in records if not r.caption), None)
    if empty is not None:
        raise ValueError(f"{args.retrieval}: the caption of {empty} is empty; every pair needs one")
    direction, source = read_direction(args, location, scorer)
    ks = parse_max_sentences(args.max_sentences, many=True)
    images, kept = embed_images(scorer, [r.image for r in records], args.batch_size)
    if len(kept) < 2:  # one pair is always its own best match: R@1 = 100% whatever the scorer
        raise ValueError(f"retrieval needs at least 2 image-caption pairs that read, {args.retrieval} has "
                         f"{len(kept)}; add pairs to the manifest")
    captions = [records[i].caption for i in kept]
    average = prompt_embeddings(scorer, captions, max_sentences=list(dict.fromkeys([None, *ks])))
    single = prompt_embeddings(scorer, captions, single=True)[None]
    if direction is None:
        direction, source = common_direction(average[None]), "fitted on these captions"
    results = {"pairs": len(kept), "direction": source,
               "table1": recall_table({"single": single, "average": average[None]}, images, direction)}
    if args.max_sentences is not None:
        results["table4"] = recall_table({str(k): average[k] for k in ks}, images, direction)
    return results


def show_retrieval(results: dict, scorer: Scorer) -> None:
    print(f"text->image R@1 (%) over {results['pairs']} pairs, scorer {scorer.name} ({scorer.kind.name}), "
          f"V {results['direction']}")
    for key, title in (("table1", "Table 1"), ("table4", "Table 4: max sentences")):
        if key in results:
            names = list(results[key]["original"])
            print(f"\n{title:<24}" + "".join(f"{n:>10}" for n in names))
            for row, label in (("original", "C(p)  original"), ("relevant", "C⊥(p) text-relevant")):
                print(f"{label:<24}" + "".join(f"{results[key][row][n]:10.2f}" for n in names))


# ---------------------------------------------------------------------------------------------------------
# Table 2: a folder of generated images against the prompts it was sampled from
# ---------------------------------------------------------------------------------------------------------

def read_prompt_file(path: Path) -> list[dict]:
    """{"prompt", "name"} per non-empty entry of a .txt (a prompt a line) or a JSONL ("prompt" or "caption")."""
    entries = []
    for number, line in enumerate(read_text(path, "--prompts file").splitlines(), 1):
        if not line.strip():
            continue
        entry = data.json_line(line, path, number) if path.suffix.lower() == ".jsonl" else {"prompt": line}
        text = entry.get("prompt", entry.get("caption"))
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{path} line {number}: needs a non-empty "prompt" or "caption" text')
        entries.append({"prompt": text.strip(), "name": entry.get("name")})
    return entries


def eval_images(folder: Path, entries: list[dict]) -> list[Path]:
    """The image of each prompt: by the folder's manifest when it has one, else NAME.png or 00000.png."""
    if not folder.is_dir():
        raise ValueError(f"--eval folder not found: {folder}; pass the --out-dir of sample.py --prompts")
    paths = [folder / (f"{e['name']}.png" if e["name"] is not None else f"{i:05d}.png") for i, e in enumerate(entries)]
    manifest = folder / SAMPLE_MANIFEST
    lines = manifest.read_text(encoding="utf-8").splitlines() if manifest.is_file() else []
    for number, line in enumerate(lines, 1):
        entry = data.json_line(line, manifest, number) if line.strip() else {}
        if "file" not in entry:  # a line of settings, not of an image
            continue
        index = entry.get("index")
        if type(index) is not int or not 0 <= index < len(entries) \
                or str(entry.get("prompt", "")).strip() != entries[index]["prompt"]:
            raise ValueError(f"{manifest} line {number}: {entry['file']} was not sampled from prompt {index} of "
                             "the --prompts file; pass the prompt file this folder was sampled from")
        paths[index] = folder / str(entry["file"])
    return paths


def mean_ci(values: torch.Tensor) -> dict:
    """The mean and the half-width of its 95% confidence interval, 1.96·s/√n (s: the sample std; None if n = 1)."""
    values = values.double()
    ci = 1.96 * values.std().item() / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": values.mean().item(), "ci95": ci, "n": len(values)}


def eval_results(args, scorer: Scorer, location: Path) -> dict:
    """Table 2's summary; one row per image that reads (scores ×100, as ``score_rows`` gives them) to --out."""
    (k,) = parse_max_sentences(args.max_sentences, many=False)
    entries = read_prompt_file(args.prompts)
    paths = eval_images(args.eval, entries)
    direction, source = read_direction(args, location, scorer)
    images, kept = embed_images(scorer, paths, args.batch_size)
    prompts = [entries[i]["prompt"] for i in kept]
    text = prompt_embeddings(scorer, prompts, single=args.single, max_sentences=[k])[k]
    if direction is None:
        direction, source = common_direction(text), f"fitted on these {len(prompts)} prompts"
    blocks = [similarities(text[s:s + TEXT_BATCH], images[s:s + TEXT_BATCH], direction)  # pair i: a diagonal
              for s in range(0, len(kept), TEXT_BATCH)]
    scores = {key: 100 * torch.cat([block[key].diagonal() for block in blocks]) for key in ("original", "relevant")}
    rows = [{"index": i, "image": str(paths[i]), "prompt": entries[i]["prompt"],
             "original": scores["original"][n].item(), "relevant": scores["relevant"][n].item(),
             "irrelevant": (scores["original"][n] - scores["relevant"][n]).item(), "eta": (text[n] @ direction).item()}
            for n, i in enumerate(kept)]
    out = args.output or args.eval / EVAL_SCORES
    atomic_write(out, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"))
    return {"images": len(kept), "skipped": len(paths) - len(kept), "direction": source, "scores": str(out),
            "original": mean_ci(scores["original"]), "relevant": mean_ci(scores["relevant"])}


def show_eval(summary: dict, scorer: Scorer) -> None:
    print(f"Table 2 over {summary['images']} images ({summary['skipped']} skipped), scorer {scorer.name} "
          f"({scorer.kind.name}), V {summary['direction']}")
    for key, label in (("original", "Denscore-O  original ×100"), ("relevant", "Denscore    text-relevant ×100")):
        ci = summary[key]["ci95"]
        print(f"  {label:<32}{summary[key]['mean']:8.2f} ± {'n/a' if ci is None else f'{ci:.2f}'}")
    print(f"per-image scores: {summary['scores']}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        modes = [flag for flag, on in (("--fit-direction", args.fit_direction), ("--retrieval", args.retrieval),
                                       ("--eval", args.eval), ("images", args.inputs)) if on]
        if len(modes) != 1:
            raise ValueError(f"{' and '.join(modes) + ' do not go together' if modes else 'nothing to do'}: give "
                             "images and a prompt, --fit-direction, --retrieval or --eval (see --help)")
        if (args.eval is None) != (args.prompts is None):
            raise ValueError("--eval DIR and --prompts FILE go together: the images and the prompts they were "
                             "sampled from")
        parse_max_sentences(args.max_sentences, many=bool(args.retrieval))  # bad input fails before loading
        location = scorer_path(args.scorer)
        scorer = Scorer.load(location, kind=args.kind, dtype=getattr(torch, args.dtype), device=args.device)
        if args.fit_direction:
            run_fit_direction(args, scorer)
            return 0
        compute, show = {"--retrieval": (retrieval_results, show_retrieval), "--eval": (eval_results, show_eval),
                         "images": (score_rows, show_scores)}[modes[0]]
        results = compute(args, scorer, location)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            show(results, scorer)
    except ValueError as err:  # bad input, WeightsError included: one line, no traceback
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"score.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
