"""LoRA files in the ecosystem's layouts: kohya files we write load in diffusers (with peft) and give our UNet's
output; kohya, diffusers/PEFT and dotted files of the same weights give the same UNet; the LongAlign release's
nameless list, written here by an independent traversal of diffusers' own UNet, merges to the same weights;
bad files get errors that name what was found."""
import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.lora import (inject_lora, load_lora, lora_layers, lora_state_dict, lora_targets, merge_lora_files,
                        read_lora_file, save_lora)
from model.lora_formats import LoRALayout, lora_metadata, release_order
from model.weights import WeightsError, save_state_dict
from test_unet_vae import relative_error, unet_pair

TOLERANCE = 1e-4
RELEASE_CLASSES = ("ResnetBlock2D", "Attention", "GEGLU")  # diffusers' class names, as the release walks them


def unet_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 981]), torch.randn(2, 77, 32, generator=g)


def output(unet):
    with torch.no_grad():
        result = unet(*unet_inputs())
    return getattr(result, "sample", result)


@pytest.fixture(scope="module")
def trained():
    """Our test UNet with a rank-4, alpha-8 LoRA whose up weights are random, so every branch counts."""
    unet, _ = unet_pair()
    inject_lora(unet, rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(unet).values():
        nn.init.normal_(layer.lora_up.weight, std=0.05, generator=g)
    return unet


def test_kohya_file_loads_in_diffusers_and_gives_our_output(trained, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(trained, path, lora_metadata("stable-diffusion-v1-5", "segment", 248, "sft", t5=False))
    _, reference = unet_pair()
    before = output(reference)
    state, alphas, metadata = diffusers.StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=reference, metadata=metadata)
    assert relative_error(output(reference), before) > 0.1  # the LoRA really changes the output
    assert relative_error(output(trained), output(reference)) <= TOLERANCE


def test_kohya_file_keys_shapes_and_metadata(trained, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(trained, path, lora_metadata("sd15", "segment", 248, "reward", t5=True))
    with safe_open(str(path), "pt") as file:
        keys, header = set(file.keys()), file.metadata()
        conv = file.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        alpha = file.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
    assert all(k.startswith("lora_unet_") for k in keys) and len(keys) == 3 * len(lora_layers(trained))
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert conv.shape == (4, 32, 3, 3) and alpha.shape == () and float(alpha) == 8
    assert header | {"format": "pt"} == {
        "rank": "4", "alpha": "8", "ss_network_dim": "4", "ss_network_alpha": "8", "base_model": "sd15",
        "encoding": "segment", "max_tokens": "248", "stage": "reward", "t5": "yes", "ss_base_model_version": "sd_v1",
        "format": "pt"}
    lora = read_lora_file(path, unet_pair()[0])
    assert lora.layout == LoRALayout.KOHYA and lora.metadata["encoding"] == "segment"
    assert lora.state.keys() == lora_state_dict(trained).keys()
    with pytest.raises(ValueError, match="strings to strings; 'max_tokens'"):
        save_lora(trained, tmp_path / "bad.safetensors", {"max_tokens": 248})


def kohya_key(key):
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if key.endswith(suffix):
            return "lora_unet_" + key[: -len(suffix)].replace(".", "_") + suffix
    raise AssertionError(key)


def foreign_files(state, folder):
    """The same LoRA as a kohya file (one module cut to rank 2), PEFT with and without ``unet.``, and dotted;
    the renaming is written here, independently of model/lora_formats.py."""
    cut = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    state = dict(state)
    state[f"{cut}.lora_down.weight"] = state[f"{cut}.lora_down.weight"][:2]
    state[f"{cut}.lora_up.weight"] = state[f"{cut}.lora_up.weight"][:, :2]
    kohya = {kohya_key(k): v for k, v in state.items()}
    peft = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in state.items()}
    files = {"kohya": kohya, "peft": {f"unet.{k}": v for k, v in peft.items()}, "peft-bare": peft, "dotted": state}
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
    return state


def test_kohya_peft_and_dotted_files_give_the_same_unet(trained, tmp_path):
    expected_state = foreign_files(lora_state_dict(trained), tmp_path)
    expected = unet_pair()[0]
    load_lora(expected, tmp_path / "dotted.safetensors")
    assert lora_layers(expected)["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].rank == 2
    for name in ("kohya", "peft", "peft-bare"):
        unet = unet_pair()[0]
        load_lora(unet, tmp_path / f"{name}.safetensors")
        for key, value in lora_state_dict(unet).items():
            assert torch.equal(value, expected_state[key]), (name, key)
        assert torch.equal(output(unet), output(expected))


def test_peft_file_saved_by_diffusers_gives_diffusers_output(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet, reference = unet_pair()
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "ff.net.0.proj"])
    reference.add_adapter(config)  # the alpha lives only in the header diffusers writes
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(reference), unet_lora_adapter_metadata=config.to_dict())
    names = load_lora(unet, tmp_path / "pytorch_lora_weights.safetensors")
    assert set(names) == set(lora_targets(unet_pair()[0]))  # peft's placement by suffix is ours
    assert relative_error(output(unet), output(reference)) <= TOLERANCE


