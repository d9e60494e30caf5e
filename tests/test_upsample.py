"""model/upsample.py: the folded (sub-pixel) upsample-then-conv gives diffusers' Upsample2D output within float
rounding (1e-5 relative: the folded taps are summed before they multiply), in either memory format, follows
every change to the weight, is traced into compiled graphs, and leaves training, LoRA-wrapped convs and odd
sizes on the plain path. The whole UNet and VAE are held to diffusers by test_unet_vae.py, which runs this
path too."""
import copy

from diffusers.models.upsampling import Upsample2D
import pytest
import torch
import torch.nn.functional as F

from model import upsample
from model.lora import inject_lora
from model.packed_conv import Conv2d
from model.upsample import Upsample

TOLERANCE = 1e-5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def plain(up: Upsample, x: torch.Tensor, size=None) -> torch.Tensor:
    """Nearest upsampling, then the 3×3 conv, as written."""
    scaled = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
    return F.conv2d(scaled, up.conv.weight, up.conv.bias, padding=1)


@pytest.fixture
def folds(monkeypatch) -> list:
    """One entry per time Upsample builds its folded conv."""
    made, original = [], upsample.folded_conv

    def recording(conv):
        made.append(conv.weight.shape)
        return original(conv)

    monkeypatch.setattr(upsample, "folded_conv", recording)
    return made


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("height, width", [(8, 8), (5, 7), (1, 1)])
def test_folded_path_matches_diffusers_upsample2d(layout, height, width, folds):
    torch.manual_seed(0)
    reference = Upsample2D(16, use_conv=True).eval()
    up = Upsample(16)
    up.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, height, width).contiguous(memory_format=layout)
    with torch.no_grad():
        out = up(x, (2 * height, 2 * width))
        assert relative_error(out, reference(x)) <= TOLERANCE
        assert relative_error(up(x), reference(x)) <= TOLERANCE
    assert len(folds) == 1  # made once, reused by the second call
    assert out.shape == (2, 16, 2 * height, 2 * width)
    assert out.is_contiguous(memory_format=layout) or height * width == 1  # 1×1 fits both: it stays contiguous


def test_autograd_odd_sizes_and_lora_take_the_plain_path(folds):
    torch.manual_seed(0)
    up = Upsample(8)
    x = torch.randn(1, 8, 5, 4)
    assert torch.equal(up(x), plain(up, x))  # grad enabled: training gets the conv as written
    with torch.no_grad():
        assert torch.equal(up(x, (9, 8)), plain(up, x, (9, 8)))  # 9 is not 2 × 5
        holder = torch.nn.Module()
        holder.up = up
        inject_lora(holder, rank=2, patterns=[r"up\.conv$"])
        torch.nn.init.normal_(up.conv.lora_up.weight)  # a LoRA delta the 3×3 weight alone does not hold
        assert torch.equal(up(x), up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
    assert folds == []


def test_folded_kernels_follow_weight_changes_and_copies(folds):
    torch.manual_seed(0)
    up = Upsample(8)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        up(x)
        up.conv.weight.mul_(-2)  # an in-place write, as a merge or an optimizer step makes
        assert relative_error(up(x), plain(up, x)) <= TOLERANCE
        up.conv.bias.add_(1)
        assert relative_error(up(x), plain(up, x)) <= TOLERANCE
        assert len(folds) == 3
        twin = copy.deepcopy(up)
        assert "_phase_conv" not in twin.__dict__
        assert torch.equal(twin(x), up(x))
        up.double()
        assert "_phase_conv" not in up.__dict__  # .to() frees the old kernels at once
        expected = up(x.double())
        assert relative_error(expected, plain(up, x.double())) <= 1e-12
    up.__dict__.pop("_phase_conv")
    with torch.inference_mode():  # kernels made here must stay normal tensors, which oneDNN can lay out
        assert torch.equal(up(x.double()), expected)
        assert not up.phase_conv().weight.is_inference()


def test_the_folded_conv_is_a_laid_out_conv():
    """The 2×2 conv is model/packed_conv.py's Conv2d, so CPU inference also reuses its oneDNN layout."""
    with torch.no_grad():
        assert type(Upsample(8).phase_conv()) is Conv2d


def test_compiled_upsampling_folds_inside_one_graph(monkeypatch):
    """Under torch.compile (fullgraph: a break fails) the fold is traced into the graph, not read from the cache."""
    traced, original = [], upsample.phase_kernels

    def recording(weight):
        traced.append(tuple(weight.shape))
        return original(weight)

    monkeypatch.setattr(upsample, "phase_kernels", recording)
    torch._dynamo.reset()
    torch.manual_seed(0)
    reference = Upsample2D(8, use_conv=True).eval()
    up = Upsample(8)
    up.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = torch.compile(up, fullgraph=True)(x)
        assert relative_error(out, reference(x)) <= TOLERANCE
    torch._dynamo.reset()
    assert traced == [(8, 8, 3, 3)] and "_phase_conv" not in up.__dict__
