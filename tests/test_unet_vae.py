"""The SD-1.5 UNet and VAE (model/unet.py, model/vae.py): exact architecture, call conventions, checkpointing.

Loading real checkpoint layouts and parity after loading are in test_sd_loading.py.
"""
import ast
import dataclasses
from collections import Counter
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from model.speed import prefer_channels_last
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel
from model.upsample import Upsample
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL, posterior_sample, to_uint8

# The public runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json, the parts that matter.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# The same architecture as our "test" configs.
TEST_UNET_CONFIG = dict(
    sample_size=8, layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TEST_VAE_CONFIG = dict(
    layers_per_block=1, block_out_channels=(32, 64), sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("ours, theirs, config, tensors, params", [
    (UNet2DConditionModel, diffusers.UNet2DConditionModel, SD15_UNET_CONFIG, 686, 859_520_964),
    (AutoencoderKL, diffusers.AutoencoderKL, SD15_VAE_CONFIG, 248, 83_653_863),
])
def test_full_sd15_architecture_matches_diffusers_on_meta(ours, theirs, config, tensors, params):
    with torch.device("meta"):
        model = ours()  # the default config is sd15
        reference = theirs(**config)
    assert len(model.state_dict()) == tensors  # the public SD-1.5 files' totals
    assert sum(p.numel() for p in model.parameters()) == params
    assert shapes(model) == shapes(reference)


def model_pair(ours, theirs, config, reference_config):
    """Our model and diffusers' with the same random weights."""
    torch.manual_seed(0)
    reference = theirs(**reference_config).eval()
    model = ours(config).eval()
    model.load_state_dict(reference.state_dict())
    return model, reference


def unet_pair():
    return model_pair(UNet2DConditionModel, diffusers.UNet2DConditionModel, UNET_CONFIGS["test"], TEST_UNET_CONFIG)


def vae_pair():
    return model_pair(AutoencoderKL, diffusers.AutoencoderKL, VAE_CONFIGS["test"], TEST_VAE_CONFIG)


@pytest.mark.parametrize("height, width", [(8, 8), (9, 7)])  # 9×7: odd sizes on the way down
def test_unet_matches_diffusers_at_any_latent_size(height, width):
    unet, reference = unet_pair()
    latents, context = torch.randn(2, 4, height, width), torch.randn(2, 240, 32)
    timesteps = torch.tensor([3, 977])
    with torch.no_grad():
        assert relative_error(unet(latents, timesteps, context),
                              reference(latents, timesteps, context).sample) <= 1e-5


def test_unet_timestep_forms_agree():
    unet, _ = unet_pair()
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = unet(latents, torch.tensor([500, 500]), context)
        for timesteps in (500, 500.0, torch.tensor(500), torch.tensor([500])):
            torch.testing.assert_close(unet(latents, timesteps, context), expected, rtol=0, atol=0)
        assert not torch.allclose(unet(latents, 499, context), expected)


def test_unet_rejects_bad_context_and_timesteps():
    unet = UNet2DConditionModel(UNET_CONFIGS["test"])
    latents = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="context must be"):
        unet(latents, 1, torch.randn(2, 77, 768))
    with pytest.raises(ValueError, match="timesteps must be"):
        unet(latents, torch.tensor([1, 2, 3]), torch.randn(2, 77, 32))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="cross_attention"):
        type(UNET_CONFIGS["test"])(block_out_channels=(32, 64), cross_attention=(True,))
    with pytest.raises(ValueError, match="divisible"):
        type(VAE_CONFIGS["test"])(block_out_channels=(48, 64))


def test_vae_matches_diffusers():
    vae, reference = vae_pair()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(image)
        posterior = reference.encode(image).latent_dist
        assert relative_error(mean, posterior.mean) <= 1e-4
        assert relative_error(logvar, posterior.logvar) <= 1e-4
        assert relative_error(vae.decode(mean), reference.decode(mean).sample) <= 1e-4
    assert mean.shape == (2, 4, 32 // vae.downsample_factor, 32 // vae.downsample_factor)
    assert vae.scaling_factor == 0.18215


def test_vae_clamps_logvar():
    vae = AutoencoderKL(VAE_CONFIGS["test"]).eval()
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 100.0  # the logvar half of the moments
        _, logvar = vae.encode(torch.zeros(1, 3, 16, 16))
    assert logvar.max().item() == 20.0


def gradients(model, run):
    model.zero_grad()
    out = run()
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_gradient_checkpointing_gives_same_output_and_gradients(which):
    torch.manual_seed(0)
    if which == "unet":
        model = UNet2DConditionModel(UNET_CONFIGS["test"])
        latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 240, 32)
        run = lambda: model(latents, torch.tensor([10, 700]), context)  # noqa: E731
    else:
        model = AutoencoderKL(VAE_CONFIGS["test"])
        latents = torch.randn(1, 4, 8, 8)
        run = lambda: model.decode(latents) + model.encode(model.decode(latents))[0].mean()  # noqa: E731
    plain_out, plain_grads = gradients(model, run)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt_out, ckpt_grads = gradients(model, run)
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_runs_in_bfloat16():
    unet, _ = unet_pair()
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        full = unet(latents, 400, context)
        half = unet.to(torch.bfloat16)(latents.bfloat16(), 400, context.bfloat16())
    assert half.dtype == torch.bfloat16
    assert relative_error(half.float(), full) < 0.05


