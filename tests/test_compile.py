"""torch.compile(fullgraph=True) on the test-size UNet, VAE decoder, CLIP text encoder and T5 encoder: no graph
breaks, and the compiled outputs (and the UNet's gradients) equal the eager ones within 1e-4.

fullgraph=True turns any graph break into an error, so each test fails on a break. Compiling on the CPU takes
seconds to tens of seconds per model; these are the smallest configs.
"""
import pytest
import torch

from model.clip import CONFIGS as CLIP_CONFIGS
from model.clip import CLIPModel, CLIPTextModel
from model.t5 import CONFIGS as T5_CONFIGS
from model.t5 import T5EncoderModel
from model.speed import prefer_channels_last
from model.tokenizer import CLIPTokenizer, frame
from model.unet import CONFIGS as UNET_CONFIGS
from model.unet import UNet2DConditionModel
from model.vae import CONFIGS as VAE_CONFIGS
from model.vae import AutoencoderKL

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()  # each test compiles from scratch: no cached graph hides a break
    yield
    torch._dynamo.reset()


def close(compiled: torch.Tensor, eager: torch.Tensor) -> bool:
    return bool((compiled - eager).abs().max() <= TOLERANCE * max(1.0, eager.abs().max().item()))


def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    return latents, torch.randn(2, 7, UNET_CONFIGS["test"].cross_attention_dim, generator=generator)


def test_unet_compiles_whole_and_matches_eager_with_gradients():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNET_CONFIGS["test"])
    compiled = torch.compile(unet, fullgraph=True)
    latents, context = unet_inputs()
    with torch.no_grad():  # a sampling loop: a new Python number each step, past dynamo's 8 recompiles
        for step in range(999, 0, -100):
            assert close(compiled(latents, step, context), unet(latents, step, context)), step

    grads, timesteps = [], torch.tensor([10, 500])
    for model in (unet, compiled):  # an SFT-style step: gradient of a loss on the prediction
        unet.zero_grad()
        model(latents, timesteps, context).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in unet.named_parameters()})
    assert all(close(grads[1][name], grads[0][name]) for name in grads[0])


def test_vae_decoder_compiles_whole_and_matches_eager():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS["test"]).eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert close(torch.compile(vae.decode, fullgraph=True)(latents), vae.decode(latents))


def test_channels_last_bf16_unet_and_decoder_compile_whole():
    """As sample.py runs them on a bf16 CPU: channels-last, bf16, no autograd. Eager takes the laid-out weight
    path there, whose checks must stay out of the traced graph. bf16 rounds differently when fused: 5%."""
    torch.manual_seed(0)
    unet = prefer_channels_last(UNet2DConditionModel(UNET_CONFIGS["test"]).eval().to(torch.bfloat16))
    decoder = prefer_channels_last(AutoencoderKL(VAE_CONFIGS["test"]).eval().to(torch.bfloat16)).decode
    latents, context = (t.to(torch.bfloat16) for t in unet_inputs())
    with torch.no_grad():
        for model, inputs in ((unet, (latents, 500, context)), (decoder, (latents[:1],))):
            compiled, eager = torch.compile(model, fullgraph=True)(*inputs).float(), model(*inputs).float()
            assert ((compiled - eager).abs().max() / eager.abs().max()).item() <= 0.05


def test_clip_text_encoder_compiles_whole_and_matches_eager():
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIP_CONFIGS["test"].text).eval()
    tokenizer = CLIPTokenizer()
    ids = torch.tensor([frame(tokenizer.encode(text)) for text in ("A red fox.", "Snow falls on the hills.")])
    with torch.no_grad():
        assert close(torch.compile(text_encoder, fullgraph=True)(ids), text_encoder(ids))
    # the data checks stay in eager mode
    with pytest.raises(ValueError, match="0..49407"):
        text_encoder(torch.tensor([[49406, 49408, 49407]]))


def test_scorer_text_embedding_compiles_whole():
    torch.manual_seed(0)
    clip = CLIPModel(CLIP_CONFIGS["test"]).eval()
    ids = torch.tensor([frame(CLIPTokenizer().encode("A red fox."), 77, 0)])
    with torch.no_grad():
        assert close(torch.compile(clip.encode_text, fullgraph=True)(ids), clip.encode_text(ids))


def test_t5_encoder_compiles_whole_and_matches_eager():
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5_CONFIGS["test"]).eval()
    # the release's 240 ids, far enough apart for the logarithmic position buckets
    ids = torch.randint(T5_CONFIGS["test"].vocab_size, (2, 240), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert close(torch.compile(t5, fullgraph=True)(ids), t5(ids))
