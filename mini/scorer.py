"""The miniature's separate preference scorer: a CLIP trained only to judge, with hard negatives.

In the real system the model that conditions SD-1.5 (CLIP-L's text tower) and the model that scores
(CLIP-H, PickScore, HPSv2, Denscore) are different networks. The miniature's first CLIP did both jobs, so it
had to stay as small as the UNet's frozen text encoder, and it ranked long captions poorly. This scorer is a
second CLIP of the same classes, wider and with finer patches, trained for the reward and for retrieval only
(``python -m mini.pretrain --stage scorer``); the conditioning encoder and the SFT UNet stay as shipped.

Its objective sees the text at both of LongAlign §4's levels, and against negatives that differ in one fact:
- sentences: every image against the distinct sentences of its batch, each of whose truth is decided from the
  scenes; among them, for every true sentence, copies with one word changed (its colour, shape, size or
  cell), so "a red circle in the top left" must beat "a blue circle in the top left";
- whole captions: the segment-level embedding C_P (the mean of the unit sentence embeddings, the score the
  reward ascends) against the batch's other captions and against the image's own caption with one error put
  in: two objects' colours swapped (the UNet's typical binding error), one colour replaced, one object moved,
  one shape changed;
- the 77-token-truncated caption against the batch, so Table 1's "Single" column stays in distribution.

Every hard negative is written by changing words of the true caption, so its wording and sentence order are
the true caption's, and the only difference is the fact itself.
"""
from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from mini import world
from mini.metrics import renders
from mini.probes import error_margins, swap_two_colours
from model.clip import CONFIGS as CLIP_CONFIGS
from model.clip import CLIPConfig, CLIPModel, TextConfig, VisionConfig, preprocess_tensor
from model.longtext import split_sentences
from model.preference import KINDS, Scorer, prompt_embeddings, recall_at_1

CONFIGS = {
    # 224-px input in 28-px patches: an 8×8 grid of tokens for the 64-px scene (each 8 scene pixels wide),
    # fine enough to see a small shape's outline in a 21-px cell. 128-d embeddings leave room for a caption's
    # 4-9 facts side by side in C_X.
    "mini": CLIPConfig(
        text=TextConfig(width=128, layers=3, heads=2, mlp=512, act="gelu", vocab_size=49408, max_positions=77),
        vision=VisionConfig(width=128, layers=4, heads=2, mlp=512, act="gelu", patch_size=28, image_size=224),
        projection_dim=128),
    "test": CLIP_CONFIGS["test"],
}
CAPTION_NEGATIVES = ("swap two colours", "replace one colour", "move one object", "change one shape")


# ----------------------------------------------------------------------------------------------------------
# Facts, read back from a caption's words
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    """What one sentence claims: an object (colour, shape, size) in a cell, or the cell empty (all None)."""
    cell: int
    color: str | None = None
    shape: str | None = None
    size: str | None = None


def word_in(sentence: str, words) -> str | None:
    """The one word of ``words`` the sentence uses, or None."""
    found = [w for w in words if re.search(rf"\b{w}\b", sentence)]
    return found[0] if found else None


def parse_fact(sentence: str) -> Fact:
    """The fact a shapes-world sentence states (its words come from fixed lists, so this is exact)."""
    return Fact(world.sentence_cell(sentence), word_in(sentence, world.COLORS), word_in(sentence, world.SHAPES),
                word_in(sentence, world.SIZES))


def scene_objects(sentences: list[str]) -> dict[int, Fact]:
    """The objects of a caption by cell. A caption names every object, so any other cell is empty."""
    facts = (parse_fact(s) for s in sentences)
    return {fact.cell: fact for fact in facts if fact.color is not None}


def holds(fact: Fact, objects: dict[int, Fact]) -> bool:
    """Whether a fact is true of the scene whose objects are ``objects``."""
    return objects.get(fact.cell) == fact if fact.color is not None else fact.cell not in objects


def with_fact(sentence: str, old: Fact, new: Fact) -> str:
    """``sentence`` reworded to state ``new`` instead of ``old`` (an object sentence; the template is kept)."""
    for key in ("color", "shape", "size"):
        if getattr(old, key) != getattr(new, key):
            sentence = re.sub(rf"\b{getattr(old, key)}\b", getattr(new, key), sentence)
    if old.cell != new.cell:
        sentence = sentence.replace(world.POSITIONS[old.cell], world.POSITIONS[new.cell])
    return sentence


