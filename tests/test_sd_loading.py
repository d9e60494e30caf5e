"""Loading SD-1.5 UNet and VAE weights from every public layout (model/weights.py, model/convert.py).

Random tiny diffusers models are the reference: saved with ``save_pretrained``, and also converted HERE to the
original single-file (ldm) layout by the inverse of the renaming rules, so the loader's rules are
checked against an independent writing of them. Outputs must match diffusers to 1e-4 relative error (fp32).
"""
import hashlib
import json
import os
import re

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from model import weights
from model.convert import Layout
from model.weights import (WeightsError, atomic_write, detect_single_file, load_pipeline, load_unet, load_vae,
                           save_unet_diffusers, save_vae_diffusers, write_json)
from test_unet_vae import TEST_UNET_CONFIG, TEST_VAE_CONFIG, relative_error

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    """A tiny random diffusers UNet and VAE, saved as a diffusers pipeline folder (unet/ and vae/ only)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TEST_UNET_CONFIG).eval()
    vae = diffusers.AutoencoderKL(**TEST_VAE_CONFIG).eval()
    return unet, vae


@pytest.fixture(scope="module")
def pipeline_folder(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    reference[0].save_pretrained(root / "unet")
    reference[1].save_pretrained(root / "vae")
    return root


def unet_inputs(context_length):
    generator = torch.Generator().manual_seed(context_length)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([1, 981]),
            torch.randn(2, context_length, 32, generator=generator))


def assert_unet_matches(unet, reference):
    for context_length in (77, 240):  # plain SD and LongAlign's segment encoding
        latents, timesteps, context = unet_inputs(context_length)
        with torch.no_grad():
            expected = reference(latents, timesteps, context).sample
            assert relative_error(unet(latents, timesteps, context), expected) <= TOLERANCE


def assert_vae_matches(vae, reference):
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(image)
        posterior = reference.encode(image).latent_dist
        assert relative_error(mean, posterior.mean) <= TOLERANCE
        assert relative_error(logvar, posterior.logvar) <= TOLERANCE
        assert relative_error(vae.decode(mean), reference.decode(mean).sample) <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# diffusers -> original (ldm) layout: the inverse of the renaming rules, written independently of the loader
# ----------------------------------------------------------------------------------------------------------

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(state, layers_per_block):
    stride = layers_per_block + 1
    has_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, tensor in state.items():
        for ours, ldm in [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                          ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
                          ("mid_block.resnets.1.", "middle_block.2.")]:
            key = key.replace(ours, ldm)
        key = re.sub(r"^conv_in\.", "input_blocks.0.0.", key)
        key = re.sub(r"^conv_norm_out\.", "out.0.", key)
        key = re.sub(r"^conv_out\.", "out.2.", key)
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            key = f"input_blocks.{1 + int(m[1]) * stride + int(m[3])}.{0 if m[2] == 'resnets' else 1}.{m[4]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            key = f"input_blocks.{1 + int(m[1]) * stride + layers_per_block}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            key = f"output_blocks.{int(m[1]) * stride + int(m[3])}.{0 if m[2] == 'resnets' else 1}.{m[4]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            slot = 2 if int(m[1]) in has_attention else 1
            key = f"output_blocks.{int(m[1]) * stride + layers_per_block}.{slot}.{m[2]}"
        if m := re.match(r"((?:input|output)_blocks\.\d+\.0\.|middle_block\.[02]\.)(\w+)\.(.*)", key):
            key = f"{m[1]}{RESNET_TO_LDM.get(m[2], m[2])}.{m[3]}"
        out[key] = tensor
    return out


def vae_to_ldm(state, levels):
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, tensor in state.items():
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
        key = key.replace(".mid_block.resnets.0.", ".mid.block_1.").replace(".mid_block.resnets.1.", ".mid.block_2.")
        key = key.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if m := re.match(r"(\w+)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
            key = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # ldm stores these as 1×1 convs
        out[key] = tensor
    return out


def legacy_vae_attention_names(state):
    """diffusers' pre-0.14 names for the VAE mid attention, as the SD-1.5 vae/ file has them."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
            for k, v in state.items()}


