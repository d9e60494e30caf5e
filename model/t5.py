"""The T5 half of the released LongSD context: a T5 v1.0 encoder, its tokenizer, and LaVi-Bridge's TextAdapter.

The LongAlign authors' released model conditions the UNet on 480 context rows: the 240-row CLIP segment
encoding (paper §3) followed by 240 rows of T5-large, mapped from T5's 1024 channels to the UNet's 768 by
the TextAdapter of LaVi-Bridge (Zhao et al. 2024, "Bridging Different Language Models and Generative Vision
Models for Text-to-Image Generation"):

    caption --T5 tokenizer--> 240 ids (..., </s>, <pad>...) --T5 encoder--> [B, 240, 1024] --adapter--> [B, 240, 768]

The encoder is T5 v1.0 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", §2.1) as in transformers' ``T5EncoderModel`` and the ``google-t5/t5-large``
checkpoint: pre-norm blocks with RMS norms (scale only, variance in float32), self-attention whose scores
are NOT divided by sqrt(d_kv) (T5 folds that factor into its initialisation), one learned relative position
bias computed in block 0 and added in every block, and a ReLU feed-forward; no biases anywhere. The
attribute names equal transformers', so its folders load by name. Only inference is written: the release
keeps T5 frozen, so T5's dropout is left out.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from model.convert import Layout, WeightsError
from model.meta import empty_model
from model.unet import GEGLU
from model.weights import find_file, load_strict, read_config, read_state_dict, save_state_dict, write_json

T5_MAX_TOKENS = 240  # the release tokenizes the whole caption to 240 ids
T5_FILES = ["model.safetensors", "pytorch_model.bin"]
ADAPTER_FILES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
# A T5ForConditionalGeneration checkpoint (google-t5/t5-large on the Hub is one) also holds the decoder and
# the LM head; the encoder needs neither, so those keys are dropped by this rule and every other key is checked.
SEQ2SEQ_ONLY_PREFIXES = ("decoder.", "lm_head.")


def check_t5_dtype(dtype: torch.dtype | None) -> None:
    """Refuse float16: T5's feed-forward activations exceed fp16's range (65504) and become inf."""
    if dtype == torch.float16:
        raise ValueError("T5 overflows in float16 (its feed-forward activations exceed 65504); run T5 in "
                         "bfloat16 or float32 instead")


# ---- The encoder ----

@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    d_kv: int = 64
    d_ff: int = 4096
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


CONFIGS = {
    "t5-large": T5Config(),
    # heads·d_kv (64) differs from d_model (32), as T5 allows; 240 tokens reach the logarithmic buckets.
    "test": T5Config(vocab_size=256, d_model=32, num_layers=2, num_heads=4, d_kv=16, d_ff=48),
}


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucketing of key_position − query_position (Raffel et al. 2020, §2.1).

    Half the buckets are for keys after the query, half for keys before it. Within each half, distances below
    a quarter of the buckets get a bucket each; larger ones share logarithmically wider buckets up to
    ``max_distance``, beyond which all distances share the last bucket.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    exact = half // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x²) + eps) · weight, no mean and no bias; mean(x²) in float32 for bf16 inputs."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class T5Attention(nn.Module):
    """Multi-head self-attention with an additive bias and NO 1/sqrt(d_kv) scaling of the scores."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int) -> torch.Tensor:
        """The learned bias of every (query, key) pair, [1, heads, length, length]; only block 0 has one."""
        position = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(position[None, :] - position[:, None],
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, H·d] -> [B, H, L, d]
            return t.view(batch, length, self.cfg.num_heads, self.cfg.d_kv).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                             attn_mask=bias.to(x.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseReluDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """x += attn(norm(x)); x += ff(norm(x)). ``layer`` is a list, as in transformers' key names."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens  # the same module as T5EncoderModel.shared: one tensor, two key names
        self.block = nn.ModuleList([T5Block(cfg, has_relative_attention_bias=i == 0)
                                    for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.embed_tokens(ids)
        bias = self.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])
        if attention_mask is not None:  # masked keys get the dtype's lowest value, so softmax gives them ~0
            masked = attention_mask[:, None, None, :].to(torch.bool).logical_not()
            bias = bias.masked_fill(masked, torch.finfo(bias.dtype).min)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """T5's encoder: ids [B, L] -> last hidden states [B, L, d_model]."""

    def __init__(self, cfg: T5Config = CONFIGS["t5-large"]):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` [B, L] (1 = attend) hides padding keys; the release passes none."""
        check_t5_dtype(self.shared.weight.dtype)
        return self.encoder(ids, attention_mask)


# ---- Loading T5 from a transformers folder ----

def t5_config_from_transformers(hf: dict, source: Path) -> T5Config:
    """Our config from transformers' config.json; an absent key takes transformers' T5Config default."""
    if hf.get("model_type", "t5") != "t5":
        raise WeightsError(f"{source} holds a {hf['model_type']!r} model, not T5. Pass a T5 folder such as "
                           "google-t5/t5-large.")
    if hf.get("feed_forward_proj", "relu") != "relu":
        raise WeightsError(f"{source} is a T5 with a {hf['feed_forward_proj']!r} feed-forward (T5 v1.1 / FLAN-T5); "
                           "only T5 v1.0 (ReLU, as google-t5/t5-large) is supported.")
    defaults = T5Config(vocab_size=32128, d_model=512, num_layers=6, num_heads=8, d_kv=64, d_ff=2048)
    return T5Config(**{name: hf.get(name, value) for name, value in asdict(defaults).items()})


def t5_encoder_state(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The encoder's entries of a T5EncoderModel or T5ForConditionalGeneration state dict.

    The decoder and LM head are dropped by rule. The embedding is stored once under ``shared.weight`` (as
    transformers saves it), under ``encoder.embed_tokens.weight``, or under both; both keys are filled here.
    """
    state = {k: v for k, v in state.items() if not k.startswith(SEQ2SEQ_ONLY_PREFIXES)}
    shared, embed = state.get("shared.weight"), state.get("encoder.embed_tokens.weight")
    if shared is not None and embed is not None and not torch.equal(shared, embed):
        raise WeightsError(f"{source}: shared.weight and encoder.embed_tokens.weight differ, but T5 ties them. "
                           "The file is not a T5 checkpoint as transformers writes it.")
    tied = shared if shared is not None else embed
    if tied is not None:
        state["shared.weight"] = state["encoder.embed_tokens.weight"] = tied
    return state


def load_t5(path: str | os.PathLike, dtype: torch.dtype | None = None,
            device: str | torch.device | None = None) -> T5EncoderModel:
    """T5's encoder from a transformers folder (config.json + model.safetensors or pytorch_model.bin) or from
    the weights file inside one. A whole T5ForConditionalGeneration checkpoint loads too (decoder ignored).

    ``dtype`` float16 is refused (see :func:`check_t5_dtype`); the release runs T5 in bfloat16.
    """
    check_t5_dtype(dtype)
    path = Path(path)
    weights = find_file(path, T5_FILES, "T5") if path.is_dir() else path
    hf_config = read_config(weights.parent)
    if hf_config is None:
        raise WeightsError(f"no config.json beside {weights}: pass a transformers T5 folder (as google-t5/t5-large "
                           "on the Hub), which holds config.json next to the weights.")
    state = t5_encoder_state(read_state_dict(weights), weights)
    model = empty_model(lambda: T5EncoderModel(t5_config_from_transformers(hf_config, weights)), device)
    return load_strict(model, state, Layout.TRANSFORMERS, dtype, device).eval()


# ---- The tokenizer ----

class T5Tokenizer:
    """T5's sentencepiece Unigram vocabulary through the ``tokenizers`` library, as the release uses it.

    Every caption becomes exactly ``max_length`` ids: its pieces, truncated to max_length − 1, then ``</s>``,
    then ``<pad>`` up to max_length. That equals transformers' ``T5TokenizerFast(caption,
    max_length=240, padding="max_length", truncation=True)``. The whole caption is read, not split into
    sentences.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer.json"):
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = (tokenizer.token_to_id(token) for token in ("</s>", "<pad>"))
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(f"{source} has no '</s>' or '<pad>' token, so it is not a T5 tokenizer; pass the T5 "
                             "folder's tokenizer.json")
        # padding and truncation are done below, the same way whatever the file asks for
        tokenizer.no_padding()
        tokenizer.no_truncation()

    def __call__(self, prompts: list[str], max_length: int = T5_MAX_TOKENS) -> torch.Tensor:
        """The ids of every prompt, as a LongTensor [len(prompts), max_length]."""
        if isinstance(prompts, str):  # one prompt, not a list of one-character prompts
            prompts = [prompts]
        rows = []
        for encoding in self.tokenizer.encode_batch(list(prompts), add_special_tokens=False):
            ids = encoding.ids[:max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def load_t5_tokenizer(folder: str | os.PathLike) -> T5Tokenizer:
    """The tokenizer of a transformers T5 folder, from its ``tokenizer.json``."""
    folder = Path(folder)
    folder = folder.parent if folder.is_file() else folder
    if (folder / "tokenizer.json").is_file():
        return T5Tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), str(folder / "tokenizer.json"))
    if (folder / "spiece.model").is_file():
        raise ValueError(f"{folder} holds only spiece.model (sentencepiece), which this project does not read. "
                         "Write tokenizer.json beside it once, with transformers: "
                         f"T5TokenizerFast.from_pretrained('{folder}').save_pretrained('{folder}')")
    raise ValueError(f"no T5 tokenizer in {folder}: expected tokenizer.json. Pass the T5 folder "
                     "(google-t5/t5-large on the Hub has it).")


# ---- LaVi-Bridge's TextAdapter ----

@dataclass(frozen=True)
class AdapterConfig:
    in_dim: int = 1024   # T5-large's width
    int_dim: int = 896
    out_dim: int = 768   # SD-1.5's cross-attention width
    dropout: float = 0.1  # active in SFT, as the release trains it; eval() turns it off


ADAPTER_CONFIGS = {"longsd": AdapterConfig(), "test": AdapterConfig(in_dim=32, int_dim=24, out_dim=16)}


class AdapterFeedForward(nn.Module):
    """GEGLU(dim -> 4·dim) -> Dropout -> Linear(4·dim -> dim_out), with diffusers' ``FeedForward`` key names."""

    def __init__(self, dim: int, dim_out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TextAdapter(nn.Module):
    """LaVi-Bridge's adapter from a language model's states to the UNet's context width (Zhao et al. 2024):

        x = ff1(norm1(x));  x = ff2(norm2(x))        (LayerNorms, then GEGLU feed-forwards; no residuals)

    1024 -> 896 -> 768 for T5-large into SD-1.5: 21,254,528 parameters.
    """

    def __init__(self, cfg: AdapterConfig = ADAPTER_CONFIGS["longsd"]):
        super().__init__()
        self.config = cfg
        self.norm1 = nn.LayerNorm(cfg.in_dim)
        self.ff1 = AdapterFeedForward(cfg.in_dim, cfg.int_dim, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.int_dim)
        self.ff2 = AdapterFeedForward(cfg.int_dim, cfg.out_dim, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))


def load_adapter(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> TextAdapter:
    """A TextAdapter from its diffusers-style folder (the release's ``s28750_adapter/``, LaVi-Bridge's
    ``adapter/``): config.json ``{"_class_name": "TextAdapter", "in_dim", "int_dim", "out_dim"}`` and
    ``diffusion_pytorch_model.safetensors`` or ``.bin`` (read with ``weights_only=True``)."""
    folder = Path(folder)
    hf_config = read_config(folder) if folder.is_dir() else None
    if hf_config is None:
        raise WeightsError(f"{folder} is not an adapter folder: expected config.json and "
                           f"{' or '.join(ADAPTER_FILES)} in it.")
    if hf_config.get("_class_name") != "TextAdapter":
        raise WeightsError(f"{folder} holds {hf_config.get('_class_name')!r} (its config.json says so), not a "
                           "TextAdapter. Pass the adapter folder.")
    cfg = AdapterConfig(**{k: hf_config[k] for k in ("in_dim", "int_dim", "out_dim") if k in hf_config})
    state = read_state_dict(find_file(folder, ADAPTER_FILES, "adapter"))
    # eval: its dropout is for SFT only (train.py switches it on there), never for sampling
    return load_strict(empty_model(lambda: TextAdapter(cfg), device), state, Layout.DIFFUSERS, dtype, device).eval()


def save_adapter(adapter: TextAdapter, folder: str | os.PathLike) -> None:
    """Write the folder :func:`load_adapter` reads, in the release's layout (LaVi-Bridge's code reads it too)."""
    folder = Path(folder)
    save_state_dict(adapter.state_dict(), folder / ADAPTER_FILES[0])
    cfg = adapter.config
    write_json(folder / "config.json", {"_class_name": "TextAdapter", "in_dim": cfg.in_dim,
                                        "int_dim": cfg.int_dim, "out_dim": cfg.out_dim})


# ---- The release's T5 context ----

def t5_context(tokenizer: T5Tokenizer, t5: T5EncoderModel, adapter: TextAdapter, prompts: list[str]) -> torch.Tensor:
    """The T5 half of the released context: adapter(T5(whole caption)), [B, 240, out_dim].

    As the release was trained: each caption is tokenized whole to 240 ids and encoded WITHOUT an attention
    mask, so the bidirectional encoder also attends to the padding. The empty prompt "" (the unconditional
    context) goes the same way. T5 is frozen, so it runs without a graph; the adapter keeps its graph for SFT.
    """
    weight = adapter.norm1.weight
    ids = tokenizer(prompts).to(t5.shared.weight.device)
    with torch.no_grad():
        hidden = t5(ids)
    return adapter(hidden.to(device=weight.device, dtype=weight.dtype))


class CLIPT5Encoder:
    """The released LongSD's 480-row context: [CLIP segment concatenation, 240 | adapter(T5(caption)), 240].

    ``clip`` is the §3 encoder (a ``model.longtext.LongPromptEncoder``); its rows come first, as the release
    concatenates them. Both halves read the same prompts, the empty prompt included, so the conditional and
    the unconditional contexts have the same length.
    """

    def __init__(self, clip, tokenizer: T5Tokenizer, t5: T5EncoderModel, adapter: TextAdapter):
        self.clip, self.tokenizer, self.t5, self.adapter = clip, tokenizer, t5, adapter

    @property
    def context_length(self) -> int:
        return self.clip.context_length + T5_MAX_TOKENS

    @property
    def strategy(self) -> str:
        return self.clip.strategy

    def plan(self, prompt: str):
        return self.clip.plan(prompt)  # what the CLIP half keeps; T5 reads the whole caption up to 240 ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        clip_rows = self.clip(prompts)  # [B, 240, D]
        t5_rows = t5_context(self.tokenizer, self.t5, self.adapter, prompts)  # [B, 240, D]
        return torch.cat([clip_rows, t5_rows.to(clip_rows.dtype)], dim=1)  # [B, 480, D]


LONGSD_ADAPTERS = ("s28750_adapter", "adapter")  # the authors' release, then what train.py --t5 writes
LONGSD_LORAS = ("s28750_lora_vis.pt", "sd15-reward-3750.pt")  # SFT, then reward (trained on SFT merged)


def longsd_files(folder: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The adapter folder and the LoRA files, in merge order, of a LongSD folder: the authors' release
    (s28750_adapter/, s28750_lora_vis.pt then sd15-reward-3750.pt), or a ``train.py --t5`` run or export
    (adapter/, and lora.safetensors unless the UNet is merged already)."""
    folder = Path(folder)
    adapters = [folder / name for name in LONGSD_ADAPTERS if (folder / name).is_dir()]
    if not adapters:
        raise WeightsError(f"{folder} holds no {' or '.join(f'{n}/' for n in LONGSD_ADAPTERS)} adapter folder; pass "
                           "the released LongSD folder, or a train.py --t5 run folder")
    loras = [folder / name for name in LONGSD_LORAS if (folder / name).is_file()]
    if not loras and (folder / "lora.safetensors").is_file():
        loras = [folder / "lora.safetensors"]
    return adapters[0], loras