def changed_fact(fact: Fact, key: str, objects: dict[int, Fact], rng: random.Random) -> Fact | None:
    """``fact`` with ``key`` ("color", "shape", "size" or "cell") changed so that it is false; None if no
    such change exists (for "cell": every other cell holds this very object)."""
    if key == "cell":
        cells = [c for c in range(len(world.POSITIONS)) if c != fact.cell
                 and not holds(replace(fact, cell=c), objects)]
        return replace(fact, cell=rng.choice(cells)) if cells else None
    choices = [v for v in {"color": world.COLORS, "shape": world.SHAPES, "size": world.SIZES}[key]
               if v != getattr(fact, key)]
    return replace(fact, **{key: rng.choice(choices)})


def one_word_negatives(sentence: str, objects: dict[int, Fact], rng: random.Random) -> list[str]:
    """False sentences one fact away from a true one: each attribute changed once (an empty cell's sentence
    moves to an occupied cell)."""
    fact = parse_fact(sentence)
    if fact.color is None:
        occupied = list(objects)
        return [sentence.replace(world.POSITIONS[fact.cell], world.POSITIONS[rng.choice(occupied)])]
    changes = (changed_fact(fact, key, objects, rng) for key in ("color", "shape", "size", "cell"))
    return [with_fact(sentence, fact, new) for new in changes if new is not None]


# ----------------------------------------------------------------------------------------------------------
# Captions with one error put in
# ----------------------------------------------------------------------------------------------------------

def object_positions(sentences: list[str]) -> list[int]:
    return [i for i, s in enumerate(sentences) if parse_fact(s).color is not None]


def swap_colours(sentences, rng):
    """Two object sentences of different colours trade colours, or None."""
    facts = {i: parse_fact(sentences[i]) for i in object_positions(sentences)}
    pairs = [(a, b) for a in facts for b in facts if a < b and facts[a].color != facts[b].color]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    out = list(sentences)
    out[a] = with_fact(out[a], facts[a], replace(facts[a], color=facts[b].color))
    out[b] = with_fact(out[b], facts[b], replace(facts[b], color=facts[a].color))
    return out


def replace_in_one(key: str):
    """A negative caption maker: one object sentence's ``key`` changed as the diagnosis's errors change it
    (a colour no object has; a cell the caption does not mention; another shape), or None."""
    def make(sentences, rng):
        i = rng.choice(object_positions(sentences))
        fact = parse_fact(sentences[i])
        used_colours = {parse_fact(s).color for s in sentences}
        mentioned = {parse_fact(s).cell for s in sentences}
        options = {"color": [replace(fact, color=c) for c in world.COLORS if c not in used_colours],
                   "cell": [replace(fact, cell=c) for c in range(len(world.POSITIONS)) if c not in mentioned],
                   "shape": [replace(fact, shape=s) for s in world.SHAPES if s != fact.shape]}[key]
        if not options:
            return None
        return [*sentences[:i], with_fact(sentences[i], fact, rng.choice(options)), *sentences[i + 1:]]
    return make


NEGATIVE_CAPTION_MAKERS = dict(zip(CAPTION_NEGATIVES, (swap_colours, replace_in_one("color"),
                                                       replace_in_one("cell"), replace_in_one("shape"))))


# ----------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------

@dataclass
class TextBatch:
    """The batch's distinct sentences and, for each image, which of them are true and what its captions
    (true and negative) are made of."""
    sentences: list[str]          # distinct, in first-seen order
    truth: torch.Tensor           # [B, U] bool
    true_captions: list[list[int]]  # per image: indices into ``sentences``
    negatives: list[tuple[int, list[int]]]  # (image, indices) for each negative caption
    pairs: list[tuple[int, int, int]]  # (image, true sentence, its one-word negative) for the logged accuracy


def text_batch(captions: list[str], rng: random.Random) -> TextBatch:
    """Split, corrupt and index the batch's captions (pure Python; the encoder runs once per distinct sentence)."""
    index: dict[str, int] = {}

    def ids(sentences):
        return [index.setdefault(s, len(index)) for s in sentences]

    true, negatives, pairs, scenes = [], [], [], []
    for b, text in enumerate(captions):
        sentences = split_sentences(text)
        objects = scene_objects(sentences)
        scenes.append(objects)
        true.append(ids(sentences))
        for s in sentences:
            pairs += [(b, index[s], i) for i in ids(one_word_negatives(s, objects, rng))]
        for make in NEGATIVE_CAPTION_MAKERS.values():
            wrong = make(sentences, rng)
            if wrong is not None:
                negatives.append((b, ids(wrong)))
    facts = [parse_fact(s) for s in index]
    truth = torch.tensor([[holds(f, objects) for f in facts] for objects in scenes])
    return TextBatch(list(index), truth, true, negatives, pairs)


def encode_sentences(model: CLIPModel, tokenizer, sentences: list[str], device) -> torch.Tensor:
    """Unit embeddings [U, P] of single sentences (``encode_text`` encodes each batch only through its last
    ``<eot>``, so the short sentences cost a fraction of 77 positions)."""
    return F.normalize(model.encode_text(tokenizer(sentences).to(device)), dim=-1)


