"""LongAlign §3: sentence splitting, segment planning and the long-prompt encoder (tiny random CLIP)."""
import re
import warnings

import pytest
import torch

from model import kernels
from model.clip import CONFIGS, CLIPTextModel
from model.longtext import (STRATEGIES, DroppedTokensWarning, LongPromptEncoder, check_strategy, encoded_length,
                            sentence_segments, split_sentences)
from model.tokenizer import EOT, SOT, CLIPTokenizer

# 10 sentences, 221 content tokens: with the 10 <sot> separators it fills 231 of the 240 rows.
LONG_PROMPT = (
    "A weathered lighthouse stands on a rocky cliff above a stormy grey sea, its white paint peeling in long "
    "strips. Waves crash against the black rocks below and throw white spray high into the cold evening air. "
    "A narrow dirt path winds up the hill toward the lighthouse, lined with tall yellow grass bent by the wind. "
    "Near the door, an old wooden bench holds a red lantern, a coil of frayed rope, a tin bucket and a pair of "
    "muddy boots. The lamp at the top glows a warm orange, casting a long beam across the darkening clouds. "
    "Three seagulls hover in the strong wind above the cliff, their wings spread wide against the purple sky. "
    "In the distance, a small fishing boat with a blue hull and a single mast fights its way toward the "
    "harbour. Rain begins to fall in thin silver lines, blurring the horizon where the sea meets the sky. "
    "A black and white dog sits by the bench, watching the boat with its ears pricked up. The whole scene is "
    "painted in thick oil brushstrokes, with dramatic light and deep shadows in the style of a romantic "
    "seascape.")
OVERFLOW_PROMPT = LONG_PROMPT + " A second lighthouse glows far away on the next headland. It blinks twice."


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return CLIPTextModel(CONFIGS["test"].text).eval()


def no_space(text):
    return re.sub(r"\s+", "", text)


# ---------------------------------------------------------------------------------------------------------
# split_sentences
# ---------------------------------------------------------------------------------------------------------

SPLITS = {
    "decimals": ("The pole is 3.5 m tall and costs 12.99 dollars. It is red.",
                 ["The pole is 3.5 m tall and costs 12.99 dollars.", "It is red."]),
    "abbreviations": ("Tools, e.g. a saw, i.e. sharp. Dr. Who met Mr. and Mrs. Smith on St. James vs. Mt. Fuji.",
                      ["Tools, e.g. a saw, i.e. sharp.", "Dr. Who met Mr. and Mrs. Smith on St. James vs. Mt. Fuji."]),
    "etc. ends only before a capital": ("Cups, plates, etc. The table is wood. Forks etc. and knives.",
                                        ["Cups, plates, etc.", "The table is wood.", "Forks etc. and knives."]),
    "exclamation, question, semicolon": ("What a view! Is it real? It is; truly.",
                                         ["What a view!", "Is it real?", "It is;", "truly."]),
    "repeated marks and quotes": ('Really?! She said "stop." Then (quietly.) left.',
                                  ["Really?!", 'She said "stop."', "Then (quietly.)", "left."]),
    "newlines": ("first line\nsecond line\r\n\n  third line  ",
                 ["first line", "second line", "third line"]),
    "ellipses": ("He waited... and waited… Then a bell rang. The end...",
                 ["He waited... and waited…", "Then a bell rang.", "The end..."]),
    "urls and file names": ("Visit https://example.com/a.html?x=1;y=2 today. Open notes.txt now. Or www.x.org.",
                            ["Visit https://example.com/a.html?x=1;y=2 today.", "Open notes.txt now.",
                             "Or www.x.org."]),
    "no punctuation": ("a cat on a mat under a warm lamp", ["a cat on a mat under a warm lamp"]),
    "whitespace only": ("  \n\t \r\n ", []),
    "empty": ("", []),
    "chinese": ("一只猫坐在窗边。外面在下雨！它冷吗？价格是3.5元", ["一只猫坐在窗边。", "外面在下雨！", "它冷吗？", "价格是3.5元"]),
    "japanese quotes": ("彼は「こんにちは。」と言った。猫が寝ている。", ["彼は「こんにちは。」", "と言った。", "猫が寝ている。"]),
    "cyrillic": ("Кот спит на диване. Он видит сон!", ["Кот спит на диване.", "Он видит сон!"]),
    "devanagari": ("यह एक बिल्ली है। वह सो रही है।", ["यह एक बिल्ली है।", "वह सो रही है।"]),
}


