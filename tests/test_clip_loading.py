"""Loading CLIP weights (model/weights.py, model/convert.py) and numerical parity with transformers.

transformers builds the oracle models with random weights at a tiny size and saves them with
``save_pretrained``; our loaders read those files. Everything is fp32 and compared at <= 1e-5 relative
error (largest absolute difference over the largest reference value).
"""
import argparse

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from model.clip import CONFIGS, CLIPModel, CLIPTextModel
from model.tokenizer import EOT, SOT
from model.convert import Layout, infer_clip_config, infer_text_config, open_clip_to_transformers
from model.weights import WeightsError, load_clip, load_text_encoder

TOLERANCE = 1e-5

# The "test" shapes of model/clip.py, written as a transformers config. 64-wide heads, as open_clip assumes.
TEST_TEXT = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77)
TEST_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   patch_size=32, image_size=224)


def randomize(model, seed):
    """Replace transformers' init (zero biases, unit LayerNorms) by random values, so every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def token_ids(seed=0, pad=EOT):
    """Rows framed like the tokenizer's: SOT, random content, EOT at different places, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SOT, (3, 77), generator=generator)
    for row, eot_at in enumerate((5, 40, 76)):
        ids[row, 0], ids[row, eot_at], ids[row, eot_at + 1:] = SOT, EOT, pad
    return ids


def relative_error(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max())


def features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 4 vs 5


# ---------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------

def build_hf_clip(act, folder):
    """A transformers CLIPModel with random weights, saved with save_pretrained, and its outputs."""
    config = HFCLIPConfig(text_config=dict(TEST_TEXT, hidden_act=act),
                          vision_config=dict(TEST_VISION, hidden_act=act), projection_dim=64)
    model = randomize(HFCLIPModel(config), seed=1)
    model.save_pretrained(folder)
    ids, pixels = token_ids(), torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        text = features(model.get_text_features(input_ids=ids))
        image = features(model.get_image_features(pixel_values=pixels))
    return dict(act=act, folder=folder, state=model.state_dict(), ids=ids, pixels=pixels, text=text, image=image)


@pytest.fixture(scope="module")
def hf_clips(tmp_path_factory):
    return {act: build_hf_clip(act, tmp_path_factory.mktemp(f"hf_clip_{act}")) for act in ("quick_gelu", "gelu")}


@pytest.fixture(params=["quick_gelu", "gelu"])
def hf_clip(request, hf_clips):
    return hf_clips[request.param]


def build_hf_text(act, folder):
    """A transformers CLIPTextModel (SD-1.5's text encoder class) with random weights, saved, and its output."""
    model = randomize(HFCLIPTextModel(HFCLIPTextConfig(**TEST_TEXT, hidden_act=act)), seed=3)
    model.save_pretrained(folder)
    ids = token_ids(seed=4)
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    # The public SD-1.5 file stores the tower under "text_model." (transformers 5 saves it without).
    public_state = {("text_model." + k if not k.startswith("text_model.") else k): v
                    for k, v in model.state_dict().items()}
    return dict(act=act, folder=folder, state=public_state, ids=ids, hidden=hidden)


@pytest.fixture(scope="module")
def hf_texts(tmp_path_factory):
    return {act: build_hf_text(act, tmp_path_factory.mktemp(f"hf_text_{act}")) for act in ("quick_gelu", "gelu")}


@pytest.fixture(params=["quick_gelu", "gelu"])
def hf_text(request, hf_texts):
    return hf_texts[request.param]


def check_clip(model, oracle):
    with torch.no_grad():
        assert relative_error(model.encode_text(oracle["ids"]), oracle["text"]) <= TOLERANCE
        assert relative_error(model.encode_image(oracle["pixels"]), oracle["image"]) <= TOLERANCE


def check_text_encoder(model, oracle):
    with torch.no_grad():
        assert relative_error(model(oracle["ids"]), oracle["hidden"]) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# transformers layout
# ---------------------------------------------------------------------------------------------------------

def test_clip_model_folder_and_file_match_transformers(hf_clip):
    for path in (hf_clip["folder"], hf_clip["folder"] / "model.safetensors"):
        model = load_clip(path)
        assert model.layout is Layout.TRANSFORMERS
        assert model.config.text.act == model.config.vision.act == hf_clip["act"]
        check_clip(model, hf_clip)


def test_text_encoder_matches_transformers(hf_text, tmp_path):
    # An SD-1.5 diffusers folder, its text_encoder/ subfolder, and the weights file itself.
    sd_folder = tmp_path / "sd15"
    (sd_folder / "text_encoder").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (sd_folder / "text_encoder" / name).write_bytes((hf_text["folder"] / name).read_bytes())
    for path in (sd_folder, sd_folder / "text_encoder", sd_folder / "text_encoder" / "model.safetensors"):
        model = load_text_encoder(path)
        assert isinstance(model, CLIPTextModel) and model.layout is Layout.TRANSFORMERS
        assert model.config.act == hf_text["act"]
        check_text_encoder(model, hf_text)