# ---- The release's list ----

def release_lists(reference, rank, seeds):
    """Lists as the release writes them: walk diffusers' ``modules()``, keep ResnetBlock2D / Attention / GEGLU,
    take every Linear/Conv2d inside in ``named_modules()`` order, save ``[up, down]`` in fp16. Also merges each
    list into ``reference`` (W += up @ down), and returns the module names in the walk's order."""
    names = {id(m): n for n, m in reference.named_modules()}
    lists, order = [], []
    for seed in seeds:
        g, tensors, order = torch.Generator().manual_seed(seed), [], []
        for module in reference.modules():
            if type(module).__name__ not in RELEASE_CLASSES:
                continue
            for layer in (m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))):
                out, fan_in, *kernel = layer.weight.shape
                up = (torch.randn(out, rank, *[1] * len(kernel), generator=g) * 0.05).half()
                down = (torch.randn(rank, fan_in, *kernel, generator=g) / rank).half()
                with torch.no_grad():
                    layer.weight += torch.einsum("or,ri...->oi...", up.float().flatten(1), down.float())
                tensors += [up, down]
                order.append(names[id(layer)])
        lists.append(tensors)
    return lists, order


def test_release_order_rule_is_diffusers_traversal_and_not_our_registration():
    unet, reference = unet_pair()
    _, walked = release_lists(reference, 2, [0])
    targets = lora_targets(unet)
    assert sorted(targets, key=release_order) == walked
    assert targets != walked  # our blocks register resnets before attentions: the rule is needed
    assert walked[-1].startswith("mid_block.")  # diffusers registers mid_block after up_blocks


def test_release_lists_merge_sft_then_reward_to_the_reference_weights(tmp_path):
    unet, reference = unet_pair()
    (sft, reward), _ = release_lists(reference, 3, [1, 2])
    torch.save(sft, tmp_path / "s28750_lora_vis.pt")
    torch.save(reward, tmp_path / "sd15-reward-3750.pt")
    lora = read_lora_file(tmp_path / "s28750_lora_vis.pt", unet)
    assert lora.layout == LoRALayout.RELEASE and len(lora.state) == 3 * len(sft) // 2
    merge_lora_files(unet, [tmp_path / "s28750_lora_vis.pt", tmp_path / "sd15-reward-3750.pt"])
    assert not lora_layers(unet)
    merged, expected = unet.state_dict(), reference.state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    assert relative_error(output(unet), output(reference)) <= TOLERANCE


def test_release_list_of_the_wrong_count_or_shape_is_refused(tmp_path):
    unet, reference = unet_pair()
    (tensors,), walked = release_lists(reference, 2, [0])
    torch.save(tensors[:-2], tmp_path / "short.pt")
    with pytest.raises(WeightsError, match=rf"holds {len(tensors) - 2} tensors, .* {len(walked)} LoRA target"):
        load_lora(unet, tmp_path / "short.pt")
    swapped = list(tensors)
    swapped[0], swapped[1] = tensors[1], tensors[0]  # [down, up] instead of [up, down]
    torch.save(swapped, tmp_path / "swapped.pt")
    with pytest.raises(WeightsError, match=rf"tensors 0 and 1 \(up, down for {walked[0]}\)"):
        load_lora(unet, tmp_path / "swapped.pt")
    torch.save([torch.zeros(1), "text"], tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="not only of tensors"):
        load_lora(unet, tmp_path / "mixed.pt")


# ---- Unknown layouts ----

def test_unknown_or_unsupported_layouts_name_what_was_found(tmp_path):
    unet = unet_pair()[0]
    save_state_dict({"foo.weight": torch.zeros(1), "bar.bias": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match=r"no LoRA layout .*first keys are bar\.bias, foo\.weight. Expected kohya"):
        load_lora(unet, tmp_path / "other.safetensors")
    save_state_dict({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 1)},
                    tmp_path / "te.safetensors")
    with pytest.raises(WeightsError, match="also adapts the text encoder"):
        load_lora(unet, tmp_path / "te.safetensors")
    save_state_dict({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(1)}, tmp_path / "loha.safetensors")
    with pytest.raises(WeightsError, match="hada_w1_a, which is not one of the LoRA parts"):
        load_lora(unet, tmp_path / "loha.safetensors")
    save_state_dict({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.zeros(1, 1)},
                    tmp_path / "ldm.safetensors")
    with pytest.raises(WeightsError, match="does not have: lora_unet_input_blocks_1_0_in_layers_2"):
        load_lora(unet, tmp_path / "ldm.safetensors")


def test_release_order_on_full_size_sd15():
    from model.unet import CONFIGS, UNet2DConditionModel
    with torch.device("meta"):  # full size, no memory
        ours = UNet2DConditionModel(CONFIGS["sd15"])
        reference = diffusers.UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD-1.5's
    names = {id(m): n for n, m in reference.named_modules()}
    walked = [names[id(layer)] for module in reference.modules() if type(module).__name__ in RELEASE_CLASSES
              for layer in module.modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]
    assert len(walked) == 224 and sorted(lora_targets(ours), key=release_order) == walked
