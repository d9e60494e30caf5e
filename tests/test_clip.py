"""The hand-written CLIP (model/clip.py): key layout at full size, pooling, masking, and scorer preprocessing.

Numerical parity with transformers is checked through the loaders, in test_clip_loading.py.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPImageProcessorPil

from model.clip import (CLIP_MEAN, CLIP_STD, CONFIGS, CLIPAttention, CLIPModel, CLIPTextModel, TextConfig,
                        pil_to_tensor, preprocess_images, preprocess_tensor, trimmed_length)
from model.tokenizer import EOT, CLIPTokenizer, frame

# The public numbers (the openai/clip-vit-large-patch14 and laion CLIP-ViT-H-14 config.json files), written
# out independently of CONFIGS.
HF_VIT_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
HF_VIT_H = dict(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    projection_dim=1024)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def with_text_model_prefix(keys_to_shapes):
    # transformers >= 5 builds CLIPTextModel without its "text_model." wrapper; the public files keep it.
    return {(k if k.startswith("text_model.") else "text_model." + k): s for k, s in keys_to_shapes.items()}


# ---------------------------------------------------------------------------------------------------------
# Full-size key layout, on the meta device (no memory)
# ---------------------------------------------------------------------------------------------------------

def test_vit_l_text_encoder_keys_and_shapes_match_transformers_and_sd15():
    with torch.device("meta"):
        ours = CLIPTextModel(CONFIGS["vit-l-14"].text)
        theirs = HFCLIPTextModel(HFCLIPTextConfig(**HF_VIT_L_TEXT))
    assert shapes(ours) == with_text_model_prefix(shapes(theirs))
    # SD-1.5's text_encoder/model.safetensors: 196 tensors, 123,060,480 parameters.
    assert len(shapes(ours)) == 196
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    assert ours.hidden_size == 768


def test_vit_h_clip_model_keys_and_shapes_match_transformers():
    with torch.device("meta"):
        ours = CLIPModel(CONFIGS["vit-h-14"])
        theirs = HFCLIPModel(HFCLIPConfig(**HF_VIT_H))
    assert shapes(ours) == shapes(theirs)
    assert ours.vision_model.config.heads == 16 and ours.vision_model.config.width == 1280  # 80-wide heads


def test_both_towers_share_one_block_class():
    model = CLIPModel(CONFIGS["test"])
    attention_classes = {type(m) for m in model.modules() if "Attention" in type(m).__name__}
    assert attention_classes == {CLIPAttention}
    assert type(model.text_model.encoder.layers[0]) is type(model.vision_model.encoder.layers[0])
    assert model.text_model.encoder.layers[0].self_attn.causal
    assert not model.vision_model.encoder.layers[0].self_attn.causal


# ---------------------------------------------------------------------------------------------------------
# Text tower behaviour
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_clip():
    torch.manual_seed(0)
    return CLIPModel(CONFIGS["test"]).eval()


def test_pool_takes_the_first_eot(small_clip):
    ids = torch.tensor([[49406, 320, EOT, EOT, EOT], [49406, 320, 1125, 536, EOT]])
    hidden = torch.randn(2, 5, 8)
    pooled = small_clip.text_model.pool(hidden, ids)
    assert torch.equal(pooled, torch.stack([hidden[0, 2], hidden[1, 4]]))


def test_text_is_causal(small_clip):
    ids = torch.randint(0, 49406, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = torch.randint(0, 49406, (5,))
    with torch.no_grad():
        a, b = small_clip.text_model(ids), small_clip.text_model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_trimmed_length_rounds_up_to_16_within_the_positions():
    assert [trimmed_length(n, 77) for n in (1, 16, 17, 33, 64, 65, 77)] == [16, 16, 32, 48, 64, 77, 77]
    assert trimmed_length(5, 8) == 8


@pytest.mark.parametrize("pad_id", [EOT, 0])  # SD-1.5 pads with <eot>, open_clip (HPSv2) with 0
def test_text_embedding_encodes_only_through_the_first_eot_bit_for_bit(small_clip, pad_id):
    tokenizer = CLIPTokenizer()
    texts = ["A red fox.", "A small brown dog walks across an old stone bridge in the morning mist.", ""]
    ids = torch.tensor([frame(tokenizer.encode(text), 77, pad_id) for text in texts])
    seen = []
    hook = small_clip.text_model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            got = small_clip.encode_text(ids)
    finally:
        hook.remove()
    longest = 1 + max(len(tokenizer.encode(text)) for text in texts) + 1  # <sot> + text + <eot>
    assert seen == [trimmed_length(longest, 77)] == [32]
    with torch.no_grad():  # all 77 positions, pooled at the first <eot>, projected: the untrimmed path
        hidden = small_clip.text_model(ids)
        expected = small_clip.text_projection(small_clip.text_model.pool(hidden, ids))
    assert torch.equal(got, expected)  # bit for bit on one CPU thread, as the tests run


def test_bad_text_input_is_reported(small_clip):
    with pytest.raises(ValueError, match="needs an <eot>"):
        small_clip.encode_text(torch.full((1, 5), 320))
    with pytest.raises(ValueError, match="77 positions"):
        small_clip.text_model(torch.full((1, 78), EOT))
    with pytest.raises(ValueError, match="0..49407"):
        small_clip.text_model(torch.tensor([[49406, 49408, EOT]]))
    with pytest.raises(ValueError, match="integer tensor"):
        small_clip.text_model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"\[batch, 3, 224, 224\]"):
        small_clip.encode_image(torch.zeros(1, 3, 256, 256))


def test_bad_configs_are_reported():
    with pytest.raises(ValueError, match="unknown activation"):
        TextConfig(width=64, layers=1, heads=1, mlp=64, act="relu", vocab_size=10, max_positions=8)
    with pytest.raises(ValueError, match="does not split"):
        TextConfig(width=64, layers=1, heads=3, mlp=64, act="gelu", vocab_size=10, max_positions=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(small_clip, dtype):
    ids = torch.tensor([[49406, 320, 1125, EOT, EOT]])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = torch.cat([small_clip.encode_text(ids), small_clip.encode_image(pixels)])
        half = CLIPModel(CONFIGS["test"]).eval()
        half.load_state_dict(small_clip.state_dict())
        half.to(dtype)
        result = torch.cat([half.encode_text(ids), half.encode_image(pixels)])  # fp32 pixels are cast inside
    assert result.dtype == dtype
    # bf16 keeps 8 significant bits, fp16 11: a few percent at most through 2 layers.
    assert (result.float() - reference).abs().max() <= 0.05 * reference.abs().max()


# ---------------------------------------------------------------------------------------------------------
# Scorer preprocessing
# ---------------------------------------------------------------------------------------------------------

def natural_like_image(height, width, seed, mode="RGB"):
    """Smooth gradients and blobs plus mild noise: closer to a photo than pure noise, which is the worst case
    for comparing two bicubic implementations."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)]
    image = 0.5 + 0.35 * np.stack(channels, -1) + 0.05 * rng.standard_normal((height, width, 3))
    image[height // 4: height // 2, width // 3: width // 2] = rng.random(3)  # a hard-edged block
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).convert(mode)


