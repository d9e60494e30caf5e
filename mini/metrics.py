"""The miniature's measurements, shared by ``mini.evaluate`` (the table) and ``mini.diagnose``.

- generation: each model row samples the same held-out captions from the same initial noise;
- fact accuracy: the shapes world's pixel checks, split by where a fact's sentence starts in the caption
  (LongAlign §3's point: 77-token truncation loses the late facts);
- the Fréchet distance of scorer image features (FID's formula, on the miniature's own scorer);
- mean original and text-relevant scores (Table 2's Denscore-O and Denscore) and Table 1 retrieval (§4).

Images are uint8 pixels [N, 64, 64, 3] throughout, as the checker and PIL read them.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mini import world
from model.diffusion import DPMSolverSampler, NoiseSchedule, sample_loop
from model.longtext import DroppedTokensWarning, LongPromptEncoder, split_sentences
from model.lora import load_lora
from model.preference import Scorer, find_direction, prompt_embeddings, recall_table
from model.vae import to_uint8
from model.weights import load_pipeline

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "mini"  # the shipped miniature pipeline
ENCODINGS = ("segment", "truncate")  # a row's text encoding: LongAlign's, or the 77-token baseline
LOST_FROM = 76  # plain truncation keeps content tokens 1..75: a sentence starting at 76 or later is lost


# ----------------------------------------------------------------------------------------------------------
# Models to evaluate
# ----------------------------------------------------------------------------------------------------------

@dataclass
class EvalRow:
    name: str
    path: Path  # a pipeline folder, or a LoRA file applied to a base pipeline
    encoding: str  # one of ENCODINGS


def parse_row(spec: str) -> EvalRow:
    """'NAME=PATH[:ENCODING]' -> EvalRow; the name may hold '=' itself (ω=0.3), the path may not."""
    name, sep, rest = spec.rpartition("=")
    if not sep or not name.strip() or not rest:
        raise ValueError(f"--row takes NAME=PATH[:ENCODING], got '{spec}'")
    path, _, encoding = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in ENCODINGS else (rest, "", "segment")
    return EvalRow(name.strip(), Path(path), encoding)


def last_change(path: Path) -> float:
    """The newest modification time of a weights file, or of any file in a pipeline folder (links followed);
    0 for a missing path (loading it then reports the problem)."""
    if not path.is_dir():
        return path.stat().st_mtime if path.exists() else 0.0
    files = [Path(folder, name) for folder, _, names in os.walk(path, followlinks=True) for name in names]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def load_row_pipeline(row: EvalRow, lora_base: Path | None, device: str):
    """The row's pipeline in fp32; a LoRA row is its file merged into ``lora_base``'s UNet."""
    if row.path.suffix == ".safetensors":
        if lora_base is None:
            raise ValueError(f"row '{row.name}' is a LoRA file; pass --lora-base with the pipeline it applies to")
        pipe = load_pipeline(lora_base, device=device)
        load_lora(pipe.unet, row.path)
        return pipe
    return load_pipeline(row.path, device=device)


def load_scorer(path: Path | None, direction: Path | None, device: str = "cpu", **load) -> tuple[Scorer, torch.Tensor]:
    """The scorer (default: the shipped miniature's) and its common direction V (default: the file beside it)."""
    path = path or SHIPPED / "scorer"
    scorer = Scorer.load(path, device=device, **load)
    found = find_direction(direction, path, scorer.embed_dim)
    if found is None:
        raise ValueError(f"no common direction V beside the scorer {path}; pass --direction, or fit one with "
                         "python score.py --fit-direction prompts.txt")
    return scorer, found


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

def scene_noise(n: int, vae, seed: int) -> torch.Tensor:
    """The initial latents of all ``n`` scenes, drawn once, so every row starts image i from the same noise."""
    return torch.randn(vae.latent_shape(n, world.CANVAS, world.CANVAS), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(pipe, captions: list[str], encoding: str, noise: torch.Tensor, steps: int, cfg: float,
             batch_size: int) -> torch.Tensor:
    """uint8 pixels [N, 64, 64, 3] for ``captions``: DPM-Solver++ with classifier-free guidance, batch by batch."""
    encoder = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, strategy=encoding)
    uncond = encoder([""])
    device = next(pipe.unet.parameters()).device
    images = []
    with warnings.catch_warnings():  # truncation dropping tokens is the point of the baseline row
        warnings.simplefilter("ignore", DroppedTokensWarning)
        for start in tqdm(range(0, len(captions), batch_size), desc="generating", leave=False):
            cond = encoder(captions[start:start + batch_size])
            latents = sample_loop(pipe.unet, DPMSolverSampler(NoiseSchedule(), steps),
                                  noise[start:start + len(cond)].to(device), cond, uncond, cfg, progress=False)
            images.append(to_uint8(pipe.vae.decode(latents / pipe.vae.scaling_factor)))
    return torch.cat(images)


def renders(examples: list) -> torch.Tensor:
    """The true images of (scene, caption) examples, uint8 pixels [N, 64, 64, 3]."""
    return torch.from_numpy(np.stack([np.asarray(world.render(scene)) for scene, _ in examples]))


def image_features(scorer: Scorer, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The scorer's raw image embeddings [N, P] of uint8 pixels [N, H, W, 3]."""
    with torch.no_grad():
        return torch.cat([scorer.encode_images(chunk.permute(0, 3, 1, 2).float().div(255).to(scorer.device))
                          .float().cpu() for chunk in images.split(batch_size)])


# ----------------------------------------------------------------------------------------------------------
# The numbers
# ----------------------------------------------------------------------------------------------------------

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


def share(facts: list[dict], key: str = "holds") -> float:
    """The percentage of ``facts`` whose ``key`` is true; NaN for none."""
    return 100.0 * sum(f[key] for f in facts) / len(facts) if facts else float("nan")


def fact_accuracy(images: torch.Tensor, examples: list) -> dict[str, float]:
    """Fact accuracy (%) over all facts, the facts whose sentence starts at token 76+ / after 77, and shapes.

    "layout" is a weaker, secondary test: an object fact counts when its cell has enough ink, whatever the
    colour (empty facts as before), so it shows whether a model puts things in the right cells at all.
    """
    facts = []
    for image, (scene, caption) in zip(images.numpy(), examples):
        facts += world.check_facts(image, scene, caption)["facts"]
    for fact in facts:
        fact["placed"] = fact["holds"] if fact["kind"] == "empty" else fact["ink_fraction"] >= world.OBJECT_MIN_INK
    objects = [f for f in facts if f["kind"] == "object"]
    lost = [f for f in facts if f["token_start"] >= LOST_FROM]
    return {"all": share(facts), "lost": share(lost), "after77": share([f for f in facts if f["token_start"] > 77]),
            "shape": share(objects, "shape_holds"), "layout": share(facts, "placed"),
            "layout_lost": share(lost, "placed")}


def caption_statistics(examples: list, tokenizer) -> dict[str, float]:
    """How long the held-out captions are, and how many facts plain 77-token truncation loses."""
    lengths, starts, any_lost = [], [], 0
    for _, caption in examples:
        lengths.append(len(tokenizer.encode(caption)) + 2)
        fact_starts = world.sentence_token_starts(split_sentences(caption), tokenizer)
        starts += fact_starts
        any_lost += max(fact_starts) >= LOST_FROM
    return {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths),
            "captions_losing": 100.0 * any_lost / len(examples),
            "facts_lost": 100.0 * sum(s >= LOST_FROM for s in starts) / len(starts),
            "facts_after77": 100.0 * sum(s > 77 for s in starts) / len(starts), "facts": len(starts)}


def retrieval_table(scorer: Scorer, real_features: torch.Tensor, captions: list[str],
                    direction: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Table 1 in miniature: text->image R@1 (%) for Single / Average × original / text-relevant, and η."""
    average = prompt_embeddings(scorer, captions)[None]
    single = prompt_embeddings(scorer, captions, single=True)[None]
    table = recall_table({"single": single, "average": average}, real_features, direction)
    return table, average @ direction.cpu()


def mean_scores(scorer: Scorer, features: torch.Tensor, captions: list[str], direction: torch.Tensor):
    """Mean original and text-relevant score (×100) of each image with its own caption (Table 2's Denscore-O
    and Denscore, in miniature)."""
    text = prompt_embeddings(scorer, captions)[None]
    image_unit = torch.nn.functional.normalize(features, dim=-1)
    original = (text * image_unit).sum(-1)
    relevant = original - (text @ direction.cpu()) * (image_unit @ direction.cpu())
    return 100 * original.mean().item(), 100 * relevant.mean().item()


# ----------------------------------------------------------------------------------------------------------
# The report scripts' common ending
# ----------------------------------------------------------------------------------------------------------

def write_report(run, args) -> int:
    """``run(args)`` -> markdown, written to ``args.output`` and printed: the end of every report script's
    main. Bad input (a ValueError, WeightsError included) gives one clear line and exit code 2, no traceback."""
    try:
        markdown = run(args)
    except ValueError as err:
        print(f"error: {' '.join(line.strip() for line in str(err).splitlines())}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
