"""The CLIP tokenizer gives OpenAI's ids, checked against two independent oracles.

1. A reference written here from OpenAI's published algorithm: ftfy + double HTML unescape + whitespace
   collapse + lowercase, the split regex run by the ``regex`` module, and the textbook BPE loop (merge the
   best-ranked pair everywhere, repeat). Its vocabulary is rebuilt here from the BPE file.
2. transformers' ``CLIPTokenizer`` loaded from the folder that ``save_pretrained`` writes. transformers 5 no
   longer applies ftfy or HTML unescaping (it only does NFC), so it is fed text cleaned by the reference.

One deliberate difference from OpenAI: a typed ``<|endoftext|>`` stays text (OpenAI's regex turns it into the
control token), so the reference pattern leaves those alternatives out and transformers is asked to split
special tokens.
"""
import gzip
import html
import json
import math
import time

import ftfy
import pytest
import regex
import torch
import transformers

from model.tokenizer import BUNDLED_BPE, CONTEXT_LENGTH, EOT, SOT, CLIPTokenizer, clean_text, load_tokenizer
from model.weights import WeightsError

CASES = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   \t\n ",
    "Café crème brûlée à la mode",
    "naïve façade, Ångström, Øresund, Straße",
    "e\u0301clair with a decomposed accent",
    "🙂 party 🎉🎉 family 👩‍👩‍👧 flag 🇯🇵",
    "東京タワーの夜景、桜の花",
    "中文句子：一只猫坐在垫子上。",
    "한국어 텍스트",
    "Привет, мир! Ελληνικά ΣΊΣΥΦΟΣ",
    "مرحبا بالعالم",
    "hindi: हिन्दी भाषा",
    "In 2024, 3.14159 and 1,000,000 people; ½ ² ٣",
    "it's, I'm, you're, we've, they'll, he'd, don't, IT'S LOUD",
    "rock'n'roll 'quoted' ''double''",
    "Tom &amp; Jerry &quot;quoted&quot; &#39;single&#39; &lt;tag&gt;",
    "fish &amp;amp; chips &amp;quot;x&amp;quot; &amp;#39;y&amp;#39;",
    "&amp;amp;amp; escaped three times",
    "<b>fish &amp;amp; chips</b> (a tag stops ftfy's own unescaping, so both passes matter)",
    "“Curly double” and ‘curly single’ quotes, it’s",
    "ﬁne ﬂowers ﬀ ﬃ",
    "tab\tseparated\t\tcolumns",
    "non\u00a0breaking\u00a0space and\u2003em space\u3000ideographic",
    "line one\nline two\r\n\nline three",
    "  leading and trailing   spaces  ",
    "mojibake: cafÃ© and â€œquotesâ€\x9d",
    "control\x00chars\x07here\x1c\x1f",
    "zero\u200bwidth\u200djoiner and soft\u00adhyphen",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３",
    "İstanbul",
    "snake_case-and-kebab/paths\\back @user #hashtag $100 50% a+b=c",
    "!!!???...;;; --- *** ~~~ <html>",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<|endoftext|> literal",
    "<|startoftext|>hello<|endoftext|>",
    "A very long prompt, with a red cube on the left and a blue sphere behind it. " * 8,
]
# Two cases where transformers itself departs from OpenAI. It re-applies NFC after our cleanup, which changes
# an entity that unescapes to a combining mark (OpenAI does not renormalise after html.unescape). Its split
# regex is not case-insensitive, so "it'ſ" (long s, which folds to s) loses OpenAI's contraction "'ſ".
REFERENCE_ONLY = ["e&#769;clair, entity for a combining accent", "it'ſ a long s"]


# ---------------------------------------------------------------- oracle 1: reference from OpenAI's algorithm