@pytest.fixture(scope="module")
def single_file_state(reference):
    unet, vae = reference
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), 1).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 2).items()})
    state.update({"alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.9999)})  # ignored
    return state


def test_inverse_rules_produce_the_original_layout(single_file_state):
    keys = set(single_file_state)
    for expected in ["model.diffusion_model.time_embed.0.weight", "model.diffusion_model.input_blocks.0.0.weight",
                     "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
                     "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                     "model.diffusion_model.input_blocks.2.0.op.weight",
                     "model.diffusion_model.middle_block.1.proj_in.weight",
                     "model.diffusion_model.output_blocks.1.1.conv.weight", "model.diffusion_model.out.2.bias",
                     "first_stage_model.encoder.down.0.downsample.conv.weight",
                     "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                     "first_stage_model.decoder.up.1.upsample.conv.weight",
                     "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.norm_out.bias"]:
        assert expected in keys
    assert single_file_state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# Parity after loading
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["root", "subfolder", "file"])
def test_diffusers_layout(reference, pipeline_folder, where):
    paths = {"root": (pipeline_folder, pipeline_folder),
             "subfolder": (pipeline_folder / "unet", pipeline_folder / "vae"),
             "file": (pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors",
                      pipeline_folder / "vae" / "diffusion_pytorch_model.safetensors")}
    unet_path, vae_path = paths[where]
    assert not detect_single_file(unet_path)
    unet, vae = load_unet(unet_path), load_vae(vae_path)
    assert unet.layout is vae.layout is Layout.DIFFUSERS
    assert_unet_matches(unet, reference[0])
    assert_vae_matches(vae, reference[1])


@pytest.mark.parametrize("suffix, pickle_format", [(".safetensors", None), (".ckpt", "zip"), (".ckpt", "legacy")])
def test_original_single_file(reference, single_file_state, tmp_path, monkeypatch, suffix, pickle_format):
    path = tmp_path / f"tiny-sd{suffix}"
    if suffix == ".safetensors":
        save_file(single_file_state, str(path))
    else:  # torch >= 1.6 writes zip archives; older .ckpt files are legacy pickles, which cannot be mapped
        torch.save({"state_dict": single_file_state, "global_step": 1}, path,
                   _use_new_zipfile_serialization=pickle_format == "zip")
    mapped, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        mapped.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert detect_single_file(path)
    unet, vae = load_unet(path), load_vae(path)
    assert unet.layout is vae.layout is Layout.SINGLE_FILE
    assert_unet_matches(unet, reference[0])
    assert_vae_matches(vae, reference[1])
    assert mapped == ([] if pickle_format is None else [pickle_format == "zip"] * 3)  # a zip pickle is mapped


def test_each_model_reads_only_its_own_keys_of_a_single_file(reference, single_file_state, tmp_path, monkeypatch):
    """A 4 GB single file is read once in all, not once whole per model: each loader fetches its prefix only."""
    path = tmp_path / "tiny-sd.safetensors"
    save_file(single_file_state, str(path))
    vae_keys = {k for k in single_file_state if k.startswith("first_stage_model.")}
    assert set(weights.read_state_dict(path, "first_stage_model.")) == vae_keys
    assert set(weights.read_state_dict(path, "no.such.prefix.")) == set(single_file_state)  # nothing matches: all
    fetched, real_read = [], weights.read_state_dict

    def recording_read(*args, **kwargs):
        state = real_read(*args, **kwargs)
        fetched.append(set(state))
        return state

    monkeypatch.setattr(weights, "read_state_dict", recording_read)
    assert_vae_matches(load_vae(path), reference[1])
    assert fetched == [vae_keys]


def test_standalone_ldm_vae_file(reference, single_file_state, tmp_path):
    """Like vae-ft-mse-840000-ema-pruned.safetensors: ldm names, no prefix."""
    path = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in single_file_state.items()
               if k.startswith("first_stage_model.")}, str(path))
    vae = load_vae(path)
    assert vae.layout is Layout.LDM
    assert_vae_matches(vae, reference[1])


