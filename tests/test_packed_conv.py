"""model/packed_conv.py: CPU inference on a laid-out conv weight gives nn.Conv2d's output within float rounding
(1e-5 relative: oneDNN sums in another order), follows every change to the weight, and stays out of
training, autocast and inference-mode weights. The whole UNet and VAE are held to diffusers by
test_unet_vae.py, which runs this path too."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.lora import inject_lora
from model.packed_conv import Conv2d

TOLERANCE = 1e-5


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def expected(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture
def layouts_made(monkeypatch) -> list:
    """The input shapes Conv2d.laid_out_weight is asked for: one entry per laid-out call."""
    seen, original = [], Conv2d.laid_out_weight

    def recording(self, shape):
        seen.append(tuple(shape))
        return original(self, shape)

    monkeypatch.setattr(Conv2d, "laid_out_weight", recording)
    return seen


@pytest.mark.parametrize("weight_layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("options", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                     dict(kernel_size=1), dict(kernel_size=3, bias=False)])
def test_channels_last_inference_gives_nn_conv2d_output_and_layout(weight_layout, options, layouts_made):
    torch.manual_seed(0)
    conv = Conv2d(16, 24, **options).to(memory_format=weight_layout)
    x = channels_last(torch.randn(2, 16, 12, 12))
    with torch.no_grad():
        out = conv(x)
        assert layouts_made == [tuple(x.shape)]
        assert relative_error(out, expected(conv, x)) <= TOLERANCE
        assert out.stride() == expected(conv, x).stride()
        plain = x.contiguous()  # a contiguous input keeps nn.Conv2d's path, and so its layout
        assert torch.equal(conv(plain), expected(conv, plain))
        assert conv(plain).stride() == expected(conv, plain).stride()
    assert len(layouts_made) == 1


def test_every_change_to_the_weight_or_the_input_shape_lays_it_out_again(layouts_made):
    torch.manual_seed(0)
    conv, x = Conv2d(8, 8, 3, padding=1), channels_last(torch.randn(1, 8, 6, 6))
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(-2)  # in place: an optimizer step or a LoRA merge
        doubled = conv(x)
        assert relative_error(doubled, expected(conv, x)) <= TOLERANCE and relative_error(doubled, first) > 1
        conv.load_state_dict({"weight": torch.ones_like(conv.weight), "bias": conv.bias.clone()})
        assert relative_error(conv(x), expected(conv, x)) <= TOLERANCE
        conv.load_state_dict({"weight": torch.randn_like(conv.weight), "bias": conv.bias.clone()}, assign=True)
        assert relative_error(conv(x), expected(conv, x)) <= TOLERANCE
        wider = channels_last(torch.randn(3, 8, 10, 10))
        assert relative_error(conv(wider), expected(conv, wider)) <= TOLERANCE
        conv(wider)  # nothing changed: the laid-out weight is reused
    assert len(layouts_made) == 6


def test_a_lora_merge_in_place_is_seen_by_the_next_forward():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2d(8, 8, 3, padding=1))
    inject_lora(model, rank=2, patterns=[r"^0$"])
    layer = model[0]
    nn.init.normal_(layer.lora_up.weight)
    x = channels_last(torch.randn(1, 8, 6, 6))
    with torch.no_grad():
        base = F.conv2d(x, layer.weight, layer.bias, padding=1)
        with_branch = model(x)  # lays out the unmerged base weight
        layer.merge()
        assert relative_error(model(x), with_branch) <= TOLERANCE
        assert relative_error(with_branch, base) > 1e-2  # the branch really changed the output


def test_training_autocast_and_inference_mode_weights_take_the_plain_path(layouts_made):
    torch.manual_seed(0)
    conv, x = Conv2d(8, 8, 3, padding=1), channels_last(torch.randn(1, 8, 6, 6))
    conv(x).sum().backward()  # autograd: the weight's gradient comes from nn.Conv2d's own path
    assert conv.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with torch.inference_mode():
        frozen = Conv2d(8, 8, 3, padding=1)  # inference tensors: in-place changes would go unseen
        assert relative_error(frozen(x), expected(frozen, x)) <= TOLERANCE
    assert layouts_made == []


def test_bf16_is_laid_out_only_where_onednn_has_bf16_kernels(layouts_made):
    torch.manual_seed(0)
    conv = Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    x = channels_last(torch.randn(1, 8, 6, 6, dtype=torch.bfloat16))
    with torch.no_grad():
        assert relative_error(conv(x), expected(conv, x)) <= 1e-2  # bf16 keeps 8 bits of mantissa
    assert len(layouts_made) == int(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_a_conv_that_has_run_can_still_be_copied_saved_and_moved(layouts_made):
    """The laid-out weight is an opaque oneDNN tensor, which deepcopy and pickling cannot copy: it stays behind."""
    torch.manual_seed(0)
    conv, x = Conv2d(8, 8, 3, padding=1), channels_last(torch.randn(1, 8, 6, 6))
    with torch.no_grad():
        out = conv(x)
        twin = copy.deepcopy(conv)
        torch.save(conv, io.BytesIO())
        assert torch.equal(twin(x), out)  # the copy laid out its own
        half = conv.to(torch.bfloat16)
        assert relative_error(half(x.bfloat16()), out) <= 1e-2
    assert len(layouts_made) == 2 + int(torch.ops.mkldnn._is_mkldnn_bf16_supported())
