"""LongAlign §3: segment-level encoding of prompts longer than CLIP's 77 tokens.

CLIP's text encoder sees at most 77 tokens, so SD-1.5 silently drops everything after the first 75
tokens of a prompt. LongAlign splits the prompt into sentences, encodes every sentence on its own, and
concatenates the encodings into one longer context for the UNet's cross-attention:

    "A red fox sits. It is snowing!"   ->   segments "A red fox sits."  and  "It is snowing!"

    segment 1:  [sot] a red fox sits .  [eot] [pad] ... [pad]     (77 tokens, encoded on its own)
    segment 2:  [sot] it is snowing !   [eot] [pad] ... [pad]     (77 tokens, same batched forward)
                  |   |__ content __|     \______ dropped _____/
                  kept

    context:    [sot] a red fox sits . [sot] it is snowing ! <pad*> <pad*> ... <pad*>   (max_tokens rows)

Because CLIP is causal, every kept <sot> row is the same vector: it works as a separator. For the same
reason the dropped rows after a kept run cannot change it, so the encoder runs only as far as the longest
kept run of the batch (about 32 of the 77 positions for sentences of ~25 tokens). <pad*> is one
fixed vector, the mean of rows 17..76 of the empty prompt's encoding. The empty prompt gives
[sot] + <pad*>..., which is the unconditional context for classifier-free guidance, so the conditional and
unconditional contexts always have the same length.

The gather/truncate/pad step is ``model.kernels.concat_segments`` (a Triton kernel on CUDA, its PyTorch
twin elsewhere). Other strategies are here for the comparisons in the paper's Figure 10 and for what users
know from other tools (the 75-token chunking of AUTOMATIC1111's web UI and compel); see :data:`STRATEGIES`.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from model.clip import trimmed_length
from model.kernels import concat_segments
from model.tokenizer import CONTEXT_LENGTH, frame

SEGMENT_TOKENS = CONTEXT_LENGTH - 2  # content tokens per 77-token block, between <sot> and <eot>
PAD_STAR_ROWS = slice(17, CONTEXT_LENGTH)  # the last 60 rows of the empty prompt give <pad*>

STRATEGIES = {
    "segment": "the paper's: per sentence keep <sot> + content, drop <eot>/<pad>; max_tokens rows, <pad*> fill",
    "no-sot": "like segment but keep only the content tokens (no separators)",
    "keep-all": "per sentence keep the whole 77-token block (naive concatenation); max_tokens rows",
    "chunk75": "A1111/compel: 75-token chunks of the whole prompt, each [sot]+75+[eot], 77*(max_tokens//77) rows",
    "truncate": "plain SD-1.5: the first 75 tokens, 77 rows",
}
RENAMED = {"concat": "segment"}  # earlier names of a strategy -> its name now


class DroppedTokensWarning(UserWarning):
    """Some prompt tokens did not fit the context and were left out; silence it by category, not by text."""


# ---------------------------------------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------------------------------------

_CLOSERS = re.escape("\"')]}»”’」』）")
# A sentence end is a run of terminators plus any closing quotes/brackets. Latin-style ends only count when
# whitespace or the end of the line follows, which keeps decimals (3.5), file names and URLs whole.
# CJK ends (。！？；) count anywhere, since those scripts put no space after them.
_SENTENCE_END = re.compile(rf"(?P<wide>[。！？；｡]+)[{_CLOSERS}]*"
                           rf"|(?P<latin>[.!?;…؟।]+)[{_CLOSERS}]*(?=\s|$)")
_NEVER_END = {"e.g", "i.e", "dr", "mr", "mrs", "ms", "st", "vs", "prof", "mt", "jr", "sr", "fig", "approx", "cf"}
_END_BEFORE_CAPITAL = {"etc"}  # "apples, pears, etc. The room ..." ends; "etc. and more" does not
_WORD_BEFORE = re.compile(r"[\w.]*$")
_NEXT_LETTER = re.compile(r"\s*[\"'“‘(\[]*(\S)")


def _next_starts_capital(rest: str) -> bool:
    """True when the text after a possible sentence end starts with a capital letter, or is empty."""
    match = _NEXT_LETTER.match(rest)
    return match is None or match.group(1).isupper()


def _ends_sentence(line: str, match: re.Match) -> bool:
    """Decide whether a Latin-style terminator run really ends a sentence."""
    run = match.group("latin")
    if any(mark in run for mark in "!?;؟।"):
        return True
    rest = line[match.end():]
    if run.count(".") > 1 or "…" in run:  # an ellipsis ends a sentence only before a capital
        return _next_starts_capital(rest)
    word = _WORD_BEFORE.search(line, 0, match.start()).group().lower()
    if word in _NEVER_END:
        return False
    if word in _END_BEFORE_CAPITAL:
        return _next_starts_capital(rest)
    return True


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences: LongAlign's segments (paper §3).

    Splits after ``.``, ``!``, ``?``, ``;`` (and ``。！？；``) and at line breaks. Does not split inside decimals,
    URLs or file names (a Latin ``.`` must be followed by whitespace), after abbreviations such as "e.g.",
    "Dr." or "vs.", or at an ellipsis that is not followed by a capital letter. Pieces are stripped and
    empty pieces dropped; otherwise no character is lost, so joining the pieces gives ``text`` back up to
    whitespace. The official code split on ``.`` and ``?`` only, breaking decimals and ignoring ``!``/``;``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}.")
    sentences = []
    for line in text.splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            if match.group("wide") or _ends_sentence(line, match):
                sentences.append(line[start:match.end()])
                start = match.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if s.strip()]


def sentence_segments(tokenizer, text: str, merge_short: bool = False) -> list[list[int]]:
    """The content token ids of each segment of ``text``, at most 75 per segment.

    One sentence is one segment. A sentence longer than 75 tokens is cut at token boundaries into several
    segments, never dropped. With ``merge_short`` consecutive segments are merged greedily while the result
    still fits in 75 tokens (the official code does not merge, so it is off by default). The empty prompt
    is a single empty segment, so it still yields the <sot> row.
    """
    segments = []
    for sentence in split_sentences(text):
        ids = tokenizer.encode(sentence)
        segments += [ids[i:i + SEGMENT_TOKENS] for i in range(0, len(ids), SEGMENT_TOKENS)]
    if merge_short:
        merged = []
        for ids in segments:
            if merged and len(merged[-1]) + len(ids) <= SEGMENT_TOKENS:
                merged[-1] = merged[-1] + ids
            else:
                merged.append(ids)
        segments = merged
    return segments or [[]]


# ---------------------------------------------------------------------------------------------------------
# Planning: which 77-token blocks to encode and which rows of each to keep
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptPlan:
    """How one prompt becomes its context rows.

    ``blocks`` are the 77-id rows of the text encoder's input (it sees their first :func:`encoded_length`
    ids); from block i the context keeps encoder rows
    ``kept[i] = (start, length)``. ``segments`` counts the text segments (or chunks) that reached the
    context; ``tokens_used``/``tokens_dropped`` count the prompt's content tokens that did/did not fit.
    """
    blocks: list[list[int]] = field(repr=False)
    kept: list[tuple[int, int]]
    segments: int
    tokens_used: int
    tokens_dropped: int


def _content_rows(start: int, taken: int, n_content: int) -> int:
    """How many content rows (block rows 1..n_content) lie in the taken rows [start, start + taken)."""
    return max(0, min(start + taken, 1 + n_content) - max(start, 1))


def _kept_run(strategy: str, n_content: int) -> tuple[int, int]:
    """(start, length) of the rows a sentence strategy keeps from a block ``[sot] + content + [eot] + pads``."""
    if strategy == "segment":
        return 0, 1 + n_content
    if strategy == "no-sot":
        return 1, n_content
    return 0, CONTEXT_LENGTH  # keep-all


def plan_sentences(segments: list[list[int]], strategy: str, max_tokens: int) -> PromptPlan:
    """Plan for the sentence strategies (segment, no-sot, keep-all): runs in order, cut at ``max_tokens``.

    A segment whose run would start at or after ``max_tokens`` is not encoded at all.
    """
    blocks, kept, used, total = [], [], 0, 0
    for ids in segments:
        start, length = _kept_run(strategy, len(ids))
        taken = max(0, min(length, max_tokens - total))
        if total < max_tokens:
            blocks.append(frame(ids))
            kept.append((start, length))
        used += _content_rows(start, taken, len(ids))
        total += length
    n_content = sum(len(ids) for ids in segments)
    n_segments = sum(1 for ids in segments[:len(blocks)] if ids)
    return PromptPlan(blocks, kept, n_segments, used, n_content - used)


def plan_chunks(ids: list[int], n_chunks: int) -> PromptPlan:
    """Plan for chunk75/truncate: ``n_chunks`` whole blocks of 75 consecutive content tokens each.

    A prompt with fewer chunks is extended with empty-prompt blocks, as A1111 does for the negative prompt,
    so every prompt gets exactly ``77 * n_chunks`` rows; tokens beyond ``75 * n_chunks`` are dropped.
    """
    chunks = [ids[i:i + SEGMENT_TOKENS] for i in range(0, len(ids), SEGMENT_TOKENS)][:n_chunks]
    used = sum(len(chunk) for chunk in chunks)
    blocks = [frame(chunk) for chunk in chunks + [[]] * (n_chunks - len(chunks))]
    return PromptPlan(blocks, [(0, CONTEXT_LENGTH)] * n_chunks, len(chunks), used, len(ids) - used)


def encoded_length(kept: list[tuple[int, int]]) -> int:
    """How many leading positions of the blocks the text encoder must see to give every kept row.

    CLIP's text encoder is causal: a row depends on the tokens at or before it only, so the rows after the
    longest kept run in the batch cannot change a kept row. Under segment and no-sot a sentence keeps about
    25 of its block's 77 rows, so about a third of the positions are encoded; keep-all, chunk75 and
    truncate keep whole blocks (77). The length is rounded up to a multiple of 16 by
    ``model.clip.trimmed_length``.
    """
    return trimmed_length(max(start + length for start, length in kept), CONTEXT_LENGTH)


# ---------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------

def check_strategy(strategy: str) -> None:
    """Raise a one-line ValueError for a name that is not in :data:`STRATEGIES`, naming the right one."""
    if strategy in RENAMED:
        raise ValueError(f"the strategy {strategy!r} is now called {RENAMED[strategy]!r}; "
                         f"pass {RENAMED[strategy]!r} instead.")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}.")


class LongPromptEncoder:
    """Prompts of any length -> cross-attention contexts ``[B, context_length, D]`` (LongAlign §3).

    ``tokenizer`` is a ``model.tokenizer.CLIPTokenizer``; ``text_encoder`` maps ids ``[N, 77]`` to
    ``last_hidden_state [N, 77, D]`` (``model.clip.CLIPTextModel``). The output has the text encoder's dtype
    and device. ``strategy`` is one of :data:`STRATEGIES`; ``merge_short`` merges short sentences into
    segments of up to 75 tokens. Gradients flow through the text encoder if the caller enables them.

    <pad*> is computed on first use and cached: build the encoder after loading the text encoder's weights.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_tokens: int = 240,
                 strategy: str = "segment", merge_short: bool = False):
        check_strategy(strategy)
        min_tokens = CONTEXT_LENGTH if strategy == "chunk75" else 1
        if not isinstance(max_tokens, int) or max_tokens < min_tokens:
            raise ValueError(f"max_tokens must be an int >= {min_tokens} for strategy {strategy!r}, "
                             f"got {max_tokens!r}.")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.max_tokens, self.strategy, self.merge_short = max_tokens, strategy, merge_short
        self._pad_star = None

    @property
    def context_length(self) -> int:
        """Rows of every context this encoder returns; the same for any prompt, so CFG pairs always match."""
        if self.strategy == "truncate":
            return CONTEXT_LENGTH
        if self.strategy == "chunk75":
            return CONTEXT_LENGTH * (self.max_tokens // CONTEXT_LENGTH)
        return self.max_tokens

    def plan(self, prompt: str) -> PromptPlan:
        """Which blocks to encode for ``prompt`` and which rows to keep; ``.segments``/``.tokens_used`` report."""
        if self.strategy in ("truncate", "chunk75"):
            return plan_chunks(self.tokenizer.encode(prompt), self.context_length // CONTEXT_LENGTH)
        segments = sentence_segments(self.tokenizer, prompt, self.merge_short)
        return plan_sentences(segments, self.strategy, self.max_tokens)

    def pad_star(self) -> torch.Tensor:
        """<pad*> [D]: the mean of rows 17..76 of the empty prompt's encoding (paper §3), cached."""
        weight = next(self.text_encoder.parameters())
        if self._pad_star is None:
            with torch.no_grad():
                empty = self.text_encoder(torch.tensor([frame([])], device=weight.device))  # [1, 77, D]
            self._pad_star = empty[0, PAD_STAR_ROWS].float().mean(0)
        return self._pad_star.to(device=weight.device, dtype=weight.dtype)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Contexts ``[B, context_length, D]`` for ``prompts``; all segments go through ONE encoder forward.

        The forward sees only the leading positions that a kept row can depend on (see
        :func:`encoded_length`); the contexts are those of encoding every block at all 77 positions.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of str (use \"\" for the unconditional context).")
        plans = [self.plan(prompt) for prompt in prompts]
        self._warn_if_dropped(plans)
        device = next(self.text_encoder.parameters()).device
        runs = [run for plan in plans for run in plan.kept]
        length = encoded_length(runs)
        ids = torch.tensor([block[:length] for plan in plans for block in plan.blocks], device=device)  # [S, length]
        hidden = self.text_encoder(ids)  # [S, length, D]
        kept = torch.tensor(runs, device=device)  # [S, 2]
        counts = torch.tensor([len(plan.blocks) for plan in plans], device=device)
        return concat_segments(hidden, kept[:, 0], kept[:, 1], counts, self.pad_star(), self.context_length)

    def _warn_if_dropped(self, plans: list[PromptPlan]) -> None:
        """One warning per call naming every prompt whose tokens did not all fit."""
        dropped = [f"prompt {i}: {plan.tokens_dropped} of {plan.tokens_used + plan.tokens_dropped}"
                   for i, plan in enumerate(plans) if plan.tokens_dropped]
        if dropped:
            fix = "use a longer strategy" if self.strategy == "truncate" else "raise max_tokens"
            warnings.warn(f"{self.strategy} encoding into {self.context_length} context rows dropped the prompt "
                          f"tokens that did not fit ({'; '.join(dropped)}); {fix} to keep them.",
                          DroppedTokensWarning, stacklevel=3)
