"""The CLIP byte-pair-encoding tokenizer, giving exactly the ids of OpenAI's CLIP tokenizer.

Every text passes through four stages:
1. cleanup in Python, as OpenAI does it: ftfy's ``fix_text``, ``html.unescape`` twice, whitespace collapsed
   and stripped, then lowercase;
2. a split into pieces by CLIP's regex: contractions, runs of letters, single digits, runs of other symbols;
3. each piece's UTF-8 bytes are spelled with a printable 256-symbol alphabet (GPT-2's ``bytes_to_unicode``);
4. byte-pair merges, where the last symbol of a piece carries the end-of-word mark ``</w>``.

Stages 2-4 run inside the Rust ``tokenizers`` library, so a long prompt takes about a millisecond.

The vocabulary has 49,408 entries: 256 byte symbols, the same symbols with ``</w>``, one entry per merge
(48,894), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). It is built from OpenAI's public BPE
file, bundled in ``model/assets`` (MIT, see LICENSE), or read from an SD-1.5 ``tokenizer/`` folder.

Unlike OpenAI's tokenizer, a literal ``<|endoftext|>`` typed in a prompt stays ordinary text: the control ids
are only ever added by :func:`frame`.
"""
from __future__ import annotations

import gzip
import html
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import BPE

from model.convert import WeightsError

SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>; SD-1.5 also pads with it
CONTEXT_LENGTH = 77

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_MERGES = 48_894  # 49408 ids - 2 * 256 byte symbols - 2 control tokens
BUNDLED_BPE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenizer (OpenAI's ``simple_tokenizer.py``). OpenAI compiles it case-insensitively; that
# matters even after lowercasing, because the long s in "it'ſ" folds to "s" and joins the contraction "'s".
# Only the contractions get the flag here: in this regex engine a case-insensitive [\p{L}] would also take
# U+0345 (which folds to a Greek iota), and OpenAI's does not.
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"

# Unicode White_Space, which is what OpenAI's regex-module ``\s`` matches. Python's ``\s`` also matches the
# separators \x1c-\x1f, which are not White_Space, so they are excluded here.
WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> symbol alphabet shared by GPT-2 and CLIP, in CLIP's vocabulary order.

    Printable bytes stand for themselves. The other 68 bytes (controls, space, DEL, NBSP, soft hyphen) get the
    symbols from U+0100 upward, in byte order. The dict's insertion order is the order of the first 256
    vocabulary ids: the printable bytes first, then the rest.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + n) for n, b in enumerate(others)})
    return alphabet


def clean_text(text: str) -> str:
    """OpenAI's cleanup before BPE: fix mojibake and typography, unescape HTML twice, collapse spaces, lowercase.

    ftfy turns curly quotes into straight ones and the ligature "ﬁ" into "fi"; the second unescape handles
    double-escaped entities such as ``&amp;amp;``.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return WHITESPACE_RUN.sub(" ", text).strip().lower()


def frame(ids: list[int], context_length: int = CONTEXT_LENGTH, pad_token_id: int = EOT) -> list[int]:
    """``[SOT] + ids + [EOT]``, cut so that EOT keeps the last slot, then padded to ``context_length``.

    SD-1.5 pads with EOT (49407); OpenAI CLIP, open_clip and HPSv2 pad with 0.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (room for SOT and EOT); got {context_length}")
    row = [SOT, *ids[: context_length - 2], EOT]
    return row + [pad_token_id] * (context_length - len(row))