def error_in_8_bit_levels(ours, theirs):
    """|ours - theirs| undone from normalization and counted in steps of 1/255."""
    return (ours - theirs).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255


# PIL resizes 8-bit images and rounds its output to 8 bits; torch resizes in fp32 and does not round. The
# filter is the same (bicubic, a = -0.5, antialiased when shrinking), so what remains is that rounding.
# Measured on these images: at most 1.06 levels, 0.26-0.30 levels on average (rounding alone gives 0.25).
MAX_LEVELS, MEAN_LEVELS = 1.5, 0.35


@pytest.mark.parametrize("height,width,mode", [(300, 451, "RGB"), (512, 512, "RGB"), (640, 200, "RGB"),
                                               (333, 250, "L"), (256, 300, "RGBA"), (224, 280, "P")])
def test_pil_preprocessing_matches_transformers_processor(height, width, mode):
    image = natural_like_image(height, width, seed=height, mode=mode)
    theirs = CLIPImageProcessorPil()(images=[image], return_tensors="pt")["pixel_values"]
    ours = preprocess_images([image])
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    error = error_in_8_bit_levels(ours, theirs)
    assert error.max() <= MAX_LEVELS and error.mean() <= MEAN_LEVELS, (float(error.max()), float(error.mean()))


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (300, 300), (10, 200, 30, 0))  # fully transparent
    assert torch.equal(pil_to_tensor(image), torch.ones(3, 300, 300))


def test_16_bit_grayscale_keeps_its_range():
    gray8 = np.asarray(natural_like_image(240, 260, seed=1, mode="L"), dtype=np.uint16)
    gray16 = Image.fromarray(gray8 * 257)  # 255 * 257 = 65535: the same picture, 16 bits
    assert gray16.mode.startswith("I")
    assert torch.allclose(pil_to_tensor(gray16), pil_to_tensor(Image.fromarray(gray8.astype(np.uint8))),
                          atol=1e-6)