@pytest.mark.parametrize("name", SPLITS)
def test_split_sentences(name):
    text, expected = SPLITS[name]
    assert split_sentences(text) == expected


@pytest.mark.parametrize("text", [text for text, _ in SPLITS.values()] + [LONG_PROMPT])
def test_split_loses_no_content(text):
    pieces = split_sentences(text)
    assert no_space("".join(pieces)) == no_space(text)
    assert all(piece == piece.strip() and piece for piece in pieces)


def test_split_rejects_non_text():
    with pytest.raises(ValueError, match="must be a str"):
        split_sentences(None)


# ---------------------------------------------------------------------------------------------------------
# segments
# ---------------------------------------------------------------------------------------------------------

def test_run_on_sentence_is_cut_at_token_boundaries_not_dropped(tokenizer):
    text = "a cat " * 150  # one 300-token sentence, no punctuation
    ids = tokenizer.encode(text)
    assert len(ids) == 300 and split_sentences(text) == [text.strip()]
    segments = sentence_segments(tokenizer, text)
    assert [len(s) for s in segments] == [75, 75, 75, 75]
    assert sum(segments, []) == ids


def test_merge_short_packs_sentences_up_to_75_tokens(tokenizer):
    plain = sentence_segments(tokenizer, LONG_PROMPT)
    merged = sentence_segments(tokenizer, LONG_PROMPT, merge_short=True)
    assert len(plain) == 10 and len(merged) < len(plain)
    assert sum(merged, []) == sum(plain, [])
    assert all(len(s) <= 75 for s in merged)
    # greedy: no two neighbours would have fitted together
    assert all(len(a) + len(b) > 75 for a, b in zip(merged, merged[1:]))


def test_empty_prompt_is_one_empty_segment(tokenizer):
    assert sentence_segments(tokenizer, "") == [[]]
    assert sentence_segments(tokenizer, " \n ") == [[]]


# ---------------------------------------------------------------------------------------------------------
# the encoder against the paper's rule, built by hand
# ---------------------------------------------------------------------------------------------------------

def segment_by_hand(tokenizer, text_encoder, prompts, max_tokens=240):
    """The paper's §3 rule with plain lists: per sentence keep <sot> + content rows, drop <eot>/<pad>, concatenate,
    truncate, pad with <pad*> = mean of rows 17..76 of the empty prompt. Returns (contexts, content rows kept)."""
    sentences = [[tokenizer.encode(s) for s in split_sentences(p)] or [[]] for p in prompts]
    blocks = [[SOT] + ids + [EOT] * (76 - len(ids)) for prompt in sentences for ids in prompt]
    with torch.no_grad():
        hidden = text_encoder(torch.tensor(blocks))  # one forward over every segment, like the encoder
        empty = text_encoder(torch.tensor([[SOT] + [EOT] * 76]))[0]
    pad_star = empty[17:77].mean(0)
    contexts, content_kept, block = [], [], 0
    for prompt in sentences:
        rows, is_content = [], []
        for ids in prompt:
            rows.append(hidden[block][0])
            is_content.append(False)
            for position in range(1, 1 + len(ids)):
                rows.append(hidden[block][position])
                is_content.append(True)
            block += 1
        rows, is_content = rows[:max_tokens], is_content[:max_tokens]
        rows += [pad_star] * (max_tokens - len(rows))
        contexts.append(torch.stack(rows))
        content_kept.append(sum(is_content))
    return torch.stack(contexts), content_kept


PROMPT_SETS = {
    "long prompt and empty prompt": [LONG_PROMPT, ""],
    "one sentence": ["A single red apple on a white table."],
    "overflow": [OVERFLOW_PROMPT, "Short one. Two!"],
}


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_encoder_equals_the_paper_rule_by_hand(name, tokenizer, text_encoder, monkeypatch):
    prompts = PROMPT_SETS[name]
    expected, _ = segment_by_hand(tokenizer, text_encoder, prompts)
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
        twin = encoder(prompts)
        monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
        kernel = encoder(prompts)
    assert torch.equal(twin, expected)  # the twin: exactly equal
    assert (kernel - expected).abs().max() <= 1e-6  # the kernel, fp32: within 1e-6


