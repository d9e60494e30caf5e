"""LongAlign §4: preference scores for long prompts, and their text-relevant / text-irrelevant parts.

Every scorer here (CLIP-H, PickScore, HPSv2, Denscore) is a CLIP model; its score is a cosine, with no
logit scale (paper §4, and the official LongAlign reward code). For a long prompt the score is segment-level:

    each sentence -> its own 77-token encoding -> L2-normalize -> plain mean C_P (not renormalized)
    score = C_X · C_P  = the mean of the per-sentence cosines          (C_X: the normalized image embedding)

The paper's decomposition splits the score along V, the common direction of all text embeddings:

    η = C_P · V,      C_P = C_P⊥ + η·V
    original = C_X · C_P = C_X · C_P⊥ (text-relevant)  +  η·C_X · V (text-irrelevant)

The text-irrelevant part rewards images for looking like "any caption" rather than this one. The reward
stage therefore trains on score_ω = relevant + ω·irrelevant (ω = 0.3 in the paper); the fused kernel and
its twin are ``model.kernels.score_projection``.

V is fitted on a corpus of prompts and saved as a small safetensors file (:func:`fit_direction`,
:func:`save_direction`; :func:`direction_path` is where scripts look for it), or taken from the current batch
as the official training code does (:func:`batch_direction`, which sums over every rank under
torch.distributed). The retrieval of the paper's Tables 1 and 4 is :func:`recall_table`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model.clip import CLIPModel, pil_to_tensor, preprocess_tensor
from model.convert import Layout
from model.kernels import ScoreParts, reweighted_text, score_projection, segment_text_embedding
from model.longtext import sentence_segments, split_sentences
from model.tokenizer import CONTEXT_LENGTH, CLIPTokenizer, frame
from model.weights import WeightsError, load_clip, read_state_dict

TEXT_BATCH = 64  # prompts per text-encoder pass when embedding a corpus


# ----------------------------------------------------------------------------------------------------------
# Scorer kinds
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScorerKind:
    """What differs between the public scorers once their weights are loaded: preprocessing and text padding."""
    name: str
    pad_to_square: bool  # HPSv2: longest side to 224 + zero pad; the others: shortest side + centre crop
    pad_token_id: int  # all pad text with 0; under the causal mask it cannot change the pooled <eot> state
    source: str  # where to get the public weights


KINDS = {
    "clip": ScorerKind("clip", False, 0, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (transformers folder)"),
    "pickscore": ScorerKind("pickscore", False, 0, "yuvalkirstain/PickScore_v1 (transformers folder)"),
    "hpsv2": ScorerKind("hpsv2", True, 0, "xswu/HPSv2: HPS_v2_compressed.pt or HPS_v2.1_compressed.pt "
                                          "(open_clip state dict)"),
    "denscore": ScorerKind("denscore", False, 0, "luping-liu/Denscore (transformers folder)"),
}


def infer_kind(path: str | os.PathLike, layout: str, kind: str | None = None) -> ScorerKind:
    """The scorer kind: ``kind`` when given; else open_clip layout ⇒ HPSv2; else a hint in the path name.

    PickScore, Denscore and CLIP-H share their layout and preprocessing, so for a transformers folder the
    kind only names the scorer; a folder named after none of them counts as plain CLIP.
    """
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown scorer kind '{kind}': use one of {', '.join(KINDS)}")
        return KINDS[kind]
    if layout == Layout.OPEN_CLIP:
        return KINDS["hpsv2"]
    name = str(path).lower()
    for hint in ("pickscore", "denscore", "hps"):
        if hint in name:
            return KINDS["hpsv2" if hint == "hps" else hint]
    return KINDS["clip"]


# ----------------------------------------------------------------------------------------------------------
# Encoded prompts: segment embeddings, and which sentence each segment came from
# ----------------------------------------------------------------------------------------------------------

@dataclass
class EncodedPrompts:
    """The raw (projected, unnormalized) embeddings of every segment of B prompts.

    ``segments`` is [B, S, P], padded to the longest prompt; ``sentence_index`` [B, S] holds the sentence
    number of each segment (a sentence over 75 tokens gives several segments) and -1 on padding, so the
    first k sentences can be chosen later without encoding again (the paper's Table 4).
    """
    segments: torch.Tensor
    sentence_index: torch.Tensor

    def mask(self, max_sentences: int | None = None) -> torch.Tensor:
        """[B, S] True for the segments of the first ``max_sentences`` sentences (all when None)."""
        keep = self.sentence_index >= 0
        if max_sentences is not None:
            keep &= self.sentence_index < max_sentences
        return keep

    def prompt_embedding(self, max_sentences: int | None = None) -> torch.Tensor:
        """C_P [B, P]: the mean of the normalized segment embeddings (float32)."""
        return segment_text_embedding(self.segments.float(), self.mask(max_sentences))

    def segments_used(self, max_sentences: int | None = None) -> torch.Tensor:
        return self.mask(max_sentences).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------------------

class Scorer:
    """A frozen CLIP model used as a preference scorer, with its kind's preprocessing and text padding."""

    def __init__(self, model: CLIPModel, kind: ScorerKind, tokenizer: CLIPTokenizer | None = None,
                 name: str = "scorer"):
        self.model = model.eval().requires_grad_(False)
        self.kind = kind
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.name = name

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device | None = None) -> Scorer:
        """Load any CLIP layout ``load_clip`` reads; the kind is inferred (see :func:`infer_kind`) unless given."""
        model = load_clip(path, dtype=dtype, device=device)
        return cls(model, infer_kind(path, model.layout, kind), name=str(path))

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def device(self) -> torch.device:
        return self.model.text_projection.weight.device

    # -- images ------------------------------------------------------------------------------------------

    def prepare_images(self, images: list[Image.Image] | torch.Tensor, random_crop: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """PIL images, or a float tensor [B, 3, H, W] in [0, 1] (differentiable), -> scorer pixels [B, 3, 224, 224]."""
        if isinstance(images, torch.Tensor):
            return preprocess_tensor(images, self.kind.pad_to_square, random_crop=random_crop, generator=generator)
        return torch.cat([preprocess_tensor(pil_to_tensor(image)[None].to(self.device), self.kind.pad_to_square)
                          for image in images])

    def encode_images(self, images: list[Image.Image] | torch.Tensor, random_crop: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw image embeddings [B, P] (projected, not normalized); keeps the graph of a tensor input."""
        pixels = self.prepare_images(images, random_crop=random_crop, generator=generator)
        return self.model.encode_image(pixels.to(self.device))

    # -- text --------------------------------------------------------------------------------------------

    def _ids(self, contents: list[list[int]]) -> torch.Tensor:
        rows = [frame(ids, CONTEXT_LENGTH, self.kind.pad_token_id) for ids in contents]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], single: bool = False,
                       max_sentences: int | None = None) -> EncodedPrompts:
        """Encode every segment of every prompt in ONE batched forward pass of the text tower.

        ``single=True`` is Table 1's "Single": the whole prompt as one segment, truncated to 77 tokens.
        Otherwise each sentence is a segment (LongAlign §4; ``model.longtext`` splits them), and
        ``max_sentences`` keeps only the first ones.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        empty = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty; a score needs some text")
        contents, places = [], []  # content ids of every segment; its (prompt, slot, sentence)
        for p, prompt in enumerate(prompts):
            sentences = [prompt] if single else split_sentences(prompt)[:max_sentences]
            slot = 0
            for s, sentence in enumerate(sentences):
                pieces = [self.tokenizer.encode(sentence)] if single else sentence_segments(self.tokenizer, sentence)
                for piece in pieces:
                    contents.append(piece)
                    places.append((p, slot, s))
                    slot += 1
        flat = self.model.encode_text(self._ids(contents))  # [all segments, P]
        prompt_of, slot_of, sentence_of = torch.tensor(places, device=flat.device).T
        width = int(slot_of.max()) + 1
        segments = flat.new_zeros(len(prompts), width, flat.shape[-1])
        segments[prompt_of, slot_of] = flat
        sentence_index = torch.full((len(prompts), width), -1, dtype=torch.long, device=flat.device)
        sentence_index[prompt_of, slot_of] = sentence_of
        return EncodedPrompts(segments, sentence_index)

    # -- scores ------------------------------------------------------------------------------------------

    def score(self, images: list[Image.Image] | torch.Tensor, prompts: list[str],
              direction: torch.Tensor | None = None, omega: float = 1.0, single: bool = False,
              max_sentences: int | None = None, random_crop: int | None = None,
              generator: torch.Generator | None = None) -> ScoreParts:
        """Per pair (image i, prompt i): the ω-reweighted score and its parts (LongAlign §4), the reward.

        ``images`` are PIL images or a float tensor [B, 3, H, W] in [0, 1]; a tensor keeps its graph, so
        ``score`` carries the gradient to the pixels. ``random_crop`` takes one random square window of that
        side first (drawn from ``generator``), as the official reward code does before resizing to 224.
        ``direction`` is V [P] (see :func:`load_direction`); None takes it from this batch of prompts,
        gathered across ranks, as the official reward code does. The prompts' text is encoded without grad.
        """
        encoded = self.encode_prompts(prompts, single=single, max_sentences=max_sentences)
        image_embeddings = self.encode_images(images, random_crop=random_crop, generator=generator)
        if image_embeddings.shape[0] != len(encoded.segments):
            raise ValueError(f"{image_embeddings.shape[0]} images but {len(encoded.segments)} prompts; "
                             "pass one prompt per image")
        if direction is None:
            direction = batch_direction(encoded.prompt_embedding())
        check_direction(direction, self.embed_dim)
        return score_projection(image_embeddings, encoded.segments, encoded.mask(), direction.to(self.device),
                                omega)


def prompt_embeddings(scorer: Scorer, prompts: list[str], single: bool = False,
                      max_sentences: Sequence[int | None] = (None,), batch_size: int = TEXT_BATCH,
                      progress: bool | None = None) -> dict[int | None, torch.Tensor]:
    """C_P [N, P] on the CPU for every value in ``max_sentences`` (None: all sentences), from ONE encoding pass.

    ``single`` encodes each whole prompt as one 77-token text (Table 1's "Single"), where ``max_sentences``
    has no effect. The progress bar shows when there is more than one batch, unless ``progress`` says.
    """
    out = {k: [] for k in max_sentences}
    show = len(prompts) > batch_size if progress is None else progress
    for start in tqdm(range(0, len(prompts), batch_size), desc="text" + (" (single)" if single else ""),
                      disable=not show):
        encoded = scorer.encode_prompts(prompts[start:start + batch_size], single=single)
        for k in max_sentences:
            out[k].append(encoded.prompt_embedding(None if single else k).cpu())
    return {k: torch.cat(parts) for k, parts in out.items()}


# ----------------------------------------------------------------------------------------------------------
# The common direction V
# ----------------------------------------------------------------------------------------------------------

def common_direction(text_embeddings: torch.Tensor) -> torch.Tensor:
    """V: the normalized mean of prompt embeddings C_P [N, P] -> [P]."""
    return F.normalize(text_embeddings.float().mean(dim=0), dim=0)


def batch_direction(text_embeddings: torch.Tensor) -> torch.Tensor:
    """V from the current batch; under torch.distributed the mean runs over the prompts of every rank.

    The official code averages per-rank means; summing embeddings and counts is the same for equal batch
    sizes and exact for unequal ones. V is a constant of the reward, so the embeddings are detached.
    """
    total = text_embeddings.detach().float().sum(dim=0)
    count = torch.tensor(float(len(text_embeddings)), device=total.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return F.normalize(total / count, dim=0)


def fit_direction(scorer: Scorer, prompts: list[str], batch_size: int = TEXT_BATCH,
                  progress: bool = True) -> torch.Tensor:
    """V from a corpus of prompts (the paper's definition): the normalized mean of their C_P."""
    if not prompts:
        raise ValueError("fitting a common direction needs at least one prompt")
    total = torch.zeros(scorer.embed_dim)
    for start in tqdm(range(0, len(prompts), batch_size), desc="text embeddings", disable=not progress):
        total += scorer.encode_prompts(prompts[start:start + batch_size]).prompt_embedding().sum(dim=0).cpu()
    return F.normalize(total / len(prompts), dim=0)


DIRECTION_KEY = "direction"
DIRECTION_FILE = "direction.safetensors"  # V's usual place: beside the scorer it was fitted with


def save_direction(path: str | os.PathLike, direction: torch.Tensor, scorer: Scorer, num_prompts: int) -> None:
    """Write V as safetensors, with the scorer's embed dim, kind and name in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"embed_dim": str(scorer.embed_dim), "kind": scorer.kind.name, "scorer": scorer.name,
                "num_prompts": str(num_prompts)}
    save_file({DIRECTION_KEY: direction.detach().float().contiguous().cpu()}, str(path), metadata=metadata)


def load_direction(path: str | os.PathLike, embed_dim: int | None = None) -> torch.Tensor:
    """Read V [P] (normalized again) and, when ``embed_dim`` is given, check it fits the scorer."""
    state = read_state_dict(path)
    if DIRECTION_KEY not in state or state[DIRECTION_KEY].dim() != 1:
        raise WeightsError(f"{path} holds no common direction (expected one 1-D tensor '{DIRECTION_KEY}'); "
                           "make one with: python score.py --fit-direction prompts.txt")
    direction = state[DIRECTION_KEY].float()
    if embed_dim is not None and len(direction) != embed_dim:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        raise WeightsError(f"the direction in {path} has {len(direction)} dims (fitted with "
                           f"{meta.get('scorer', 'another scorer')}), but this scorer embeds into {embed_dim}; "
                           "fit one for this scorer with --fit-direction")
    return F.normalize(direction, dim=0)


def direction_path(path: str | os.PathLike | None, scorer_location: str | os.PathLike) -> Path | None:
    """The one rule for where V comes from: ``path`` when given, else :data:`DIRECTION_FILE` beside the scorer
    (in its folder, or beside its file) when that exists, else None (no split, or V from the batch).

    Every script that scores uses this rule, so scoring and reward training see the same V.
    """
    if path is not None:
        return Path(path)
    location = Path(scorer_location)
    beside = (location if location.is_dir() else location.parent) / DIRECTION_FILE
    return beside if beside.is_file() else None


def find_direction(path: str | os.PathLike | None, scorer_location: str | os.PathLike,
                   embed_dim: int) -> torch.Tensor | None:
    """V from :func:`direction_path`'s file, or None when it finds none; the size check is :func:`load_direction`'s.

    ``scorer_location`` is the scorer's folder or file.
    """
    found = direction_path(path, scorer_location)
    return None if found is None else load_direction(found, embed_dim)


def check_direction(direction: torch.Tensor, embed_dim: int) -> None:
    if tuple(direction.shape) != (embed_dim,):
        raise ValueError(f"the common direction has shape {tuple(direction.shape)}, but this scorer embeds "
                         f"into {embed_dim} dims; fit one for this scorer")


# ----------------------------------------------------------------------------------------------------------
# Retrieval (the paper's Tables 1 and 4)
# ----------------------------------------------------------------------------------------------------------

def similarities(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor,
                 direction: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All text × image scores [N_text, N_image]: "original" C_X·C_P and, given V, "relevant" C_X·C_P⊥.

    ``text_embeddings`` are prompt embeddings C_P [N_text, P]; ``image_embeddings`` are raw [N_image, P].
    The diagonal agrees with :func:`model.kernels.score_projection` for matching pairs.
    """
    image_unit = F.normalize(image_embeddings.float(), dim=-1)
    text = text_embeddings.float()
    scores = {"original": text @ image_unit.T}
    if direction is not None:
        scores["relevant"] = reweighted_text(text, direction.to(text), 0.0) @ image_unit.T  # C_P⊥ = C_P − ηV
    return scores


def recall_at_1(similarity: torch.Tensor) -> float:
    """Text→image R@1 (%) when text i belongs with image i: how often image i is the top match of text i."""
    best = similarity.argmax(dim=1)
    return 100.0 * (best == torch.arange(len(best), device=best.device)).float().mean().item()


def recall_table(text_columns: dict[str, torch.Tensor], image_embeddings: torch.Tensor,
                 direction: torch.Tensor) -> dict[str, dict[str, float]]:
    """Text→image R@1 (%) of the paper's Tables 1 and 4: ``{"original" | "relevant": {column: R@1}}``.

    Each column of ``text_columns`` holds prompt embeddings C_P [N, P] whose row i describes image i of
    ``image_embeddings`` [N, P] (raw): Table 1's "single" (77-token truncation) and "average" (mean over
    sentences), or Table 4's sentence counts. Rows: the original C(p) and the text-relevant C⊥(p).
    """
    table = {"original": {}, "relevant": {}}
    for column, text in text_columns.items():
        for row, matrix in similarities(text, image_embeddings, direction).items():
            table[row][column] = recall_at_1(matrix)
    return table

