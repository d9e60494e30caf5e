"""`sample.py --longsd` on a tiny stand-in for the authors' released LongSD, against an oracle built without our code.

The stand-in release: the tiny diffusers pipeline of test_sample.py as SD-1.5, a tiny transformers T5 with a
tokenizer.json, a TextAdapter folder, and the two LoRA lists written in the release's nameless format by the
test's own walk over diffusers' UNet (test_lora_formats.release_lists). The oracle is diffusers'
StableDiffusionPipeline with the two lists merged into its UNet, UniPCMultistepScheduler from SD-1.5's PNDM
config, and `prompt_embeds` built from transformers' CLIP (the segment concatenation of LongAlign §3 written
out here), transformers' T5 without an attention mask, and the adapter's maths. Same seed, fp32: within 1/255.
"""
import copy
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import sample
from model.t5 import AdapterConfig, TextAdapter, save_adapter
from test_lora_formats import release_lists
from test_sample import pixels, reference  # noqa: F401  (the tiny SD-1.5 pipeline fixture)
from test_t5 import adapter_maths, build_t5_tokenizer, randomized

SENTENCES = ["A red cube sits on a blue table.", "Two small birds fly over it!"]
PROMPT = " ".join(SENTENCES)
PNDM_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
               "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}
T5_WIDTH = 32


@pytest.fixture(scope="module")
def release(reference, tmp_path_factory):  # noqa: F811
    """(the oracle pipeline, the SD-1.5 folder, the LongSD folder, the T5 folder, the T5 model, the adapter)."""
    pipe, folder = reference
    root = tmp_path_factory.mktemp("longsd")
    sd_folder = root / "sd15"  # the test pipeline with SD-1.5's own scheduler config, which the release read
    shutil.copytree(folder, sd_folder)
    (sd_folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(PNDM_CONFIG))
    torch.manual_seed(0)
    t5 = randomized(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=256, d_model=T5_WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=4)))
    t5.save_pretrained(root / "t5")
    build_t5_tokenizer(root / "t5")
    width = pipe.text_encoder.config.hidden_size
    adapter = randomized(TextAdapter(AdapterConfig(in_dim=T5_WIDTH, int_dim=24, out_dim=width)))
    save_adapter(adapter, root / "release" / "s28750_adapter")
    unet = copy.deepcopy(pipe.unet)
    (sft, reward), _ = release_lists(unet, 2, [1, 2])  # merges both into this copy, as the oracle's UNet
    torch.save(sft, root / "release" / "s28750_lora_vis.pt")
    torch.save(reward, root / "release" / "sd15-reward-3750.pt")
    oracle = diffusers.StableDiffusionPipeline(**{
        **pipe.components, "unet": unet, "scheduler": diffusers.UniPCMultistepScheduler.from_config(PNDM_CONFIG)})
    oracle.set_progress_bar_config(disable=True)
    return oracle, sd_folder, root / "release", root / "t5", t5.eval(), adapter.eval()


def clip_block(pipe, ids: list[int]) -> torch.Tensor:
    """One sentence alone through transformers' CLIP: [sot] ids [eot] [eot]... (SD pads with <eot>) -> [77, D]."""
    framed = torch.tensor([[49406, *ids, 49407] + [49407] * (75 - len(ids))])
    return pipe.text_encoder(framed).last_hidden_state[0]


def clip_segments(pipe, sentences: list[str]) -> torch.Tensor:
    """LongAlign §3 written out: keep each sentence's <sot> and content rows, concatenate, pad to 240 with
    <pad*>, the mean of rows 17..76 of the empty prompt's encoding."""
    rows = []
    for sentence in sentences:
        ids = pipe.tokenizer(sentence, add_special_tokens=False).input_ids
        rows.append(clip_block(pipe, ids)[:1 + len(ids)])
    pad_star = clip_block(pipe, [])[17:77].mean(dim=0)
    kept = torch.cat(rows)
    return torch.cat([kept, pad_star.expand(240 - len(kept), -1)])[None]  # [1, 240, D]


def t5_rows(t5, adapter, t5_folder, prompt: str) -> torch.Tensor:
    tokenizer = transformers.T5TokenizerFast(tokenizer_file=str(t5_folder / "tokenizer.json"), extra_ids=0)
    ids = tokenizer([prompt], max_length=240, padding="max_length", truncation=True, return_tensors="pt").input_ids
    return adapter_maths(dict(adapter.named_parameters()), t5(input_ids=ids).last_hidden_state)  # no mask


def test_longsd_image_equals_the_oracle(release, tmp_path, capsys):
    oracle, sd_folder, longsd, t5_folder, t5, adapter = release
    with torch.no_grad():
        cond = torch.cat([clip_segments(oracle, SENTENCES), t5_rows(t5, adapter, t5_folder, PROMPT)], dim=1)
        # "" is one segment with no content: its <sot> row, then <pad*>
        uncond = torch.cat([clip_segments(oracle, [""]), t5_rows(t5, adapter, t5_folder, "")], dim=1)
    assert cond.shape == (1, 480, oracle.text_encoder.config.hidden_size)
    expected = oracle(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, guidance_scale=7.5,
                      height=32, width=32, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    expected = (expected[0] * 255).round().astype(np.int16)

    out = tmp_path / "longsd.png"
    sample.main([PROMPT, "--weights", str(sd_folder), "--longsd", str(longsd), "--t5", str(t5_folder),
                 "--steps", "3", "--seed", "5", "--height", "32", "--width", "32", "--dtype", "fp32",
                 "--out", str(out)])
    ours = pixels(out)
    assert ours.std() > 5 and np.abs(ours - expected).max() <= 1
    printed = capsys.readouterr().out
    assert "unipc" in printed.lower() and "480" in printed  # the release's sampler and context, said


def test_longsd_defaults_are_the_releases_and_the_png_says_so(release, tmp_path):
    _, sd_folder, longsd, t5_folder, _, _ = release
    out = tmp_path / "longsd.png"
    sample.main([PROMPT, "--weights", str(sd_folder), "--longsd", str(longsd), "--t5", str(t5_folder),
                 "--height", "32", "--width", "32", "--dtype", "fp32", "--out", str(out)])
    text = Image.open(out).text["parameters"]
    assert "Steps: 25" in text and "UNIPC" in text.upper() and "CFG scale: 7.5" in text
    assert "s28750_lora_vis.pt" in text or longsd.name in text


def test_longsd_without_t5_names_the_fix(release, tmp_path, capsys):
    _, sd_folder, longsd, _, _, _ = release
    with pytest.raises(SystemExit) as exited:
        sample.main([PROMPT, "--weights", str(sd_folder), "--longsd", str(longsd), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--t5" in err and len(err.strip().splitlines()) == 1