@lru_cache(maxsize=1)
def bundled_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The vocabulary and merges built from OpenAI's BPE file (read once per process).

    The file has a header line, then merge rules best-first; CLIP uses the first 48,894 of them.
    """
    with gzip.open(BUNDLED_BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1: 1 + NUM_MERGES]
    merges = tuple(tuple(line.split()) for line in lines)
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges), SOT_TEXT, EOT_TEXT]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_backend(vocab: dict[str, int], merges: tuple[tuple[str, str], ...]) -> Tokenizer:
    """A ``tokenizers`` pipeline for stages 2-4: regex split, byte alphabet, BPE with ``</w>``.

    No normalizer (the cleanup is done in Python, exactly as OpenAI does it) and no added special tokens
    (so control-token text in a prompt is never matched).
    """
    backend = Tokenizer(BPE(vocab=vocab, merges=list(merges), end_of_word_suffix=END_OF_WORD,
                            continuing_subword_prefix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),  # keep matches only
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return backend


@lru_cache(maxsize=1)
def bundled_backend() -> Tokenizer:
    return build_backend(*bundled_vocab_and_merges())


class CLIPTokenizer:
    """CLIP's BPE tokenizer. ``CLIPTokenizer()`` uses the bundled vocabulary; no weights are needed."""

    def __init__(self, vocab: dict[str, int] | None = None, merges: tuple[tuple[str, str], ...] | None = None):
        if (vocab is None) != (merges is None):
            raise ValueError("pass both vocab and merges, or neither (to use the bundled CLIP vocabulary)")
        if vocab is None:
            vocab, merges = bundled_vocab_and_merges()
            self._backend = bundled_backend()
        else:
            merges = tuple(tuple(m) for m in merges)
            self._backend = build_backend(vocab, merges)
        self.vocab, self.merges = vocab, merges
        self._id_to_token = {i: token for token, i in vocab.items()}
        self._byte_of_symbol = {symbol: b for b, symbol in bytes_to_unicode().items()}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Load ``vocab.json`` + ``merges.txt`` from a tokenizer folder or an SD-1.5 folder holding ``tokenizer/``."""
        path = Path(path)
        if not path.is_dir():
            raise WeightsError(f"tokenizer folder not found: {path}. Pass an SD-1.5 folder or its tokenizer/ "
                               "subfolder (they hold vocab.json and merges.txt).")
        folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        tokenizer = _read_folder(cls, folder)
        if tokenizer is None:
            raise WeightsError(f"no CLIP tokenizer in {folder}: expected vocab.json and merges.txt (or "
                               "tokenizer.json). Pass an SD-1.5 folder or its tokenizer/ subfolder, or use "
                               "CLIPTokenizer() for the bundled vocab.")
        return tokenizer

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the files of an SD-1.5 ``tokenizer/`` folder; transformers' CLIPTokenizer can load them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merge_lines = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
        special = {"bos_token": SOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "do_lower_case": True,
                  "errors": "replace", **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """The content ids of ``text``: no SOT or EOT, no length limit."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str; got {type(text).__name__}")
        return self._backend.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH,
                 pad_token_id: int = EOT) -> torch.Tensor:
        """Token ids ``[B, context_length]`` (int64), each row framed and padded by :func:`frame`."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a str or a list of str; got {type(texts).__name__}")
        rows = [frame(self.encode(text), context_length, pad_token_id) for text in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), context_length)

    def decode(self, ids: list[int]) -> str:
        """Text for ``ids``: every ``</w>`` becomes a space; bytes that are not valid UTF-8 become U+FFFD.

        The text comes out cleaned (lowercase, single spaces), and control ids come out as their text.
        """
        unknown = [i for i in ids if i not in self._id_to_token]
        if unknown:
            raise ValueError(f"ids outside the vocabulary (0..{self.vocab_size - 1}): {unknown[:8]}")
        data = bytearray(self._byte_of_symbol[c] for i in ids for c in self._id_to_token[i])
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


def load_tokenizer(weights: str | os.PathLike) -> CLIPTokenizer:
    """The tokenizer that goes with ``weights``: the ``tokenizer/`` folder of a pipeline folder when there is
    one, else the bundled CLIP vocabulary (SD-1.5's own, which a single-file checkpoint does not carry)."""
    folder = Path(weights) / "tokenizer"
    if not folder.is_dir():
        return CLIPTokenizer()
    tokenizer = _read_folder(CLIPTokenizer, folder)
    if tokenizer is None:  # a pipeline of another kind (a T5 or sentencepiece tokenizer), or a partial download
        raise WeightsError(f"{folder} holds no CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json), so "
                           f"{weights} is not a complete SD-1.5 pipeline folder: copy those files from SD-1.5's "
                           "tokenizer/ folder into it.")
    return tokenizer


def _read_folder(cls, folder: Path) -> CLIPTokenizer | None:
    """The tokenizer in ``folder`` (vocab.json + merges.txt, or tokenizer.json), or None when it has neither."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _check_vocab(_read_json(folder / "vocab.json"), folder / "vocab.json")
        merges = _parse_merges((folder / "merges.txt").read_text(encoding="utf-8").splitlines(), folder / "merges.txt")
    elif (folder / "tokenizer.json").is_file():  # what transformers 5 writes instead of the two files
        vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
    else:
        return None
    try:
        return cls(vocab, merges)
    except Exception as err:  # the Rust library reports a merge whose parts are not in the vocabulary
        raise WeightsError(f"{folder}: vocab.json and merges.txt do not fit together ({err}).") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON ({err}).") from None


def _check_vocab(vocab, source: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or vocab.get(SOT_TEXT) != SOT or vocab.get(EOT_TEXT) != EOT:
        raise WeightsError(f"{source} is not a CLIP vocabulary: it must map {SOT_TEXT} to {SOT} and {EOT_TEXT} "
                           f"to {EOT}.")
    symbols = list(bytes_to_unicode().values())
    lacking = [s for s in (*symbols, *(s + END_OF_WORD for s in symbols)) if s not in vocab]
    if lacking:
        raise WeightsError(f"{source} is not a byte-level CLIP vocabulary: it lacks {len(lacking)} of the 512 "
                           f"byte symbols, e.g. {lacking[:4]}.")
    return vocab


def _parse_merges(lines: list, source: Path) -> tuple[tuple[str, str], ...]:
    """Merges given as "a b" lines (merges.txt, old tokenizer.json) or [a, b] pairs (newer tokenizer.json)."""
    if lines and isinstance(lines[0], str) and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = tuple(tuple(line.split()) if isinstance(line, str) else tuple(line) for line in lines
                   if not isinstance(line, str) or line.strip())
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise WeightsError(f"{source}: every merge must hold two symbols; found {' '.join(bad)!r}")
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The BPE vocab and merges inside a `tokenizers` file; the cleanup and splitting stay ours (OpenAI's)."""
    bpe = _read_json(path).get("model", {})
    if bpe.get("type") != "BPE" or "vocab" not in bpe or "merges" not in bpe:
        raise WeightsError(f"{path} does not hold a BPE model with a vocab and merges.")
    vocab = dict(bpe["vocab"])
    # the vocab inside tokenizer.json may leave out the added special tokens; they have fixed ids in CLIP
    vocab.setdefault(SOT_TEXT, SOT)
    vocab.setdefault(EOT_TEXT, EOT)
    return _check_vocab(vocab, path), _parse_merges(bpe["merges"], path)