def reference_vocab():
    """Vocabulary and merge ranks rebuilt from the BPE file: byte symbols, with </w>, merges, control tokens."""
    printable = [b for b in range(256) if chr(b).isprintable() and not chr(b).isspace()]
    shifted = [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(shifted)}
    with gzip.open(BUNDLED_BPE, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
    base = [symbol[b] for b in printable + shifted]
    tokens = base + [s + "</w>" for s in base] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, {m: r for r, m in enumerate(merges)}, symbol


VOCAB, RANKS, BYTE_SYMBOL = reference_vocab()
REFERENCE_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def reference_clean(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def reference_bpe(word):
    """Textbook BPE on one piece: repeatedly merge every occurrence of the best-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: RANKS.get(pair, math.inf))
        if best not in RANKS:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def reference_encode(text):
    pieces = REFERENCE_SPLIT.findall(reference_clean(text))
    spelled = ["".join(BYTE_SYMBOL[b] for b in piece.encode("utf-8")) for piece in pieces]
    return [VOCAB[token] for word in spelled for token in reference_bpe(word)]


# ---------------------------------------------------------------- oracle 2: transformers

@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def saved_folder(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    tok.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def hf(saved_folder):
    return transformers.CLIPTokenizer.from_pretrained(saved_folder / "tokenizer")


def hf_encode(hf, text):
    return hf(reference_clean(text), add_special_tokens=False, split_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------- tests

def test_bundled_vocabulary_is_openais():
    tok = CLIPTokenizer()
    vocab, merges = tok.vocab, tok.merges
    assert vocab == VOCAB
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == SOT == 49406 and vocab["<|endoftext|>"] == EOT == 49407


def test_known_ids_from_openai_readme(tok):
    # OpenAI's CLIP README: clip.tokenize("a diagram") starts [49406, 320, 22697, 49407].
    assert tok(["a diagram"])[0, :4].tolist() == [49406, 320, 22697, 49407]


@pytest.mark.parametrize("text", CASES + REFERENCE_ONLY)
def test_encode_matches_reference(tok, text):
    assert tok.encode(text) == reference_encode(text)


@pytest.mark.parametrize("text", CASES)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf_encode(hf, text)


def test_cases_cover_what_the_cleanup_changes(tok):
    # The oracles agree with us; also check the cases really exercise the cleanup (otherwise they prove little).
    assert tok.encode("“hi” it’s") == tok.encode('"hi" it\'s')
    assert tok.encode("ﬁne") == tok.encode("fine")
    assert tok.encode("&amp;amp; &#39;") == tok.encode("& '")
    assert tok.encode("a\u00a0\t\n b") == tok.encode("a b")
    assert tok.encode("CAFÃ©") == tok.encode("café")
    assert clean_text("  Tom &amp;amp; “Jerry”\u3000") == 'tom & "jerry"'


@pytest.mark.parametrize("literal", ["<|endoftext|>", "<|startoftext|>"])
def test_typed_control_tokens_stay_text(tok, literal):
    ids = tok.encode(f"before {literal} after")
    assert SOT not in ids and EOT not in ids
    # Spelled as the ordinary pieces "<|", the word, "|>" (a space in the decoded text marks a piece end).
    assert tok.decode(ids) == "before " + literal.replace("<|", "<| ").replace("|>", " |>") + " after"
    row = tok(literal)[0].tolist()
    assert row[0] == SOT and row.index(EOT) == 1 + len(tok.encode(literal))


@pytest.mark.parametrize("pad", [EOT, 0])
def test_framing_padding_and_truncation(tok, pad):
    short = tok.encode("a red cube")
    row = tok("a red cube", pad_token_id=pad)[0].tolist()
    assert row == [SOT] + short + [EOT] + [pad] * (CONTEXT_LENGTH - len(short) - 2)

    for n in (74, 75, 76, 200):  # 75 content ids fill the 77 slots exactly
        text = " ".join(["cat"] * n)
        content = tok.encode(text)
        assert len(content) == n
        row = tok(text, pad_token_id=pad)[0].tolist()
        kept = min(n, CONTEXT_LENGTH - 2)
        assert row == [SOT] + content[:kept] + [EOT] + [pad] * (CONTEXT_LENGTH - 2 - kept)

    assert tok("", pad_token_id=pad)[0].tolist() == [SOT, EOT] + [pad] * (CONTEXT_LENGTH - 2)


def test_call_shapes_and_types(tok):
    batch = tok(["a", "b c", ""], context_length=10)
    assert batch.dtype == torch.long and batch.shape == (3, 10)
    assert torch.equal(tok("a"), tok(["a"])) and tok("a").shape == (1, CONTEXT_LENGTH)
    assert tok([]).shape == (0, CONTEXT_LENGTH)
    assert tok(["a photo"], context_length=2)[0].tolist() == [SOT, EOT]


@pytest.mark.parametrize("bad_call", [
    lambda t: t(["ok", 3]),
    lambda t: t(None),
    lambda t: t("x", context_length=1),
    lambda t: t.encode(b"bytes"),
    lambda t: t.decode([49408]),
])
def test_bad_input_is_a_clear_error(tok, bad_call):
    with pytest.raises(ValueError):
        bad_call(tok)


@pytest.mark.parametrize("text", CASES)
def test_framed_batch_matches_transformers(tok, hf, text):
    expected = hf(reference_clean(text), padding="max_length", truncation=True, max_length=CONTEXT_LENGTH,
                  split_special_tokens=True)["input_ids"]
    assert tok(text)[0].tolist() == expected


def test_saved_folder_is_a_sd15_tokenizer_folder(hf, saved_folder):
    assert hf.model_max_length == CONTEXT_LENGTH
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (SOT, EOT, EOT)
    assert hf.get_vocab() == VOCAB
    merges = (saved_folder / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894


@pytest.mark.parametrize("where", ["root", "tokenizer"])
def test_from_pretrained_round_trip(tok, saved_folder, where):
    loaded = CLIPTokenizer.from_pretrained(saved_folder if where == "root" else saved_folder / "tokenizer")
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    for text in CASES:
        assert loaded.encode(text) == tok.encode(text)


def test_from_pretrained_reads_a_transformers5_tokenizer_json(tok, hf, tmp_path):
    """transformers 5 re-saves a CLIP tokenizer as tokenizer.json only; its vocab and merges must load."""
    hf.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    for text in CASES:
        assert loaded.encode(text) == tok.encode(text)


def test_from_pretrained_errors(tok, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="expected vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)

    tok.save_pretrained(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(WeightsError, match="expected vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)

    (tmp_path / "merges.txt").write_text("#version: 0.2\nzzqq xxyy\n", encoding="utf-8")
    with pytest.raises(WeightsError, match="do not fit together"):
        CLIPTokenizer.from_pretrained(tmp_path)

    (tmp_path / "merges.txt").write_text("#version: 0.2\nthree parts here\n", encoding="utf-8")
    with pytest.raises(WeightsError, match="two symbols"):
        CLIPTokenizer.from_pretrained(tmp_path)

    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WeightsError, match="not valid JSON"):
        CLIPTokenizer.from_pretrained(tmp_path)

    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(WeightsError, match="not a CLIP vocabulary"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_load_tokenizer_reads_the_pipeline_folder_else_bundles(tok, tmp_path):
    bytes_only = {token: i for token, i in tok.vocab.items() if i < 512}  # the byte symbols, no merges
    bytes_only.update({"<|startoftext|>": SOT, "<|endoftext|>": EOT})
    CLIPTokenizer(bytes_only, ()).save_pretrained(tmp_path / "pipe" / "tokenizer")
    assert load_tokenizer(tmp_path / "pipe").merges == ()
    assert len(load_tokenizer(tmp_path / "pipe").encode("cat")) == 3
    for weights in (tmp_path, tmp_path / "v1-5-pruned-emaonly.safetensors"):  # no tokenizer/: the bundled one
        assert load_tokenizer(weights).encode("cat") == tok.encode("cat") and len(tok.encode("cat")) == 1


def test_load_tokenizer_error_names_a_fix_that_works(tok, tmp_path):
    """A pipeline folder whose tokenizer/ holds no CLIP tokenizer (here a sentencepiece one). The error must not
    send the user to the tokenizer/ subfolder (loading from there looks for tokenizer/tokenizer/); its one fix,
    SD-1.5's tokenizer files in that folder, must then work."""
    folder = tmp_path / "pipe" / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(WeightsError) as error:
        load_tokenizer(tmp_path / "pipe")
    message = str(error.value)
    assert "\n" not in message and "subfolder" not in message and "CLIPTokenizer()" not in message
    assert f"{folder} holds no CLIP tokenizer" in message and "copy those files from SD-1.5's tokenizer/" in message
    tok.save_pretrained(folder)
    assert load_tokenizer(tmp_path / "pipe").encode("a red cube") == tok.encode("a red cube")


@pytest.mark.parametrize("text", CASES)
def test_decode(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.encode(tok.decode(ids)) == ids


def test_decode_of_a_cut_multibyte_character_is_replaced(tok):
    ids = tok.encode("𓀀")  # a hieroglyph with no merges: one token per UTF-8 byte
    assert len(ids) == 4
    assert tok.decode(ids[:1]) == "\ufffd"


def test_long_prompt_is_fast(tok):
    prompt = ("A quiet harbour at dawn, fishing boats with “red” sails, gulls over the water, "
              "and an old lighthouse on the rocks; mist rolls in from the sea. ") * 9
    assert 250 <= len(tok.encode(prompt)) <= 400
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        tok.encode(prompt)
        timings.append(time.perf_counter() - start)
    # About 2-3 ms on a shared 2-core CPU, nearly all of it in ftfy; the bound leaves room for a busy machine.
    assert sorted(timings)[len(timings) // 2] < 0.025
