"""model/t5.py against its oracles: transformers' T5EncoderModel and T5 tokenizer, diffusers' FeedForward for
the TextAdapter's folder layout, and the adapter's maths written out with torch ops.

There is no internet here, so the tokenizer oracle runs on a small Unigram vocabulary trained in the test
with the ``tokenizers`` library and saved as a tokenizer.json laid out like google-t5/t5-large's (T5's
pre-tokenizer, "$A </s>" post-processor, ids <pad> = 0, </s> = 1, <unk> = 2, sentinel tokens).
"""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from tokenizers.trainers import UnigramTrainer

from model.t5 import (ADAPTER_CONFIGS, CONFIGS, T5_MAX_TOKENS, TextAdapter, T5EncoderModel, load_adapter, load_t5,
                      load_t5_tokenizer, save_adapter, t5_context)
from model.weights import WeightsError

RTOL = 1e-5
SMALL = CONFIGS["test"]
SENTINELS = [f"<extra_id_{i}>" for i in range(3)]
LONG_CAPTION = ("A wide watercolour of an old stone bridge over a slow green river at dawn, with mist on the water, "
                "a row of narrow red-roofed houses, two white swans and a woman in a yellow raincoat. ") * 12
PROMPTS = [
    "", " ", "a cat", "A photo of a cat sitting on a red sofa.", "The QUICK brown fox; jumps over the lazy dog!",
    "Café déjà vu, naïve façade", "ﬁne ligatures and ｆｕｌｌｗｉｄｔｈ letters", "numbers 1234 5.6 7,890 and 1st",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\nhere", "multiple     inner      spaces",
    "emoji 🐈 and unknown ☃ symbols", "中文字符 and 日本語", "Ünïcödé ÀÉÎÕÜ", "hyphen-ated words-and-more",
    "quotes \"double\" and 'single'", "brackets (round) [square] {curly}", "a" * 300, "x y z " * 100,
    LONG_CAPTION, LONG_CAPTION[:1000], "<extra_id_0> sentinel tokens <extra_id_2>", "</s> inside the text",
    "<pad> and <unk> written out", "punctuation!!! ??? ... ,,, ;;;", "mixed CASE Words In Title Case",
    "url https://example.com/a?b=c", "email someone@example.com", "math 3 + 4 = 7 and x^2", "ends with a dot.",
    "red sofa red sofa red sofa", "window\u00a0with\u00a0no-break spaces", "zero\u200bwidth space",
]


@pytest.fixture(autouse=True)
def quiet_libraries():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def relative_error(ours, reference):
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def hf_config(cfg=SMALL):
    """transformers' config of ``cfg``, with its plainest attention code (eager) as the oracle."""
    return transformers.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                                 num_layers=cfg.num_layers, num_heads=cfg.num_heads, attn_implementation="eager")


def randomized(model, seed=0):
    """transformers' init leaves the norms at 1; random values everywhere make the parity test stricter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.ndim == 1 else 0.2) + (p.ndim == 1))
    return model.eval()


@pytest.fixture(scope="module")
def hf_encoder(tmp_path_factory):
    """transformers' T5EncoderModel with random small weights, and the folder save_pretrained wrote."""
    folder = tmp_path_factory.mktemp("t5")
    model = randomized(transformers.T5EncoderModel(hf_config()))
    model.save_pretrained(folder)
    return model, folder