def test_text_encoder_in_the_public_layout_with_position_ids(hf_text, tmp_path):
    # As the public SD-1.5 file: "text_model." keys, plus the position_ids buffer older files carry.
    state = dict(hf_text["state"], **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((hf_text["folder"] / "config.json").read_bytes())
    check_text_encoder(load_text_encoder(tmp_path / "model.safetensors"), hf_text)


def test_text_encoder_from_pytorch_model_bin(hf_text, tmp_path):
    torch.save(hf_text["state"], tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((hf_text["folder"] / "config.json").read_bytes())
    check_text_encoder(load_text_encoder(tmp_path), hf_text)


def test_dtype_and_device_arguments(hf_clip):
    model = load_clip(hf_clip["folder"], dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        image = model.encode_image(hf_clip["pixels"]).float()
    assert relative_error(image, hf_clip["image"]) <= 0.05  # bf16: 8 significant bits


# ---------------------------------------------------------------------------------------------------------
# Original single-file SD checkpoint
# ---------------------------------------------------------------------------------------------------------

def single_file_state(text_state, with_text_model):
    """A miniature v1-5-pruned file: text encoder under cond_stage_model.transformer., other parts beside it."""
    prefix = "cond_stage_model.transformer."
    state = {prefix + (k if with_text_model else k.removeprefix("text_model.")): v for k, v in text_state.items()}
    state.update({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3),
                  "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
                  "betas": torch.zeros(10), "model_ema.decay": torch.tensor(0.999)})
    return state


# A single file has no config.json: the config comes from the shapes, and the "test" shapes mean GELU.
# (That full-size ViT-L/14 shapes mean quick_gelu is checked below, on the meta device.)

@pytest.mark.parametrize("with_text_model", [True, False])
def test_single_file_safetensors(hf_texts, tmp_path, with_text_model):
    hf_text = hf_texts["gelu"]
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(single_file_state(hf_text["state"], with_text_model), path)
    model = load_text_encoder(path)
    assert model.layout is Layout.SINGLE_FILE
    check_text_encoder(model, hf_text)


def test_single_file_ckpt_pickle(hf_texts, tmp_path):
    hf_text = hf_texts["gelu"]
    path = tmp_path / "v1-5-pruned-emaonly.ckpt"
    torch.save({"state_dict": single_file_state(hf_text["state"], with_text_model=True), "global_step": 840000},
               path)
    check_text_encoder(load_text_encoder(path), hf_text)


def test_sd15_text_encoder_shapes_in_a_single_file_are_vit_l_14():
    """SD-1.5's own text encoder (the ViT-L/14 text tower) keeps loading from a single file: its shapes name it."""
    with torch.device("meta"):
        state = CLIPTextModel(CONFIGS["vit-l-14"].text).state_dict()
    assert infer_text_config(state, None, Layout.SINGLE_FILE) == CONFIGS["vit-l-14"].text


@pytest.mark.parametrize("width, heads", [(64, 2), (32, 2)])
def test_single_file_with_unknown_text_shapes_is_refused_not_guessed(tmp_path, width, heads):
    """A 2-head quick_gelu tower has the shapes of a 1-head GELU one: no config with these shapes is known, so
    the file is refused with what cannot be read off; a folder whose config.json says it loads exactly."""
    hf_config = HFCLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=1, num_attention_heads=heads, hidden_act="quick_gelu")
    model = randomize(HFCLIPTextModel(hf_config), seed=5)
    state = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in model.state_dict().items()}
    path = tmp_path / "odd-sd.safetensors"
    save_file(single_file_state(state, with_text_model=True), path)
    with pytest.raises(WeightsError) as error:
        load_text_encoder(path)
    message = str(error.value)
    assert "\n" not in message and "does not split" not in message
    assert f"width {width}" in message and "matches no known config" in message
    assert "head count and activation do not show in shapes" in message
    assert "config.json sets num_attention_heads and hidden_act" in message
    model.save_pretrained(tmp_path / "text_encoder")
    loaded = load_text_encoder(tmp_path)  # the fix: a folder whose config.json names heads and activation
    assert (loaded.config.heads, loaded.config.act) == (heads, "quick_gelu")
    ids = token_ids(seed=6)
    with torch.no_grad():
        assert relative_error(loaded(ids), model(input_ids=ids).last_hidden_state) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# open_clip layout (HPSv2)
# ---------------------------------------------------------------------------------------------------------

