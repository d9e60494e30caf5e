"""The SD-1.5 UNet and VAE (model/unet.py, model/vae.py): exact architecture, call conventions, checkpointing.

Loading real checkpoint layouts and parity after loading are in test_sd_loading.py.
"""
import diffusers
import pytest
import torch

from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL

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
# The same architecture as our "tiny" configs.
TINY_UNET_CONFIG = dict(
    sample_size=8, layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE_CONFIG = dict(
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
    assert len(model.state_dict()) == tensors  # FACTS.md §2 totals
    assert sum(p.numel() for p in model.parameters()) == params
    assert shapes(model) == shapes(reference)


def tiny_pair(seed=0):
    """Our tiny UNet and diffusers' with the same random weights."""
    torch.manual_seed(seed)
    reference = diffusers.UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    unet = UNet2DConditionModel(UNET_CONFIGS["tiny"]).eval()
    unet.load_state_dict(reference.state_dict())
    return unet, reference


@pytest.mark.parametrize("height, width", [(8, 8), (9, 7)])  # 9×7: odd sizes on the way down
def test_unet_matches_diffusers_at_any_latent_size(height, width):
    unet, reference = tiny_pair()
    latents, context = torch.randn(2, 4, height, width), torch.randn(2, 240, 32)
    timesteps = torch.tensor([3, 977])
    with torch.no_grad():
        assert relative_error(unet(latents, timesteps, context),
                              reference(latents, timesteps, context).sample) <= 1e-5


def test_unet_timestep_forms_agree():
    unet, _ = tiny_pair()
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = unet(latents, torch.tensor([500, 500]), context)
        for timesteps in (500, 500.0, torch.tensor(500), torch.tensor([500])):
            torch.testing.assert_close(unet(latents, timesteps, context), expected, rtol=0, atol=0)
        assert not torch.allclose(unet(latents, 499, context), expected)


def test_unet_rejects_bad_context_and_timesteps():
    unet = UNet2DConditionModel(UNET_CONFIGS["tiny"])
    latents = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="context must be"):
        unet(latents, 1, torch.randn(2, 77, 768))
    with pytest.raises(ValueError, match="timesteps must be"):
        unet(latents, torch.tensor([1, 2, 3]), torch.randn(2, 77, 32))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="cross_attention"):
        type(UNET_CONFIGS["tiny"])(block_out_channels=(32, 64), cross_attention=(True,))
    with pytest.raises(ValueError, match="divisible"):
        type(VAE_CONFIGS["tiny"])(block_out_channels=(48, 64))


def test_vae_matches_diffusers():
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**TINY_VAE_CONFIG).eval()
    vae = AutoencoderKL(VAE_CONFIGS["tiny"]).eval()
    vae.load_state_dict(reference.state_dict())
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
    vae = AutoencoderKL(VAE_CONFIGS["tiny"]).eval()
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
        model = UNet2DConditionModel(UNET_CONFIGS["tiny"])
        latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 240, 32)
        run = lambda: model(latents, torch.tensor([10, 700]), context)  # noqa: E731
    else:
        model = AutoencoderKL(VAE_CONFIGS["tiny"])
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
    unet, _ = tiny_pair()
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        full = unet(latents, 400, context)
        half = unet.to(torch.bfloat16)(latents.bfloat16(), 400, context.bfloat16())
    assert half.dtype == torch.bfloat16
    assert relative_error(half.float(), full) < 0.05