def random_ids(batch=2, length=T5_MAX_TOKENS, seed=0):
    return torch.randint(0, SMALL.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- The encoder ----

def test_encoder_equals_transformers_without_a_mask(hf_encoder):
    model, folder = hf_encoder
    ours, ids = load_t5(folder), random_ids()
    with torch.no_grad():
        assert relative_error(ours(ids), model(input_ids=ids).last_hidden_state) <= RTOL


def test_encoder_equals_transformers_with_a_padding_mask(hf_encoder):
    model, folder = hf_encoder
    ours, ids = load_t5(folder), random_ids()
    mask = torch.ones_like(ids)
    mask[0, 37:] = 0  # a short caption and its padding
    mask[1, 200:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert relative_error(ours(ids, mask), expected) <= RTOL
        assert relative_error(ours(ids), expected) > 1e-3  # the mask really changes the result


def test_full_size_keys_and_shapes_equal_transformers_t5_large():
    with torch.device("meta"):
        theirs = transformers.T5EncoderModel(hf_config(CONFIGS["t5-large"]))
        ours = T5EncoderModel(CONFIGS["t5-large"])
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert len(shapes) == 196
    assert ours.shared.weight is ours.encoder.embed_tokens.weight  # one tensor under two names
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 334_939_648


def test_seq2seq_checkpoint_loads_with_the_decoder_ignored(tmp_path, hf_encoder):
    full = randomized(transformers.T5ForConditionalGeneration(hf_config()), seed=1)
    full.save_pretrained(tmp_path)
    ids = random_ids(seed=2)
    with torch.no_grad():
        expected = full.get_encoder()(input_ids=ids).last_hidden_state
        assert relative_error(load_t5(tmp_path / "model.safetensors")(ids), expected) <= RTOL


def save_state(folder, state, config_folder, name="model.safetensors"):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text((config_folder / "config.json").read_text())
    if name.endswith(".bin"):
        torch.save(state, folder / name)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))


def test_pickle_with_both_embedding_keys_loads(tmp_path, hf_encoder):
    model, folder = hf_encoder
    state = dict(model.state_dict())  # torch.save keeps both tied names, as old pytorch_model.bin files do
    save_state(tmp_path / "bin", state, folder, "pytorch_model.bin")
    ids = random_ids(seed=3)
    with torch.no_grad():
        assert relative_error(load_t5(tmp_path / "bin")(ids), model(input_ids=ids).last_hidden_state) <= RTOL


def test_stray_missing_and_untied_keys_are_reported(tmp_path, hf_encoder):
    model, folder = hf_encoder
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_state(tmp_path / "stray", {**state, "encoder.block.0.layer.0.SelfAttention.extra.weight": torch.ones(2)},
               folder)
    with pytest.raises(WeightsError, match=r"unexpected 1 keys: encoder\.block\.0\.layer\.0\.SelfAttention\.extra"):
        load_t5(tmp_path / "stray")
    save_state(tmp_path / "missing", {k: v for k, v in state.items() if "block.1.layer.1" not in k}, folder)
    with pytest.raises(WeightsError, match=r"missing 3 keys: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi"):
        load_t5(tmp_path / "missing")
    untied = {**state, "encoder.embed_tokens.weight": state["shared.weight"] + 1}
    save_state(tmp_path / "untied", untied, folder)
    with pytest.raises(WeightsError, match="ties them"):
        load_t5(tmp_path / "untied")