def test_empty_prompt_is_sot_then_pad_star(tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    with torch.no_grad():
        empty, long = encoder(["", LONG_PROMPT])
    assert torch.equal(empty[1:], encoder.pad_star().expand(239, -1))
    # causal encoder: every segment's <sot> row is the same vector, the separator
    assert torch.allclose(empty[0], long[0], atol=1e-6)
    assert torch.allclose(long[0], long[24], atol=1e-6)  # the second sentence's <sot> (1 + 23 rows in)


def test_all_segments_of_all_prompts_go_through_one_forward(tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    encoder.pad_star()  # computed once and cached
    batches = []
    hook = text_encoder.register_forward_hook(lambda module, args, out: batches.append(args[0].shape))
    try:
        with torch.no_grad():
            encoder([LONG_PROMPT, "One. Two. Three.", ""])
            encoder.pad_star()
    finally:
        hook.remove()
    # One forward, trimmed to the longest kept run (<sot> + the longest sentence), rounded up to 16 positions
    longest = max(1 + len(ids) for ids in sentence_segments(tokenizer, LONG_PROMPT))
    assert 16 < longest <= 32
    assert batches == [(10 + 3 + 1, 32)]


def untrimmed(encoder, prompts):
    """Every block encoded at all 77 positions, then the same concatenation: the path before trimming."""
    plans = [encoder.plan(prompt) for prompt in prompts]
    hidden = encoder.text_encoder(torch.tensor([block for plan in plans for block in plan.blocks]))
    kept = torch.tensor([run for plan in plans for run in plan.kept])
    counts = torch.tensor([len(plan.blocks) for plan in plans])
    return kernels.concat_segments_torch(hidden, kept[:, 0], kept[:, 1], counts, encoder.pad_star(),
                                         encoder.context_length)


TRIM_PROMPTS = [[LONG_PROMPT, ""], [OVERFLOW_PROMPT, "Short one. Two!", "A cat."], ["a cat " * 40],
                ["One. Two. Three.", LONG_PROMPT]]


@pytest.mark.parametrize("strategy, merge_short", [("segment", False), ("segment", True), ("no-sot", False),
                                                   ("keep-all", False), ("chunk75", False), ("truncate", False)])
def test_trimmed_encode_is_bit_identical_to_encoding_all_77_positions(strategy, merge_short, tokenizer,
                                                                      text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder, strategy=strategy, merge_short=merge_short)
    lengths, trimmed = [], []
    hook = text_encoder.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DroppedTokensWarning)
            encoder.pad_star()
            for prompts in TRIM_PROMPTS:
                got = encoder(prompts)
                trimmed.append(lengths[-1])
                # bit for bit (the tests run on one CPU thread; see model.clip.trimmed_length)
                assert torch.equal(got, untrimmed(encoder, prompts)), prompts
                assert trimmed[-1] == encoded_length([run for p in prompts for run in encoder.plan(p).kept])
    finally:
        hook.remove()
    whole_blocks = strategy in ("keep-all", "chunk75", "truncate")
    assert (min(trimmed) < 77) == (not whole_blocks and not merge_short)  # sentences of ~25 tokens: trimmed


def test_encoded_length_reaches_the_longest_kept_run():
    assert encoded_length([(0, 5)]) == 16
    assert encoded_length([(0, 5), (0, 17)]) == 32
    assert encoded_length([(1, 47)]) == 48
    assert encoded_length([(0, 65)]) == 77  # never past the 77 positions
    assert encoded_length([(0, 1), (0, 77)]) == 77


def test_overflow_warns_once_with_the_count(tokenizer, text_encoder):
    _, content_kept = segment_by_hand(tokenizer, text_encoder, [OVERFLOW_PROMPT])
    total = len(tokenizer.encode(OVERFLOW_PROMPT))
    dropped = total - content_kept[0]
    assert dropped > 0
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        encoder([OVERFLOW_PROMPT, LONG_PROMPT, OVERFLOW_PROMPT])
    assert len(caught) == 1 and caught[0].category is DroppedTokensWarning
    message = str(caught[0].message)
    assert f"prompt 0: {dropped} of {total}" in message and f"prompt 2: {dropped} of {total}" in message
    assert "prompt 1" not in message
    plan = encoder.plan(OVERFLOW_PROMPT)
    assert (plan.tokens_used, plan.tokens_dropped) == (content_kept[0], dropped)


def test_no_warning_when_everything_fits(tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        encoder([LONG_PROMPT, ""])


def test_plan_reports_segments_and_tokens(tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    plan = encoder.plan(LONG_PROMPT)
    assert (plan.segments, plan.tokens_used, plan.tokens_dropped) == (10, 221, 0)
    assert encoder.plan("").segments == 0


# ---------------------------------------------------------------------------------------------------------
# other strategies
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, max_tokens, length", [
    ("segment", 240, 240), ("no-sot", 240, 240), ("keep-all", 240, 240), ("chunk75", 240, 231),
    ("chunk75", 154, 154), ("truncate", 240, 77), ("segment", 77, 77),
])
def test_strategy_shapes_match_for_cond_and_uncond(strategy, max_tokens, length, tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder, max_tokens=max_tokens, strategy=strategy)
    assert encoder.context_length == length
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        cond, uncond = encoder([LONG_PROMPT]), encoder([""])
    assert cond.shape == uncond.shape == (1, length, 128)
    assert cond.dtype == torch.float32


def test_truncate_is_plain_sd(tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder, strategy="truncate")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        assert torch.equal(encoder([LONG_PROMPT, ""]), text_encoder(tokenizer([LONG_PROMPT, ""])))


def test_chunk75_encodes_whole_blocks_and_extends_with_empty_blocks(tokenizer, text_encoder):
    ids = tokenizer.encode(LONG_PROMPT)[:100]
    blocks = [[SOT] + ids[:75] + [EOT], [SOT] + ids[75:] + [EOT] * 51, [SOT] + [EOT] * 76]
    prompt = tokenizer.decode(ids)
    assert tokenizer.encode(prompt) == ids
    with torch.no_grad():
        expected = text_encoder(torch.tensor(blocks)).reshape(1, 231, -1)
        got = LongPromptEncoder(tokenizer, text_encoder, strategy="chunk75")([prompt])
    assert torch.equal(got, expected)


def test_no_sot_and_keep_all_rows(tokenizer, text_encoder):
    first = split_sentences(LONG_PROMPT)[0]
    n = len(tokenizer.encode(first))
    with torch.no_grad():
        block = text_encoder(tokenizer([first]))[0]
        no_sot = LongPromptEncoder(tokenizer, text_encoder, strategy="no-sot")
        assert torch.equal(no_sot([LONG_PROMPT])[0, :n], block[1:1 + n])
        assert torch.equal(no_sot([""])[0], no_sot.pad_star().expand(240, -1))
        with pytest.warns(DroppedTokensWarning, match="keep-all encoding into 240 context rows"):
            keep_all = LongPromptEncoder(tokenizer, text_encoder, strategy="keep-all")([LONG_PROMPT])
        assert torch.equal(keep_all[0, :77], block)


def test_merge_short_uses_fewer_segments(tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder, merge_short=True)
    plan = encoder.plan(LONG_PROMPT)
    assert plan.segments < 10 and plan.tokens_used == 221
    with torch.no_grad():
        assert encoder([LONG_PROMPT]).shape == (1, 240, 128)


def test_bad_arguments_get_clear_errors(tokenizer, text_encoder):
    with pytest.raises(ValueError, match="unknown strategy 'a1111'"):
        LongPromptEncoder(tokenizer, text_encoder, strategy="a1111")
    with pytest.raises(ValueError, match="max_tokens must be an int >= 77"):
        LongPromptEncoder(tokenizer, text_encoder, strategy="chunk75", max_tokens=50)
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    for prompts in ([], [3], None):
        with pytest.raises(ValueError, match="non-empty list of str"):
            encoder(prompts)
    assert set(STRATEGIES) == {"segment", "no-sot", "keep-all", "chunk75", "truncate"}


def test_the_old_name_concat_says_segment(tokenizer, text_encoder):
    """The paper's encoding has one name; its earlier name gets a one-line error naming it."""
    old_names = (lambda: LongPromptEncoder(tokenizer, text_encoder, strategy="concat"),
                 lambda: check_strategy("concat"))
    for make in old_names:
        with pytest.raises(ValueError, match="'concat' is now called 'segment'") as error:
            make()
        assert "\n" not in str(error.value)
    check_strategy("segment")
    assert LongPromptEncoder(tokenizer, text_encoder).strategy == "segment"  # the default


def test_dropped_tokens_can_be_silenced_by_category(tokenizer, text_encoder):
    encoder = LongPromptEncoder(tokenizer, text_encoder, strategy="truncate")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DroppedTokensWarning)
        encoder([LONG_PROMPT])
    assert issubclass(DroppedTokensWarning, UserWarning)