def transformers_to_open_clip(state):
    """open_clip's key names from transformers', written here independently of model/convert.py."""
    renames = [("text_model.embeddings.token_embedding.", "token_embedding."),
               ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
               ("text_model.encoder.layers.", "transformer.resblocks."),
               ("text_model.final_layer_norm.", "ln_final."),
               ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
               ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
               ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
               ("vision_model.pre_layrnorm.", "visual.ln_pre."),
               ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
               ("vision_model.post_layernorm.", "visual.ln_post."),
               (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
               (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
               (".self_attn.out_proj.", ".attn.out_proj.")]
    out = {"text_projection": state["text_projection.weight"].T.contiguous(),
           "visual.proj": state["visual_projection.weight"].T.contiguous(),
           "logit_scale": state["logit_scale"]}
    for key, value in state.items():
        if key in ("text_projection.weight", "visual_projection.weight", "logit_scale") or ".k_proj." in key \
                or ".v_proj." in key or key.endswith("position_ids"):
            continue
        if ".q_proj." in key:  # fuse q, k, v into in_proj, in that order
            kind = key.rsplit(".", 1)[1]
            fused = torch.cat([state[key.replace(".q_proj.", f".{n}_proj.")] for n in "qkv"])
            key, value = key.replace(f".self_attn.q_proj.{kind}", f".attn.in_proj_{kind}"), fused
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def test_open_clip_pickle_and_safetensors_give_the_same_embeddings(hf_clips, tmp_path):
    # open_clip files carry no activation: these are the "test" shapes, which use GELU like every ViT-H.
    oracle = hf_clips["gelu"]
    open_clip_state = transformers_to_open_clip(oracle["state"])
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in open_clip_state
    # HPSv2's release: a pickle {"state_dict": ...}, here also with DistributedDataParallel's "module." prefix.
    pickle_path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in open_clip_state.items()}}, pickle_path)
    save_file(open_clip_state, tmp_path / "hpsv2.safetensors")
    for path in (pickle_path, tmp_path / "hpsv2.safetensors"):
        model = load_clip(path)
        assert model.layout is Layout.OPEN_CLIP
        check_clip(model, oracle)


# ---------------------------------------------------------------------------------------------------------
# Config inference at full size, on the meta device (no memory)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit-l-14", "vit-h-14"])
def test_full_size_configs_are_inferred_from_shapes_in_both_layouts(name):
    with torch.device("meta"):
        state = CLIPModel(CONFIGS[name]).state_dict()
    # Heads and activation are not in the shapes: ViT-L/14 must come out quick_gelu, ViT-H/14 GELU with
    # 16 vision heads of width 80.
    assert infer_clip_config(state) == CONFIGS[name]
    converted = open_clip_to_transformers(transformers_to_open_clip(state))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in state.items()}
    assert infer_clip_config(converted, layout=Layout.OPEN_CLIP) == CONFIGS[name]


# ---------------------------------------------------------------------------------------------------------
# Bad input: a WeightsError that names the problem
# ---------------------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_clip(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="not found"):
        load_text_encoder(tmp_path / "nowhere.safetensors")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no CLIP weights in .*model.safetensors"):
        load_clip(tmp_path)
    with pytest.raises(WeightsError, match="no text encoder weights"):
        load_text_encoder(tmp_path)


def test_truncated_and_corrupt_safetensors(hf_texts, tmp_path):
    data = (hf_texts["gelu"]["folder"] / "model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 100)
    for name in ("truncated.safetensors", "corrupt.safetensors"):
        with pytest.raises(WeightsError, match="not a readable safetensors file"):
            load_text_encoder(tmp_path / name)


def test_state_dict_of_the_wrong_model(hf_clips, hf_texts, tmp_path):
    hf_text = hf_texts["gelu"]
    save_file(hf_text["state"], tmp_path / "text_encoder.safetensors")
    with pytest.raises(WeightsError, match="no 'vision_model.embeddings.patch_embedding.weight'"):
        load_clip(tmp_path / "text_encoder.safetensors")  # a text encoder is not a CLIPModel
    with pytest.raises(WeightsError, match=r"unexpected \d+ keys: logit_scale"):
        load_text_encoder(hf_clips["gelu"]["folder"])  # a whole CLIPModel is not a text encoder
    unet = {"conv_in.weight": torch.zeros(320, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(1280, 320)}
    save_file(unet, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="not the CLIP model expected"):
        load_text_encoder(tmp_path / "diffusion_pytorch_model.safetensors")
    wrong_shape = dict(hf_text["state"])
    wrong_shape["text_model.final_layer_norm.weight"] = torch.zeros(64)
    save_file(wrong_shape, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"wrong shapes: text_model.final_layer_norm.weight \(64,\)"):
        load_text_encoder(tmp_path / "model.safetensors")


def test_pickle_that_needs_full_unpickling(hf_texts, tmp_path):
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": hf_texts["gelu"]["state"], "args": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(WeightsError, match="unsafe"):
        load_clip(path)