def test_fp16_is_refused_and_bf16_stays_close(hf_encoder):
    model, folder = hf_encoder
    with pytest.raises(ValueError, match="overflows in float16.*bfloat16 or float32"):
        load_t5(folder, dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        load_t5(folder).half()(random_ids())
    ids = random_ids(seed=4)
    with torch.no_grad():
        low = load_t5(folder, dtype=torch.bfloat16)(ids)
        assert low.dtype == torch.bfloat16
        assert relative_error(low, model(input_ids=ids).last_hidden_state) < 0.1


def test_wrong_folders_are_clear_errors(tmp_path, hf_encoder):
    _, folder = hf_encoder
    with pytest.raises(WeightsError, match="expected one of model.safetensors, pytorch_model.bin"):
        load_t5(tmp_path)
    gated = json.loads((folder / "config.json").read_text()) | {"feed_forward_proj": "gated-gelu"}
    save_state(tmp_path / "v11", {}, folder)
    (tmp_path / "v11" / "config.json").write_text(json.dumps(gated))
    with pytest.raises(WeightsError, match="only T5 v1.0"):
        load_t5(tmp_path / "v11")
    (tmp_path / "v11" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(WeightsError, match="'clip' model, not T5"):
        load_t5(tmp_path / "v11")
    (tmp_path / "v11" / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        load_t5(tmp_path / "v11")


# ---- The tokenizer ----

@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return build_t5_tokenizer(tmp_path_factory.mktemp("t5_tokenizer"))


def build_t5_tokenizer(folder):
    """A tokenizer.json shaped like t5-large's in ``folder``: Unigram, WhitespaceSplit + Metaspace, '$A </s>'."""
    tokenizer = Tokenizer(Unigram())
    # t5-large's normalizer is sentencepiece's precompiled nmt_nfkc map, which needs spiece.model; NFKC plus
    # space folding is the offline stand-in. Both tokenizers read the same file, so any normalizer will do.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(PROMPTS * 5 + [LONG_CAPTION.lower()] * 5, trainer)
    tokenizer.add_special_tokens(SENTINELS)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_ids_equal_transformers(tokenizer_folder):
    ours = load_t5_tokenizer(tokenizer_folder)
    theirs = transformers.T5TokenizerFast(tokenizer_file=str(tokenizer_folder / "tokenizer.json"), extra_ids=0,
                                          additional_special_tokens=SENTINELS)
    expected = theirs(PROMPTS, max_length=T5_MAX_TOKENS, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids
    ids = ours(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), T5_MAX_TOKENS)
    assert torch.equal(ids, expected)
    # the set is varied enough to matter: truncated captions, unknown pieces, sentinels and short ones
    lengths = (ids != 0).sum(dim=1)
    assert (lengths == T5_MAX_TOKENS).sum() >= 3 and (lengths < 20).sum() >= 5
    assert (ids == 2).any() and (ids == theirs.convert_tokens_to_ids(SENTINELS[0])).any()
    assert ids[0].tolist() == [1] + [0] * (T5_MAX_TOKENS - 1)  # "" is </s> and padding


def test_tokenizer_folder_with_only_spiece_model_names_the_fix(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"T5TokenizerFast\.from_pretrained\(.*\)\.save_pretrained"):
        load_t5_tokenizer(tmp_path)
    (tmp_path / "spiece.model").unlink()
    with pytest.raises(ValueError, match="expected tokenizer.json"):
        load_t5_tokenizer(tmp_path)


def test_a_tokenizer_without_t5_tokens_is_refused(tmp_path):
    tokenizer = Tokenizer(Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a T5 tokenizer"):
        load_t5_tokenizer(tmp_path)


# ---- The adapter ----

def adapter_maths(p, x):
    """LaVi-Bridge's TextAdapter written out: LN -> GEGLU -> Linear, twice, no residuals (eval: no dropout)."""
    for norm, ff in (("norm1", "ff1"), ("norm2", "ff2")):
        x = F.layer_norm(x, x.shape[-1:], p[f"{norm}.weight"], p[f"{norm}.bias"], eps=1e-5)
        value, gate = (x @ p[f"{ff}.net.0.proj.weight"].T + p[f"{ff}.net.0.proj.bias"]).chunk(2, dim=-1)
        x = (value * F.gelu(gate)) @ p[f"{ff}.net.2.weight"].T + p[f"{ff}.net.2.bias"]
    return x


class ReleaseTextAdapter(ModelMixin, ConfigMixin):
    """The adapter as LaVi-Bridge defines it on diffusers, to check that the two read each other's folders."""

    @register_to_config
    def __init__(self, in_dim: int, int_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(in_dim)
        self.ff1 = FeedForward(in_dim, dim_out=int_dim, mult=4, dropout=0.1, activation_fn="geglu")
        self.norm2 = torch.nn.LayerNorm(int_dim)
        self.ff2 = FeedForward(int_dim, dim_out=out_dim, mult=4, dropout=0.1, activation_fn="geglu")

    def forward(self, x):
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))


ReleaseTextAdapter.__name__ = "TextAdapter"  # the release's class name, which diffusers writes to config.json


def test_adapter_size_keys_and_shape_at_the_release_size():
    with torch.device("meta"):
        adapter = TextAdapter(ADAPTER_CONFIGS["longsd"])
        out = adapter(torch.empty(2, T5_MAX_TOKENS, 1024))
    assert sum(p.numel() for p in adapter.parameters()) == 21_254_528
    assert tuple(out.shape) == (2, T5_MAX_TOKENS, 768)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes["ff1.net.0.proj.weight"] == (8192, 1024) and shapes["ff2.net.0.proj.weight"] == (7168, 896)
    assert shapes["ff1.net.2.weight"] == (896, 4096) and shapes["ff2.net.2.weight"] == (768, 3584)
    assert set(shapes) == {f"{m}.{p}" for m in ("norm1", "norm2", "ff1.net.0.proj", "ff1.net.2", "ff2.net.0.proj",
                                                 "ff2.net.2") for p in ("weight", "bias")}


def test_adapter_equals_its_maths_and_dropout_is_active_only_in_training():
    adapter = randomized(TextAdapter(ADAPTER_CONFIGS["test"]))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.allclose(adapter(x), adapter_maths(dict(adapter.named_parameters()), x), atol=1e-6)
        adapter.train()
        assert not torch.equal(adapter(x), adapter(x))


@pytest.mark.parametrize("file_name", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_adapter_folders_round_trip_with_the_release_code(tmp_path, file_name):
    release = randomized(ReleaseTextAdapter(in_dim=32, int_dim=24, out_dim=16))
    release.save_pretrained(tmp_path / "release", safe_serialization=file_name.endswith(".safetensors"))
    assert (tmp_path / "release" / file_name).is_file()
    ours = load_adapter(tmp_path / "release").eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), release(x), atol=1e-6)
        save_adapter(ours, tmp_path / "ours")
        assert torch.allclose(ReleaseTextAdapter.from_pretrained(tmp_path / "ours").eval()(x), release(x), atol=1e-6)
        again = load_adapter(tmp_path / "ours")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == {
        "_class_name": "TextAdapter", "in_dim": 32, "int_dim": 24, "out_dim": 16}


def test_adapter_folder_errors(tmp_path, hf_encoder):
    _, t5_folder = hf_encoder
    with pytest.raises(WeightsError, match="not an adapter folder"):
        load_adapter(tmp_path)
    with pytest.raises(WeightsError, match="not a TextAdapter"):
        load_adapter(t5_folder)
    save_adapter(TextAdapter(ADAPTER_CONFIGS["test"]), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "TextAdapter", "in_dim": 32, "int_dim": 20,
                                                      "out_dim": 16}))
    with pytest.raises(WeightsError, match="wrong shapes"):
        load_adapter(tmp_path)