def conv_inputs_channels_last(model, run):
    """Run ``run()`` and say whether every conv of ``model`` after the first (which reads the caller's
    contiguous tensor) read its input NHWC."""
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda module, args: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        out = run()
    finally:
        for hook in hooks:
            hook.remove()
    return out, len(layouts) > 1 and all(layouts[1:])


def test_channels_last_keeps_parity_and_its_layout_through_every_conv():
    unet, reference = unet_pair()
    latents, context, timesteps = torch.randn(2, 4, 9, 7), torch.randn(2, 77, 32), torch.tensor([3, 977])
    vae, vae_reference = vae_pair()
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert prefer_channels_last(unet) is unet and prefer_channels_last(vae) is vae
    with torch.no_grad():
        eps, unet_nhwc = conv_inputs_channels_last(unet, lambda: unet(latents, timesteps, context))
        assert relative_error(eps, reference(latents, timesteps, context).sample) <= 1e-5
        (mean, _), encoder_nhwc = conv_inputs_channels_last(vae, lambda: vae.encode(image))
        decoded, decoder_nhwc = conv_inputs_channels_last(vae, lambda: vae.decode(mean))
        assert relative_error(mean, vae_reference.encode(image).latent_dist.mean) <= 1e-4
        assert relative_error(decoded, vae_reference.decode(mean).sample) <= 1e-4
    assert unet_nhwc and encoder_nhwc and decoder_nhwc  # GroupNorm, attention reshapes, concat: no copy back
    assert eps.is_contiguous() and mean.is_contiguous() and decoded.is_contiguous()  # callers see plain tensors


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # said when mkldnn.flags is entered
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_in_place_inference_gives_the_bits_of_the_graph_recording_path(layout, monkeypatch):
    """Without autograd the residual adds and activations write into fresh results; that must change no bit
    (and never overwrite a tensor something else still reads, such as a skip connection). oneDNN is off and
    the upsampling's folded kernels too, so both paths run the same convolutions (inference would otherwise
    also take model/packed_conv.py's laid-out weights and model/upsample.py's folded kernels, whose rounding
    differs: tests/test_speed.py and tests/test_upsample.py bound that)."""
    monkeypatch.setattr(Upsample, "_folding_applies", lambda self, x, size: False)
    unet, _ = unet_pair()
    vae, _ = vae_pair()
    if layout == "channels_last":
        prefer_channels_last(unet), prefer_channels_last(vae)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 240, 32)
    run = lambda: (unet(latents, torch.tensor([10, 700]), context), vae.decode(latents[:1]))  # noqa: E731
    with torch.backends.mkldnn.flags(enabled=False):
        recorded = [t.detach() for t in run()]  # parameters require grad: the out-of-place path
        with torch.no_grad():
            in_place = run()
    assert all(torch.equal(a, b) for a, b in zip(in_place, recorded))


def test_scaling_factor_lives_in_the_config_only():
    vae = AutoencoderKL(VAE_CONFIGS["test"])
    with pytest.raises(AttributeError):
        vae.scaling_factor = 0.5
    vae.config = dataclasses.replace(vae.config, scaling_factor=0.5)
    assert vae.scaling_factor == 0.5


def test_latent_shape_follows_the_downsample_factor():
    with torch.device("meta"):
        sd15 = AutoencoderKL()
    assert sd15.latent_shape(2, 512, 768) == (2, 4, 64, 96)
    assert AutoencoderKL(VAE_CONFIGS["test"]).latent_shape(1, 6, 10) == (1, 4, 3, 5)
    with pytest.raises(ValueError, match="multiple of the VAE's downsample factor 8"):
        sd15.latent_shape(1, 512, 500)


def test_posterior_sample_matches_diffusers():
    mean, logvar = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    expected = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample(
        generator=torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(posterior_sample(mean, logvar, noise), expected)


def test_to_uint8_rounds_clamps_and_moves_channels_last():
    images = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).repeat(3, 1)[:, None, :]  # [3, 1, 7]
    pixels = to_uint8(images.to(torch.float16))
    assert pixels.dtype == torch.uint8 and pixels.device.type == "cpu" and pixels.shape == (1, 7, 3)
    # (x + 1) · 127.5, rounded half to even: -0.5 -> 63.75 -> 64, 0 -> 127.5 -> 128, 0.999 -> 254.87 -> 255
    assert pixels[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]
    batch = torch.rand(2, 5, 3, 4, 6) * 2 - 1
    assert to_uint8(batch).shape == (2, 5, 4, 6, 3)
    pixel = batch[1, 2, :, 3, 5]  # the three channels of one pixel
    assert torch.equal(to_uint8(batch)[1, 2, 3, 5], to_uint8(pixel[:, None, None])[0, 0])


def test_no_class_name_is_defined_in_two_model_files():
    names = Counter()
    for path in sorted((Path(__file__).resolve().parents[1] / "model").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names.update({node.name for node in tree.body if isinstance(node, ast.ClassDef)})
    assert [name for name, count in names.items() if count > 1] == []
