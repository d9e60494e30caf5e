"""sample.py end to end on a tiny random Stable Diffusion pipeline.

The oracle is diffusers' own StableDiffusionPipeline: tiny random UNet and VAE, a tiny transformers CLIP text
encoder, transformers' CLIPTokenizer reading the files our CLIPTokenizer writes, and the SD-1.5 scheduler
config. It is saved with save_pretrained, and sample.py loads that folder. With the same seed, steps, CFG and
sampler, the PNG must equal diffusers' image to within 1/255 per pixel (fp32): the only differences allowed
are float rounding (our schedule is float64, diffusers' float32) landing on the other side of a .5.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import sample
from model.lora import inject_lora, lora_state_dict, merge_and_unload, save_lora
from model.lora_formats import lora_metadata, save_lora_file
from model.tokenizer import CLIPTokenizer
from model.unet import UNet2DConditionModel
from model.weights import load_unet, save_unet_diffusers
from test_unet_vae import TEST_UNET_CONFIG, TEST_VAE_CONFIG

REPO = Path(__file__).resolve().parents[1]
RECORD = "longalign.json"  # what train.py --export writes beside the weights
WIDTH = 64  # the tiny text encoder's width, which the UNet's cross-attention reads
SD15_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                      clip_sample=False, set_alpha_to_one=False)
# Ten sentences, about 200 CLIP tokens: far past plain CLIP's 75, within segment encoding's 240 rows.
LONG_PROMPT = (
    "A small red wooden cabin stands alone at the edge of a quiet pine forest in late autumn. "
    "Thin grey smoke curls upward from its crooked stone chimney into the pale morning sky. "
    "In front of the cabin, a narrow dirt path winds down toward a calm, mirror-like mountain lake. "
    "Two brown ducks float near the reedy shore, leaving soft ripples behind them on the water. "
    "On the far side of the lake, snow-capped peaks catch the first golden light of the rising sun. "
    "A weathered canoe, painted faded blue, rests upside down on the pebbles beside a wooden dock. "
    "Stacks of freshly split firewood lean against the cabin wall under a sloping tin roof. "
    "A black cat with white paws sits on the porch railing, watching a sparrow in the nearby birch tree. "
    "Fallen orange and yellow leaves cover the ground, and a few still drift slowly through the crisp air. "
    "The whole scene is calm, warm and detailed, like a classic oil painting of the northern wilderness.")


# ---------------------------------------------------------------------------------------------------------
# The tiny pipeline, in diffusers and on disk
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers StableDiffusionPipeline, its saved folder)."""
    tokenizer_files = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer().save_pretrained(tokenizer_files)
    torch.manual_seed(0)
    text_config = transformers.CLIPTextConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                                              num_attention_heads=1, vocab_size=49408)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**TEST_VAE_CONFIG),
        text_encoder=transformers.CLIPTextModel(text_config),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_files),
        unet=diffusers.UNet2DConditionModel(**{**TEST_UNET_CONFIG, "cross_attention_dim": WIDTH}),
        scheduler=diffusers.DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(folder)
    # transformers 5 saves only tokenizer.json; the public SD-1.5 folder (and our loader) has vocab.json and
    # merges.txt, the very files the oracle's tokenizer was read from.
    CLIPTokenizer().save_pretrained(folder / "tokenizer")
    return pipe, folder


@pytest.fixture(scope="module")
def tiny_sd(reference):
    return reference[1]


def run_sample(prompt, weights, out, *options):
    """fp32, as diffusers' reference runs; the CPU default may be bf16 (tests/test_sample_batch.py)."""
    sample.main([prompt, "--weights", str(weights), "--out", str(out), "--height", "32", "--width", "32",
                 "--steps", "1", "--dtype", "fp32", *map(str, options)])


def pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, cfg, batch, negative, steps", [
    ("ddim", 7.5, 2, "blurry, dark", 2),
    ("dpm", 4.0, 1, "", 3),  # 3 steps: first order, second order, first order to sigma = 0
    ("ddim", 0.5, 1, "", 2),  # a scale <= 1 turns guidance off in diffusers; sample.py mirrors that
])
def test_image_equals_diffusers(reference, tmp_path, sampler, cfg, batch, negative, steps):
    pipe, folder = reference
    if sampler == "dpm":  # the same models with DPM-Solver++(2M), from the saved folder's scheduler config
        # (its timestep_spacing "leading" is written in the file, so diffusers honours it, and so do we)
        dpm = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
        pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": dpm})
        pipe.set_progress_bar_config(disable=True)
    prompt, seed = "a red cube on a blue sphere, studio light", 7
    expected = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg, height=32,
                    width=32, num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="np").images
    expected = (expected * 255).round().astype(np.int16)  # [B, H, W, 3], as diffusers makes its PIL images

    out = tmp_path / "image.png"
    sample.main([prompt, "--weights", str(folder), "--out", str(out), "--height", "32", "--width", "32",
                 "--steps", str(steps), "--cfg", str(cfg), "--seed", str(seed), "--sampler", sampler,
                 "--batch", str(batch), "--negative", negative, "--encoding", "truncate", "--dtype", "fp32"])
    paths = [out] if batch == 1 else [tmp_path / f"image-{i}.png" for i in range(batch)]
    for path, image in zip(paths, expected):
        ours = pixels(path)
        assert ours.shape == image.shape == (32, 32, 3)
        assert ours.std() > 5  # a real picture, not a flat field that would match anything
        assert np.abs(ours - image).max() <= 1


# ---------------------------------------------------------------------------------------------------------
# Segment encoding, PNG metadata, the default model
# ---------------------------------------------------------------------------------------------------------

def test_long_prompt_uses_segment_encoding(tiny_sd, tmp_path, capsys):
    assert 180 <= len(CLIPTokenizer().encode(LONG_PROMPT)) <= 230
    contexts = []

    def watch(module, inputs):  # every module's forward passes here; keep the UNet's context argument
        if isinstance(module, UNet2DConditionModel):
            contexts.append(tuple(inputs[2].shape))

    out = tmp_path / "long.png"
    hook = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        run_sample(LONG_PROMPT, tiny_sd, out)  # --encoding auto: over 77 tokens, so segment encoding
    finally:
        hook.remove()
    assert "encoding: segment, 10 segments" in capsys.readouterr().out
    assert contexts == [(2, 240, WIDTH)]  # [uncond; cond] under CFG, 240 rows, at the one step
    assert Image.open(out).text["parameters"].startswith(LONG_PROMPT + "\n")  # the prompt kept whole


def test_a_prompt_too_long_for_the_context_gets_a_note_with_the_fix(tiny_sd, tmp_path, capsys, recwarn):
    huge = "A red fox sits in the snow. " * 400  # about 3,200 tokens: far past the 240-row context
    run_sample(huge, tiny_sd, tmp_path / "huge.png")
    err = capsys.readouterr().err
    assert "tokens do not fit the context of --max-tokens 240" in err and "--max-tokens" in err
    assert not [w for w in recwarn if "dropped" in str(w.message)]  # the note replaces the library warning
    assert (tmp_path / "huge.png").is_file()
    run_sample("a red fox", tiny_sd, tmp_path / "short.png", "--negative", huge, "--encoding", "truncate")
    err = capsys.readouterr().err
    assert "the negative prompt's last" in err and "plain CLIP's 77" in err and "--encoding segment" in err