def test_legacy_vae_attention_names(reference, tmp_path):
    folder = tmp_path / "vae"
    reference[1].save_pretrained(folder)
    state = legacy_vae_attention_names(reference[1].state_dict())
    assert "encoder.mid_block.attentions.0.query.weight" in state
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    assert_vae_matches(load_vae(folder), reference[1])


def test_dtype_and_device_arguments(pipeline_folder):
    unet = load_unet(pipeline_folder, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert not unet.training


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_encoder():
    """A tiny transformers CLIP text tower in the "test" shapes of model/clip.py, so that a single file, which
    has no config.json, names its heads and activation by its shapes."""
    import transformers
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, hidden_act="gelu", vocab_size=49408)
    return transformers.CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def wide_unet():
    """A tiny UNet that reads the 128-wide context of ``text_encoder``."""
    torch.manual_seed(2)
    return diffusers.UNet2DConditionModel(**{**TEST_UNET_CONFIG, "cross_attention_dim": 128}).eval()


def check_pipeline(pipeline, text_encoder, unet, vae):
    ids = pipeline.tokenizer(["a red cube on a blue sphere."])
    with torch.no_grad():
        assert relative_error(pipeline.text_encoder(ids), text_encoder(ids).last_hidden_state) <= TOLERANCE
        latents, timesteps, _ = unet_inputs(77)
        context = torch.randn(2, 77, 128)
        assert relative_error(pipeline.unet(latents, timesteps, context),
                              unet(latents, timesteps, context).sample) <= TOLERANCE
    assert_vae_matches(pipeline.vae, vae)


def test_load_pipeline_from_folder_and_single_file(reference, text_encoder, wide_unet, tmp_path):
    from model.tokenizer import CLIPTokenizer
    vae = reference[1]
    folder = tmp_path / "sd"
    CLIPTokenizer().save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    wide_unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    check_pipeline(load_pipeline(folder), text_encoder, wide_unet, vae)

    single = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(wide_unet.state_dict(), 1).items()}
    single.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 2).items()})
    single.update({"cond_stage_model.transformer." + k: v for k, v in text_encoder.state_dict().items()})
    save_file(single, str(tmp_path / "sd.safetensors"))
    pipeline = load_pipeline(tmp_path / "sd.safetensors")
    assert isinstance(pipeline.tokenizer, CLIPTokenizer) and pipeline.scheduler_config is None
    check_pipeline(pipeline, text_encoder, wide_unet, vae)


def test_load_pipeline_refuses_mismatched_parts(reference, text_encoder, tmp_path):
    from model.tokenizer import CLIPTokenizer
    CLIPTokenizer().save_pretrained(tmp_path / "tokenizer")
    text_encoder.save_pretrained(tmp_path / "text_encoder")  # 64 wide
    reference[0].save_pretrained(tmp_path / "unet")  # reads 32-wide context
    reference[1].save_pretrained(tmp_path / "vae")
    with pytest.raises(WeightsError, match="do not fit together"):
        load_pipeline(tmp_path)
    with pytest.raises(WeightsError, match="not found"):
        load_pipeline(tmp_path / "missing")


@pytest.fixture(scope="module")
def sd_folder(text_encoder, wide_unet, reference, tmp_path_factory):
    """A whole pipeline folder as diffusers saves it, scheduler/ included."""
    from model.tokenizer import CLIPTokenizer
    folder = tmp_path_factory.mktemp("sd")
    CLIPTokenizer().save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    wide_unet.save_pretrained(folder / "unet")
    reference[1].save_pretrained(folder / "vae")
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                            skip_prk_steps=True, set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    return folder


