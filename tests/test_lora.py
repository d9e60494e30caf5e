"""LoRA: injection is a no-op at init, merge == unmerged forward, unmerge restores, files round-trip,
fp32 master weights under a half-precision base, the release's placement (224 modules on SD-1.5), dropout in
train mode only, and stacking two LoRAs into one. Foreign file layouts: tests/test_lora_formats.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.lora import (LoRAConv2d, LoRALinear, inject_lora, load_lora, load_lora_state_dict, lora_layers,
                        lora_parameters, lora_state_dict, merge_and_unload, merge_lora, save_lora, stack_loras,
                        unmerge_lora)
from model.weights import WeightsError, save_state_dict


# A miniature with the UNet's attribute names (diffusers keys), small enough to run in milliseconds.
class ToyResnet(nn.Module):
    def __init__(self, cin, cout, temb):
        super().__init__()
        self.norm1 = nn.GroupNorm(2, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(temb)[:, :, None, None]
        return self.conv_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class ToyAttention(nn.Module):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, ctx):
        attn = F.scaled_dot_product_attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        return self.to_out[0](attn)


class ToyGEGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 8 * dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class ToyTransformerBlock(nn.Module):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.attn1 = ToyAttention(dim, dim)
        self.attn2 = ToyAttention(dim, ctx_dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([ToyGEGLU(dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x, ctx):
        x = x + self.attn1(x, x)
        x = x + self.attn2(x, ctx)
        h = x
        for layer in self.ff.net:
            h = layer(h)
        return x + h


class ToyTransformer2D(nn.Module):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([ToyTransformerBlock(dim, ctx_dim)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, ctx):
        b, c, h, w = x.shape
        tokens = self.proj_in(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        tokens = self.transformer_blocks[0](tokens, ctx)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class ToyUNet(nn.Module):
    def __init__(self, dim=8, temb=16, ctx_dim=12):
        super().__init__()
        self.conv_in = nn.Conv2d(4, dim, 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(1, temb)
        block = nn.Module()
        block.resnets = nn.ModuleList([ToyResnet(dim, dim, temb)])
        block.attentions = nn.ModuleList([ToyTransformer2D(dim, ctx_dim)])
        block.downsamplers = nn.ModuleList([nn.Module()])
        block.downsamplers[0].conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        self.down_blocks = nn.ModuleList([block])
        self.conv_out = nn.Conv2d(dim, 4, 3, padding=1)

    def forward(self, x, t, ctx):
        temb = self.time_embedding.linear_1(t[:, None])
        block = self.down_blocks[0]
        h = block.attentions[0](block.resnets[0](self.conv_in(x), temb), ctx)
        return self.conv_out(block.downsamplers[0].conv(h))


TOY_LORA_NAMES = [
    "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj", "down_blocks.0.resnets.0.conv2",
    "down_blocks.0.resnets.0.conv_shortcut",
    *[f"down_blocks.0.attentions.0.transformer_blocks.0.{attn}.{proj}"
      for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")],
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",  # not ff.net.2: it is outside GEGLU
]


def toy_model(seed=0):
    torch.manual_seed(seed)
    return ToyUNet()


def toy_inputs(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.rand(2, generator=g).to(dtype),
            torch.randn(2, 5, 12, generator=g).to(dtype))


def train_a_little(model, steps=5):
    """A few optimiser steps on the LoRA weights, so that up != 0 and the branches matter."""
    opt = torch.optim.Adam(lora_parameters(model), lr=1e-2)
    x, t, ctx = toy_inputs()
    for _ in range(steps):
        loss = model(x, t, ctx).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_default_patterns_hit_exactly_the_official_layers():
    model = toy_model()
    names = inject_lora(model, rank=4)
    assert names == TOY_LORA_NAMES  # not proj_in/proj_out, conv_in/out, the time embedding or resamplers
    assert all(isinstance(model.get_submodule(n), (LoRALinear, LoRAConv2d)) for n in names)


def test_output_unchanged_right_after_inject_and_only_lora_trains():
    model = toy_model()
    x, t, ctx = toy_inputs()
    with torch.no_grad():
        before = model(x, t, ctx)
    inject_lora(model, rank=4)
    with torch.no_grad():  # up = 0 adds exact zeros; only the memory layout seen by attention may differ
        torch.testing.assert_close(model(x, t, ctx), before, rtol=0, atol=1e-6)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(model)}
    assert len(lora_parameters(model)) == 2 * len(TOY_LORA_NAMES)


def test_initialisation_is_the_official_one():
    layer = nn.Linear(512, 256)
    torch.manual_seed(0)
    wrapped = LoRALinear(layer, rank=32, alpha=32)
    assert wrapped.lora_down.weight.shape == (32, 512) and wrapped.lora_up.weight.shape == (256, 32)
    assert torch.all(wrapped.lora_up.weight == 0)
    assert wrapped.lora_down.weight.std().item() == pytest.approx(1 / 32, rel=0.05)
    assert wrapped.scale == 1.0


def test_conv_adapter_shapes_follow_the_base_kernel():
    base = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    wrapped = LoRAConv2d(base, rank=3, alpha=3)
    assert wrapped.lora_down.kernel_size == (3, 3) and wrapped.lora_down.stride == (2, 2)
    assert wrapped.lora_down.padding == (1, 1) and wrapped.lora_up.kernel_size == (1, 1)
    assert wrapped.delta_weight().shape == base.weight.shape


def test_merge_equals_unmerged_forward_and_unmerge_restores_the_base():
    model = toy_model()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, ctx = toy_inputs()
    with torch.no_grad():
        base_out = model(x, t, ctx)
    inject_lora(model, rank=4, alpha=8)
    train_a_little(model)
    with torch.no_grad():
        unmerged = model(x, t, ctx)
        assert (unmerged - base_out).abs().max() > 1e-3  # the trained branches really change the output
        merge_lora(model)
        merged = model(x, t, ctx)
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(x, t, ctx), unmerged, rtol=0, atol=1e-5)
    restored = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert restored.keys() == base_weights.keys()
    for key, value in base_weights.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-6)


def test_merge_and_unload_gives_a_plain_model_with_the_base_keys():
    model = toy_model()
    keys = set(model.state_dict())
    inject_lora(model, rank=4)
    train_a_little(model)
    x, t, ctx = toy_inputs()
    with torch.no_grad():
        wrapped = model(x, t, ctx)
        merge_and_unload(model)
        torch.testing.assert_close(model(x, t, ctx), wrapped, rtol=0, atol=1e-5)
    assert not lora_layers(model) and set(model.state_dict()) == keys
    assert inject_lora(model, rank=2) == TOY_LORA_NAMES  # a fresh LoRA on top, as in Stage 2


def test_save_load_round_trip(tmp_path):
    model = toy_model()
    inject_lora(model, rank=4, alpha=2)
    train_a_little(model)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)
    x, t, ctx = toy_inputs()
    with torch.no_grad():
        expected = model(x, t, ctx)

    fresh = toy_model()  # no LoRA yet: load_lora injects it where the file says, with its rank and alpha
    assert load_lora(fresh, path) == TOY_LORA_NAMES
    with torch.no_grad():
        assert torch.equal(fresh(x, t, ctx), expected)
    for key, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[key], value)

    injected = toy_model()
    inject_lora(injected, rank=4)
    load_lora(injected, path)
    with torch.no_grad():
        assert torch.equal(injected(x, t, ctx), expected)


def test_load_errors_name_the_problem(tmp_path):
    model = toy_model()
    inject_lora(model, rank=4)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)

    other_rank = toy_model()
    inject_lora(other_rank, rank=2)
    with pytest.raises(WeightsError, match=r"(?s)detected layout: lora, from .*lora\.safetensors.*wrong shapes: "
                                           r".*lora_down\.weight \(4, .*expected \(2, "):
        load_lora(other_rank, path)

    fewer_layers = toy_model()
    inject_lora(fewer_layers, rank=4, patterns=[r"attn1\.to_q$"])
    with pytest.raises(WeightsError, match=r"unexpected 36 keys: .*"):
        load_lora(fewer_layers, path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 3)

    with pytest.raises(WeightsError, match="does not have: lora_unet_down_blocks_0_"):
        load_lora(Other(), path)
    save_state_dict(lora_state_dict(model), tmp_path / "dotted.safetensors")  # the older dotted layout
    with pytest.raises(WeightsError, match=r"does not have: down_blocks\.0\."):
        load_lora(Other(), tmp_path / "dotted.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_lora(toy_model(), tmp_path / "missing.safetensors")


def test_bad_injection_requests_are_clear_errors():
    model = toy_model()
    with pytest.raises(ValueError, match="no Linear or Conv2d module"):
        inject_lora(model, patterns=[r"nothing_here$"])
    inject_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA layers.*merge_and_unload"):
        inject_lora(model, rank=2)
    with pytest.raises(ValueError, match="has no LoRA layers to save"):
        save_lora(toy_model(), "unused.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_lora(dtype):
    model = toy_model()
    inject_lora(model, rank=4)
    train_a_little(model)
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    model.to(dtype)  # casting after injection must not touch the adapters (they are the master copy)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert model.down_blocks[0].resnets[0].conv1.weight.dtype == dtype
    for key, value in lora_state_dict(model).items():
        assert torch.equal(value, lora_before[key])
    layer = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    x = torch.randn(3, 12, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert layer.lora_up.weight.grad.dtype == torch.float32 and layer.weight.grad is None

    fresh = toy_model().to(dtype)  # injecting into an already-cast base gives fp32 adapters too
    inject_lora(fresh, rank=4)
    assert all(p.dtype == torch.float32 for p in lora_parameters(fresh))


def small_unet(seed=0):
    from model.unet import CONFIGS, UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(CONFIGS["test"])


def release_targets(unet):
    """The release's placement, from module types: every Linear/Conv2d inside a ResnetBlock2D, an attention
    module or a GEGLU."""
    from model.unet import GEGLU, ResnetBlock2D, UNetAttention
    expected = []
    for name, module in unet.named_modules():
        if isinstance(module, (ResnetBlock2D, UNetAttention, GEGLU)):
            expected += [f"{name}.{sub}" for sub, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return expected


def test_default_patterns_on_the_test_unet_are_the_release_placement():
    from model.unet import BasicTransformerBlock
    unet = small_unet()
    expected = release_targets(unet)
    names = inject_lora(unet, rank=4)
    assert set(names) == set(expected) and len(names) == len(expected)
    n_transformer_blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    assert sum(".transformer_blocks." in n for n in names) == 9 * n_transformer_blocks
    assert not any(n.endswith(("proj_in", "proj_out", "conv_in", "conv_out", "ff.net.2")) or "time_embedding" in n
                   or "samplers" in n for n in names)


def test_sd15_placement_is_224_modules_and_28_291_072_parameters_at_rank_32():
    from model.unet import CONFIGS, UNet2DConditionModel
    with torch.device("meta"):  # full size, no memory
        unet = UNet2DConditionModel(CONFIGS["sd15"])
    expected = release_targets(unet)
    names = inject_lora(unet, rank=32)
    assert len(names) == 224 and set(names) == set(expected)
    assert sum(p.numel() for p in lora_parameters(unet)) == 28_291_072


def test_test_unet_merge_matches_unmerged_and_reloads(tmp_path):
    unet = small_unet()
    inject_lora(unet, rank=4)
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():  # stand-in for training: random up weights so every branch contributes
        for p in lora_parameters(unet):
            p.normal_(0, 0.05, generator=g)
        unmerged = unet(latents, 500, context)
        save_lora(unet, tmp_path / "lora.safetensors")
        merge_lora(unet)
        torch.testing.assert_close(unet(latents, 500, context), unmerged, rtol=0, atol=1e-5)
        reloaded = small_unet()
        load_lora(reloaded, tmp_path / "lora.safetensors")
        torch.testing.assert_close(reloaded(latents, 500, context), unmerged, rtol=0, atol=1e-6)


def random_lora(rank, alpha, seed):
    """A LoRA state dict for the test UNet whose up weights are not zero, so every branch contributes."""
    model = small_unet(seed)
    inject_lora(model, rank, alpha=alpha)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
    return lora_state_dict(model)


def test_stacked_lora_equals_applying_one_after_the_other():
    first, second = random_lora(rank=2, alpha=1.5, seed=1), random_lora(rank=3, alpha=6.0, seed=2)
    stacked = small_unet()
    load_lora_state_dict(stacked, stack_loras(first, second))
    assert {layer.rank for layer in lora_layers(stacked).values()} == {5}
    in_turn = small_unet()
    load_lora_state_dict(in_turn, first)
    merge_and_unload(in_turn)  # the reward LoRA is trained on the UNet with the SFT LoRA merged
    load_lora_state_dict(in_turn, second)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(stacked(x, 10, context), in_turn(x, 10, context), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(stacked(x, 10, context), small_unet()(x, 10, context), atol=1e-3)


def test_stacking_loras_of_different_modules_is_refused():
    first = random_lora(rank=2, alpha=2.0, seed=1)
    second = {k: v for k, v in first.items() if not k.startswith("down_blocks.")}
    with pytest.raises(ValueError, match="wrap different modules"):
        stack_loras(first, second)


def test_dropout_acts_on_the_branch_output_in_train_mode_only():
    base = nn.Linear(16, 32)
    torch.manual_seed(0)
    layer = LoRALinear(base, rank=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(64, 16)
    with torch.no_grad():
        plain, branch = base(x), layer.lora_up(layer.lora_down(x))
        layer.eval()
        torch.testing.assert_close(layer(x), plain + branch)  # sampling: no dropout
        layer.train()
        kept = layer(x) - plain
    dropped = kept.abs() < 1e-6
    assert 0.3 < dropped.float().mean() < 0.7  # about half of the branch's outputs are zeroed...
    torch.testing.assert_close(kept[~dropped], (branch / 0.5)[~dropped])  # ...and the rest scaled by 1/(1-p)


def test_dropout_is_an_inject_and_load_argument(tmp_path):
    model = toy_model()
    inject_lora(model, rank=4, dropout=0.1)
    assert {layer.lora_dropout for layer in lora_layers(model).values()} == {0.1}
    train_a_little(model)
    save_lora(model, tmp_path / "lora.safetensors")
    x, t, ctx = toy_inputs()
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x, t, ctx), model(x, t, ctx))  # train mode draws fresh masks
        model.eval()
        assert torch.equal(model(x, t, ctx), model(x, t, ctx))
    fresh = toy_model()
    load_lora(fresh, tmp_path / "lora.safetensors", dropout=0.2)
    assert {layer.lora_dropout for layer in lora_layers(fresh).values()} == {0.2}
    sampling = toy_model()
    load_lora(sampling, tmp_path / "lora.safetensors")  # no dropout unless asked for
    assert {layer.lora_dropout for layer in lora_layers(sampling).values()} == {0.0}
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        inject_lora(toy_model(), rank=2, dropout=1.0)