# ---- The release's T5 context ----

def test_t5_context_equals_the_release_path(tokenizer_folder, hf_encoder):
    model, t5_folder = hf_encoder
    adapter = randomized(TextAdapter(ADAPTER_CONFIGS["test"]))
    prompts = [LONG_CAPTION, "a cat on a red sofa", ""]
    theirs = transformers.T5TokenizerFast(tokenizer_file=str(tokenizer_folder / "tokenizer.json"), extra_ids=0)
    ids = theirs(prompts, max_length=240, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():  # no attention mask: the release's encoder attends to the padding too
        expected = adapter_maths(dict(adapter.named_parameters()), model(input_ids=ids).last_hidden_state)
        context = t5_context(load_t5_tokenizer(tokenizer_folder), load_t5(t5_folder), adapter, prompts)
        alone = t5_context(load_t5_tokenizer(tokenizer_folder), load_t5(t5_folder), adapter, [""])
    assert context.shape == (3, T5_MAX_TOKENS, 16)
    assert relative_error(context, expected) <= RTOL
    assert torch.allclose(alone[0], context[2], atol=1e-6)  # "" takes the same path, alone or in a batch


def test_t5_context_trains_the_adapter_but_not_t5(tokenizer_folder, hf_encoder):
    t5, adapter = load_t5(hf_encoder[1]), TextAdapter(ADAPTER_CONFIGS["test"]).train()
    t5_context(load_t5_tokenizer(tokenizer_folder), t5, adapter, ["a cat"]).square().mean().backward()
    assert adapter.ff1.net[0].proj.weight.grad is not None
    assert all(p.grad is None for p in t5.parameters())