def hpsv2_reference(image):
    """open_clip's ResizeMaxSize as HPSv2 uses it, in PIL: longest side to 224, paste on black, centred."""
    width, height = image.size
    scale = 224 / max(width, height)
    resized = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
    canvas = Image.new("RGB", (224, 224), (0, 0, 0))
    canvas.paste(resized, ((224 - resized.width) // 2, (224 - resized.height) // 2))
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1)
    return ((pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]


@pytest.mark.parametrize("height,width", [(300, 151), (200, 451)])
def test_hpsv2_pad_path(height, width):
    image = natural_like_image(height, width, seed=3)
    ours = preprocess_images([image], pad_to_square=True)
    assert ours.shape == (1, 3, 224, 224)
    error = error_in_8_bit_levels(ours, hpsv2_reference(image))
    assert error.max() <= MAX_LEVELS and error.mean() <= MEAN_LEVELS, (float(error.max()), float(error.mean()))
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1)
    if height > width:  # 300x151 -> 224x113: 55 black columns left, 56 right
        assert torch.allclose(ours[0, :, :, :55].flatten(1), black.expand(3, 224 * 55))
        assert torch.allclose(ours[0, :, :, -56:].flatten(1), black.expand(3, 224 * 56))
        assert not torch.allclose(ours[0, :, :, 55], black.expand(3, 224))
    else:  # 200x451 -> 99x224: 62 black rows above, 63 below
        assert torch.allclose(ours[0, :, :62].flatten(1), black.expand(3, 62 * 224))
        assert torch.allclose(ours[0, :, -63:].flatten(1), black.expand(3, 63 * 224))


def test_tensor_path_is_differentiable_and_batched():
    pixels = torch.rand(2, 3, 512, 512, requires_grad=True)
    for pad in (False, True):
        out = preprocess_tensor(pixels, pad_to_square=pad, random_crop=504)
        assert out.shape == (2, 3, 224, 224)
        out.square().mean().backward()
        assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
        pixels.grad = None


def release_reward_preprocessing(window: torch.Tensor, size: int) -> torch.Tensor:
    """The authors' release on a crop: torchvision's tensor Resize((size, size)) (bilinear, antialiased, no
    clamp), then CLIP's mean/std, written out with plain torch ops as the oracle."""
    resized = torch.nn.functional.interpolate(window, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (resized - mean) / std


def test_random_crop_is_one_window_then_the_release_resize():
    # The reward stage crops 504 of 512; a smaller picture keeps this search over every window fast.
    pixels = torch.rand(1, 3, 48, 48) * 1.2 - 0.1  # a VAE decode may leave [0, 1]; the release does not clamp
    out = preprocess_tensor(pixels, size=32, random_crop=44, generator=torch.Generator().manual_seed(7))
    again = preprocess_tensor(pixels, size=32, random_crop=44, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    windows = [(top, left) for top in range(5) for left in range(5) if torch.allclose(
        out, release_reward_preprocessing(pixels[..., top:top + 44, left:left + 44], 32), atol=1e-6, rtol=0)]
    assert len(windows) == 1
    others = [preprocess_tensor(pixels, size=32, random_crop=44, generator=torch.Generator().manual_seed(seed))
              for seed in range(8)]
    assert any(not torch.equal(out, other) for other in others)


def test_reward_preprocessing_gradient_equals_the_release():
    pixels = torch.rand(2, 3, 512, 512, requires_grad=True)
    weights = torch.randn(2, 3, 224, 224)
    (preprocess_tensor(pixels, random_crop=504, generator=torch.Generator().manual_seed(3)) * weights).sum().backward()
    ours, pixels.grad = pixels.grad, None
    generator = torch.Generator().manual_seed(3)  # the same window: top, then left, as the crop draws them
    top, left = (int(torch.randint(0, 9, (), generator=generator)) for _ in range(2))
    (release_reward_preprocessing(pixels[..., top:top + 504, left:left + 504], 224) * weights).sum().backward()
    torch.testing.assert_close(ours, pixels.grad, atol=1e-6, rtol=1e-5)


def test_tensor_and_pil_paths_agree():
    image = natural_like_image(300, 451, seed=5)
    as_tensor = pil_to_tensor(image)[None]
    assert torch.equal(preprocess_tensor(as_tensor), preprocess_images([image]))
    assert torch.equal(preprocess_tensor(as_tensor, pad_to_square=True), preprocess_images(image, pad_to_square=True))


def test_bad_preprocessing_input_is_reported():
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        preprocess_tensor(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="float images"):
        preprocess_tensor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="larger than"):
        preprocess_tensor(torch.rand(1, 3, 256, 256), random_crop=504)
    with pytest.raises(ValueError, match="PIL image"):
        preprocess_images([np.zeros((4, 4, 3))])