def test_auto_encoding_follows_what_the_weights_were_trained_with(tiny_sd, tmp_path, capsys):
    """A short prompt gets plain CLIP, unless train.py recorded that the UNet learned segment encoding."""
    weights = tmp_path / "trained"
    shutil.copytree(tiny_sd, weights)
    run_sample("a red fox", weights, tmp_path / "plain.png")
    assert "encoding: truncate" in capsys.readouterr().out
    (weights / RECORD).write_text(json.dumps({"encoding": "segment", "max_tokens": 240}))
    run_sample("a red fox", weights, tmp_path / "segment.png")
    assert "encoding: segment, 1 segments" in capsys.readouterr().out
    assert "Encoding: segment," in Image.open(tmp_path / "segment.png").text["parameters"]


def test_weights_can_recommend_their_sampling_settings(tiny_sd, tmp_path):
    """Flags left out take longalign.json's "sampling" (weights/mini records the settings its table was measured
    with); a flag given wins; weights with no record get SD-1.5's usual DDIM, 50 steps, CFG 7.5."""
    weights = tmp_path / "recommends"
    shutil.copytree(tiny_sd, weights)

    def settings(folder, *flags):
        out = tmp_path / "settings.png"
        sample.main(["a red fox", "--weights", str(folder), "--out", str(out), "--height", "16", "--width", "16",
                     *flags])
        return Image.open(out).text["parameters"].split("\n")[2]

    assert settings(weights).startswith("Steps: 50, Sampler: DDIM, CFG scale: 7.5,")
    record = {"encoding": "truncate", "sampling": {"sampler": "dpm", "steps": 3, "cfg": 2.0}}
    (weights / RECORD).write_text(json.dumps(record))
    assert settings(weights).startswith("Steps: 3, Sampler: DPM, CFG scale: 2.0,")
    assert settings(weights, "--cfg", "4", "--sampler", "ddim").startswith("Steps: 3, Sampler: DDIM, CFG scale: 4.0,")


def test_empty_prompt_with_the_default_model(tmp_path, capsys):
    """An empty prompt is an unconditional sample; without --weights the shipped miniature is used, with a note
    saying what it was trained on and how to get real images."""
    out = tmp_path / "nested" / "empty.png"
    sample.main(["", "--out", str(out), "--steps", "1", "--cfg", "3", "--seed", "11", "--negative", "noisy",
                 "--sampler", "ddim"])
    err = capsys.readouterr().err
    assert "miniature trained only on the 64x64 'shapes world'" in err and "pass --weights" in err
    image = Image.open(out)
    assert image.size == (64, 64)  # the model's own size: UNet sample_size 16 × VAE downsampling 4
    assert image.text["parameters"] == (
        "\nNegative prompt: noisy\nSteps: 1, Sampler: DDIM, CFG scale: 3.0, Seed: 11, Size: 64x64, "
        "Model: mini, Encoding: segment, Max tokens: 240")  # the encoding the miniature records


def test_lora_is_applied(tiny_sd, tmp_path):
    """A LoRA file from save_lora gives the image of the UNet with that LoRA merged into it."""
    unet = load_unet(tiny_sd)
    inject_lora(unet, rank=4)
    generator = torch.Generator().manual_seed(3)
    for name, param in unet.named_parameters():
        if "lora_up" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    save_lora(unet, tmp_path / "style.safetensors")
    merged = tmp_path / "merged"
    shutil.copytree(tiny_sd, merged)
    shutil.rmtree(merged / "unet")
    save_unet_diffusers(merge_and_unload(unet), merged / "unet")

    # Two steps: after one step from pure noise the image is mostly that noise, whatever the UNet says.
    run_sample("a cat", tiny_sd, tmp_path / "lora.png", "--steps", 2, "--lora", tmp_path / "style.safetensors")
    run_sample("a cat", merged, tmp_path / "merged.png", "--steps", 2)
    run_sample("a cat", tiny_sd, tmp_path / "base.png", "--steps", 2)
    assert np.abs(pixels(tmp_path / "lora.png") - pixels(tmp_path / "merged.png")).max() <= 1
    assert np.abs(pixels(tmp_path / "lora.png") - pixels(tmp_path / "base.png")).max() > 10
    assert "LoRA: style.safetensors" in Image.open(tmp_path / "lora.png").text["parameters"]