def as_hub_cache_snapshot(folder, cache):
    """``folder`` laid out as huggingface_hub caches a download: each file a relative link from
    snapshots/<revision>/ into blobs/<sha256>."""
    snapshot = cache / "snapshots" / "0123abcd"
    (cache / "blobs").mkdir(parents=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = cache / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def test_pipeline_exposes_the_scheduler_config(sd_folder, reference, text_encoder, wide_unet):
    pipeline = load_pipeline(sd_folder)
    saved = load_scheduler_config_file(sd_folder)
    assert pipeline.scheduler_config == saved and saved["timestep_spacing"] == "leading"
    check_pipeline(pipeline, text_encoder, wide_unet, reference[1])


def test_hugging_face_cache_snapshot_loads(sd_folder, reference, text_encoder, wide_unet, tmp_path):
    snapshot = as_hub_cache_snapshot(sd_folder, tmp_path / "models--someone--tiny-sd")
    unet_file = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet_file.is_symlink() and os.readlink(unet_file).startswith("../../../blobs/")
    pipeline = load_pipeline(snapshot)
    check_pipeline(pipeline, text_encoder, wide_unet, reference[1])
    assert pipeline.scheduler_config == load_pipeline(sd_folder).scheduler_config
    with pytest.raises(WeightsError, match="not an SD-1.5 pipeline folder"):
        load_pipeline(tmp_path / "models--someone--tiny-sd")


def test_bin_only_folder_loads_through_weights_only_unpickling(sd_folder, reference, text_encoder, wide_unet,
                                                              tmp_path, monkeypatch):
    folder = tmp_path / "sd-bin"
    wide_unet.save_pretrained(folder / "unet", safe_serialization=False)
    reference[1].save_pretrained(folder / "vae", safe_serialization=False)
    (folder / "text_encoder").mkdir()  # as transformers 4 wrote it; transformers 5 always writes safetensors
    torch.save(text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    (folder / "text_encoder" / "config.json").write_bytes((sd_folder / "text_encoder" / "config.json").read_bytes())
    assert not list(folder.rglob("*.safetensors")) and (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    unpickled, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        unpickled.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    check_pipeline(load_pipeline(folder), text_encoder, wide_unet, reference[1])
    assert unpickled == [True] * 3


def test_fp16_variant_folder_loads(sd_folder, reference, text_encoder, wide_unet, tmp_path):
    """What ``from_pretrained(..., variant="fp16")`` downloads: every weights file named *.fp16.*."""
    folder = tmp_path / "sd-fp16"
    for part in ("tokenizer", "text_encoder", "unet", "vae"):
        for file in (sd_folder / part).iterdir():
            name = file.name.replace(".safetensors", ".fp16.safetensors")
            (folder / part).mkdir(parents=True, exist_ok=True)
            (folder / part / name).write_bytes(file.read_bytes())
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()
    check_pipeline(load_pipeline(folder), text_encoder, wide_unet, reference[1])


def test_a_folder_that_is_not_a_pipeline_gets_one_fix_that_works(sd_folder, tmp_path):
    for part in ("unet", "text_encoder", "tokenizer"):  # one part of a pipeline: the fix is the folder above it
        with pytest.raises(WeightsError) as error:
            load_pipeline(sd_folder / part)
        message = str(error.value)
        assert "\n" not in message and "subfolder" not in message and "Pass the folder that holds them" not in message
        assert message.endswith(f"Pass the pipeline folder that holds it, {sd_folder}.")
    assert load_pipeline(sd_folder).scheduler_config is not None  # ... and that fix loads
    (tmp_path / "unrelated" / "unet").mkdir(parents=True)
    with pytest.raises(WeightsError, match=r"has no text_encoder/, vae/\)\. Pass a diffusers SD-1.5 folder"):
        load_pipeline(tmp_path / "unrelated")


# ----------------------------------------------------------------------------------------------------------
# Writing the diffusers layout back out
# ----------------------------------------------------------------------------------------------------------

def test_saved_folders_load_in_diffusers(reference, pipeline_folder, tmp_path):
    save_unet_diffusers(load_unet(pipeline_folder), tmp_path / "unet")
    save_vae_diffusers(load_vae(pipeline_folder), tmp_path / "vae")
    reloaded_unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    reloaded_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    latents, timesteps, context = unet_inputs(240)
    image = torch.rand(1, 3, 16, 16)
    with torch.no_grad():  # diffusers reads back exactly the model it saved
        torch.testing.assert_close(reloaded_unet(latents, timesteps, context).sample,
                                   reference[0](latents, timesteps, context).sample, rtol=0, atol=0)
        torch.testing.assert_close(reloaded_vae.encode(image).latent_dist.mean,
                                   reference[1].encode(image).latent_dist.mean, rtol=0, atol=0)
    assert_vae_matches(load_vae(tmp_path), reference[1])


def test_exported_scheduler_config_means_sd15s_defaults_to_every_sampler(tmp_path):
    """train.py's export writes a DDIM config; read by diffusers or by us, DDIM gets SD-1.5's leading steps and
    the multistep solvers keep their own linspace default (a timestep_spacing key would impose leading on them)."""
    from model.scheduler import make_sampler
    weights.write_pipeline_files(tmp_path)
    config = load_scheduler_config_file(tmp_path)
    for name, cls in (("ddim", diffusers.DDIMScheduler), ("dpm", diffusers.DPMSolverMultistepScheduler)):
        reference = cls.from_pretrained(tmp_path / "scheduler")
        reference.set_timesteps(10)
        assert make_sampler(name, 10, config).timesteps.tolist() == reference.timesteps.tolist()
        assert make_sampler(name, 10, config).timesteps.tolist() == make_sampler(name, 10).timesteps.tolist()


def load_scheduler_config_file(folder):
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def test_writes_are_atomic(tmp_path):
    path = tmp_path / "out" / "config.json"
    write_json(path, {"version": 1})

    def crash_halfway(tmp):
        tmp.write_text('{"vers')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash_halfway)
    assert json.loads(path.read_text()) == {"version": 1}  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # and no temporary file left over
    write_json(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 2}


def test_save_refuses_unmerged_extra_keys(pipeline_folder, tmp_path):
    unet = load_unet(pipeline_folder)
    unet.conv_in.register_parameter("lora_down", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(WeightsError, match="merge LoRA"):
        save_unet_diffusers(unet, tmp_path / "unet")


# ----------------------------------------------------------------------------------------------------------
# Bad input: every error names the problem
# ----------------------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_unet(tmp_path / "nowhere.safetensors")
    with pytest.raises(WeightsError, match="no UNET weights in"):
        load_unet(tmp_path)  # an empty folder


def test_wrong_model_in_folder(pipeline_folder, tmp_path):
    with pytest.raises(WeightsError, match="AutoencoderKL.*not the UNet2DConditionModel"):
        load_unet(pipeline_folder / "vae")  # its config.json says what it is
    vae_file = pipeline_folder / "vae" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(vae_file.read_bytes())
    with pytest.raises(WeightsError, match="holds a VAE, not a UNet"):
        load_unet(tmp_path)  # no config.json: judged by its keys
    with pytest.raises(WeightsError, match="UNet2DConditionModel.*not the AutoencoderKL"):
        load_vae(pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors")  # config.json beside it
    (tmp_path / "unet.safetensors").write_bytes((pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors")
                                                .read_bytes())
    with pytest.raises(WeightsError, match="holds a UNet, not a VAE"):
        load_vae(tmp_path / "unet.safetensors")


def test_single_file_without_the_model(single_file_state, tmp_path):
    path = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in single_file_state.items() if k.startswith("model.diffusion_model.")}, str(path))
    with pytest.raises(WeightsError, match="without VAE weights"):
        load_vae(path)


def test_corrupt_file(pipeline_folder, tmp_path):
    data = (pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt"):
        load_unet(path)
    with pytest.raises(WeightsError, match="corrupt"):
        detect_single_file(path)


def test_missing_and_misshapen_tensors_are_named(pipeline_folder, tmp_path):
    state = diffusers.UNet2DConditionModel.from_pretrained(pipeline_folder / "unet").state_dict()
    del state["conv_out.bias"]
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    (tmp_path / "config.json").write_text((pipeline_folder / "unet" / "config.json").read_text())
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match=r"(?s)UNet2DConditionModel \(detected layout: diffusers\).*"
                                           r"missing 1 keys: conv_out.bias.*conv_in.weight \(32, 4, 1, 1\)"):
        load_unet(tmp_path)


def test_unsupported_config_option(pipeline_folder, tmp_path):
    config = json.loads((pipeline_folder / "unet" / "config.json").read_text())
    config["use_linear_projection"] = True  # SD-2 style
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="use_linear_projection=True"):
        load_unet(tmp_path)