def mean_rows(embeddings: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """C_P for each group of sentence indices: the mean of their unit embeddings, not renormalized [G, P]."""
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    flat = torch.tensor([i for g in groups for i in g])
    summed = embeddings.new_zeros(len(groups), embeddings.shape[1]).index_add_(0, owner.to(embeddings.device),
                                                                               embeddings[flat])
    return summed / torch.tensor([len(g) for g in groups], device=embeddings.device)[:, None]


def sentence_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Each true (image, sentence) pair against all of the image's false sentences in the batch: the mean of
    −log(e^{l⁺} / (e^{l⁺} + Σ e^{l⁻})) over the true pairs (a multi-positive contrastive loss)."""
    false_lse = torch.logsumexp(logits.masked_fill(truth, float("-inf")), dim=1, keepdim=True)
    return F.softplus(false_lse - logits)[truth].mean()


def caption_loss(scale, image, prompts, negatives: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """C_P against the image: image→text over the batch's captions plus the image's own negative captions,
    and text→image over the batch (CLIP's symmetric loss, with hard negatives on the image side)."""
    batch = len(image)
    labels = torch.arange(batch, device=image.device)
    in_batch = scale * image @ prompts.T
    rows = [in_batch]
    if negatives:  # one product for all negatives, then each image's own in a row, padded with -inf
        owner = torch.tensor([b for b, _ in negatives], device=image.device)
        logits = scale * (image[owner] * torch.stack([p for _, p in negatives])).sum(dim=-1)
        rows.append(pad_sequence([logits[owner == b] for b in range(batch)], batch_first=True,
                                 padding_value=float("-inf")))
    return 0.5 * (F.cross_entropy(torch.cat(rows, dim=1), labels) + F.cross_entropy(in_batch.T, labels))


def scorer_loss(model: CLIPModel, tokenizer, images: torch.Tensor, captions: list[str], rng: random.Random):
    """The scorer's objective on a batch of images in [-1, 1] and their captions (see the module docstring).
    Returns the loss and logged numbers: in-batch C_P retrieval, and how often a true sentence beats its
    one-word negatives for its image."""
    pixels = preprocess_tensor((images.float() + 1) / 2, size=model.config.vision.image_size)
    image = F.normalize(model.encode_image(pixels), dim=-1)  # [B, P]
    text = text_batch(captions, rng)
    sentences = encode_sentences(model, tokenizer, text.sentences, image.device)
    scale = model.logit_scale.exp().clamp(max=100.0)  # CLIP caps the temperature at 100
    logits = scale * image @ sentences.T  # [B, U]
    prompts = mean_rows(sentences, text.true_captions)
    negative_prompts = mean_rows(sentences, [g for _, g in text.negatives]) if text.negatives else None
    negatives = [(b, negative_prompts[k]) for k, (b, _) in enumerate(text.negatives)]
    whole = F.normalize(model.encode_text(tokenizer(captions).to(image.device)), dim=-1)
    single = caption_loss(scale, image, whole, [])
    loss = (sentence_loss(logits, text.truth.to(image.device)) + caption_loss(scale, image, prompts, negatives)
            + single) / 3
    b, pos, neg = torch.tensor(text.pairs).T
    fact_acc = (logits[b, pos] > logits[b, neg]).float().mean()
    retrieval = ((image @ prompts.T).argmax(dim=0) == torch.arange(len(image), device=image.device)).float().mean()
    return loss, {"retrieval_acc": retrieval.detach(), "fact_acc": fact_acc.detach()}


# ----------------------------------------------------------------------------------------------------------
# The held-out check, logged while training
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_check(model: CLIPModel, tokenizer, n: int, split: str = "val") -> dict[str, float]:
    """On the first ``n`` real renders of ``split``: text→image R@1 (%) of the Average embedding C_P, and
    how often the true caption outscores the same caption with two colours swapped (%)."""
    scorer = Scorer(copy.deepcopy(model), KINDS["clip"], tokenizer, name="scorer in training")
    examples = world.shapes_split(split, n)
    images = renders(examples).permute(0, 3, 1, 2).float().div(255)
    captions = [c for _, c in examples]
    features = F.normalize(scorer.encode_images(images), dim=-1)
    r1 = recall_at_1(prompt_embeddings(scorer, captions)[None] @ features.T)
    true = scorer.score(images, captions)
    original, _ = error_margins(scorer, None, split, examples, images, true, swap_two_colours, random.Random(0))
    return {"heldout_r1": r1, "heldout_swap": 100.0 * (original > 0).float().mean().item()}