def test_a_lora_file_we_write_loads_in_diffusers_and_gives_the_same_image(reference, tmp_path):
    """The kohya-named file train.py writes (save_lora_file with its metadata) loads through diffusers'
    StableDiffusionPipeline.load_lora_weights (peft installed), and both pipelines draw the same image."""
    pipe, folder = reference
    unet = load_unet(folder)
    inject_lora(unet, rank=4, alpha=8)
    generator = torch.Generator().manual_seed(4)
    for name, param in unet.named_parameters():
        if "lora_up" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    path = tmp_path / "lora.safetensors"
    save_lora_file(lora_state_dict(unet), path, lora_metadata("tiny_sd", "truncate", 240, "sft", t5=False))
    theirs = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    theirs.load_lora_weights(str(tmp_path), weight_name=path.name)
    theirs.set_progress_bar_config(disable=True)
    prompt, seed = "a cat on a red sofa", 11
    expected = theirs(prompt, num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    run_sample(prompt, folder, tmp_path / "ours.png", "--steps", 2, "--seed", seed, "--lora", path)
    ours, base = pixels(tmp_path / "ours.png"), (expected * 255).round().astype(np.int16)
    assert np.abs(ours - base).max() <= 1
    run_sample(prompt, folder, tmp_path / "plain.png", "--steps", 2, "--seed", seed)
    assert np.abs(pixels(tmp_path / "plain.png") - base).max() > 10  # the LoRA really changed the image


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------------------

def broken_folder(tiny_sd, tmp_path, how):
    folder = tmp_path / how
    shutil.copytree(tiny_sd, folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "swapped":  # unet/ holds the VAE
        shutil.rmtree(folder / "unet")
        shutil.copytree(tiny_sd / "vae", folder / "unet")
    else:  # a download cut short
        unet_file.write_bytes(unet_file.read_bytes()[:3000])
    return folder


BAD_INPUTS = {
    "missing weights": (lambda sd, tmp: ["x", "--weights", tmp / "nowhere"], "not found"),
    "wrong model in folder": (lambda sd, tmp: ["x", "--weights", broken_folder(sd, tmp, "swapped")],
                              "AutoencoderKL"),
    "corrupt file": (lambda sd, tmp: ["x", "--weights", broken_folder(sd, tmp, "truncated")],
                     "truncated or corrupt"),
    # the tiny VAE has two blocks, so it downsamples by 2 (SD-1.5's four by 8, the miniature's three by 4)
    "height not a multiple of the VAE's factor": (lambda sd, tmp: ["x", "--weights", sd, "--height", "31"],
                                                  "multiple of the VAE's downsample factor 2"),
    "width not positive": (lambda sd, tmp: ["x", "--weights", sd, "--width", "0"], "--width must be a positive"),
    "no steps": (lambda sd, tmp: ["x", "--weights", sd, "--steps", "0"], "--steps must be between 1 and 999"),
    "output under a file": (lambda sd, tmp: ["x", "--weights", sd, "--out", tmp / "file.txt" / "out.png"],
                            "choose another --out"),
    "output not a png": (lambda sd, tmp: ["x", "--weights", sd, "--out", tmp / "out.jpg"], "must be a .png"),
    "missing lora": (lambda sd, tmp: ["x", "--weights", sd, "--lora", tmp / "none.safetensors"], "not found"),
    "fp16 on the cpu": (lambda sd, tmp: ["x", "--weights", sd, "--dtype", "fp16"], "needs CUDA"),
    "record not json": (lambda sd, tmp: ["x", "--weights", with_record(sd, tmp, "{encoding: segment")],
                        "is not a valid LongAlign record"),
    "record's sampler unknown": (lambda sd, tmp: ["x", "--weights", with_record(sd, tmp, json.dumps(
        {"encoding": "segment", "sampling": {"sampler": "euler"}}))], "a sampler in ['ddim', 'dpm', 'unipc']"),
    "record's encoding under its old name": (lambda sd, tmp: ["x", "--weights", with_record(sd, tmp, json.dumps(
        {"encoding": "concat"}))], "'concat' is now called 'segment'"),
    "encoding under its old name": (lambda sd, tmp: ["x", "--weights", sd, "--encoding", "concat"],
                                    "--encoding concat is now called --encoding segment"),
    "encoding unknown": (lambda sd, tmp: ["x", "--weights", sd, "--encoding", "a1111"],
                         "choose one of auto, segment,"),
    "record's steps not an integer": (lambda sd, tmp: ["x", "--weights", with_record(sd, tmp, json.dumps(
        {"sampling": {"steps": "ten"}}))], "integer steps in 1..999"),
    "record's entry unknown": (lambda sd, tmp: ["x", "--weights", with_record(sd, tmp, json.dumps(
        {"sampling": {"eta": 0.5}}))], "may hold only ['cfg', 'dtype', 'sampler', 'steps']"),
    # no silent garbage: a guidance scale that is not a number would write a black PNG or turn CFG off
    "cfg infinite": (lambda sd, tmp: ["x", "--weights", sd, "--cfg", "inf"], "--cfg: expected a finite number"),
    "cfg not a number": (lambda sd, tmp: ["x", "--weights", sd, "--cfg", "nan"], "--cfg: expected a finite number"),
    "steps not a number": (lambda sd, tmp: ["x", "--weights", sd, "--steps", "nan"], "--steps: invalid int value"),
    "seed beyond the generator's range": (lambda sd, tmp: ["x", "--weights", sd, "--seed", str(2 ** 64)],
                                          "--seed must be a whole number in [-2**63, 2**64)"),
    "record's cfg not a number": (lambda sd, tmp: ["x", "--weights", with_record(sd, tmp, json.dumps(
        {"sampling": {"cfg": float("nan")}}))], "a finite cfg"),
    "record's dtype only for CUDA": (lambda sd, tmp: ["x", "--weights", with_record(sd, tmp, json.dumps(
        {"sampling": {"dtype": "fp16"}}))], "a dtype in ['bf16', 'fp32']"),
}


def with_record(tiny_sd, tmp_path, text):
    """A copy of the tiny pipeline whose longalign.json holds ``text``."""
    folder = tmp_path / "recorded"
    shutil.copytree(tiny_sd, folder)
    (folder / RECORD).write_text(text)
    return folder


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(tiny_sd, tmp_path, capsys, case):
    make_argv, message = BAD_INPUTS[case]
    (tmp_path / "file.txt").write_text("a regular file\n")
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(a) for a in make_argv(tiny_sd, tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_no_weights_and_no_default_model_says_where_to_get_them(tmp_path):
    """Run as a program from a checkout without weights/, so the shipped default is missing."""
    shutil.copy(REPO / "sample.py", tmp_path / "sample.py")
    bad = subprocess.run([sys.executable, "sample.py", "a red cube", "--out", "out.png"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    err = bad.stderr
    assert "no --weights given" in err and "Download Stable Diffusion 1.5" in err and "--weights PATH" in err


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--weights", "--lora", "--negative", "--steps", "--cfg", "--seed", "--sampler", "--height",
                   "--batch", "--out", "--encoding", "--max-tokens", "--dtype", "segment encoding", "--prompts",
                   "--out-dir", "--batch-size"):
        assert option in text


def test_command_line_error_is_one_line_and_exit_status_2(tmp_path):
    """As a real process, so the exit status and the absence of a traceback are what a user sees."""
    argv = ["a red cube", "--weights", tmp_path / "nowhere", "--out", tmp_path / "out.png"]
    bad = subprocess.run([sys.executable, "sample.py", *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "not found" in bad.stderr and "Traceback" not in bad.stderr
