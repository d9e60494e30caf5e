"""score.py end to end: parity with transformers for PickScore- and HPSv2-layout scorers, the four modes
(Table 2's --eval agrees with the per-image scores), bad images skipped rather than fatal, the direction file
named, and the clear one-line errors (exit code 2).

Parity uses a tiny random transformers CLIPModel (the real vocabulary and 224-px input, narrow towers),
saved as a transformers folder (PickScore / Denscore layout) and converted in this file to an open_clip
state dict (HPSv2 layout). The oracle is transformers' own CLIPModel, tokenizer and image processor.
Images are fed at a size where the resize is the identity (224×224 for PickScore; 224 wide for HPSv2, which
then only pads), because our torch bicubic resize differs slightly from PIL's, which also rounds to 8 bits:
that difference is checked separately at a looser, stated tolerance.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPImageProcessorPil
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

import score
from model.clip import CLIP_MEAN, CLIP_STD
from model.tokenizer import CLIPTokenizer

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["A red cube rests on short green grass.", "Behind it stands a tall glass vase!",
             "Is the sky pale blue?"]
PROMPT = " ".join(SENTENCES)
TINY = HFCLIPConfig(
    text_config=dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       patch_size=32, image_size=224, hidden_act="gelu"),
    projection_dim=48)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the tiny scorer in both layouts, the transformers oracle, test images
# ---------------------------------------------------------------------------------------------------------

def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel keys -> open_clip's CLIP state-dict keys, written here independently of weights.py."""
    prefixes = [("text_model.embeddings.token_embedding.", "token_embedding."),
                ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
                ("text_model.encoder.layers.", "transformer.resblocks."),
                ("text_model.final_layer_norm.", "ln_final."),
                ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
                ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
                ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
                ("vision_model.pre_layrnorm.", "visual.ln_pre."),
                ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                ("vision_model.post_layernorm.", "visual.ln_post.")]
    inner = [(".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
             (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.out_proj.", ".attn.out_proj.")]
    out = {"text_projection": state["text_projection.weight"].T.contiguous(),
           "visual.proj": state["visual_projection.weight"].T.contiguous(),
           "logit_scale": state["logit_scale"]}
    for key, tensor in state.items():
        if key in ("text_projection.weight", "visual_projection.weight", "logit_scale") or "position_ids" in key:
            continue
        for old, new in prefixes:
            if key.startswith(old):
                key = new + key[len(old):]
        for old, new in inner:
            key = key.replace(old, new)
        if ".self_attn.q_proj." in key:  # open_clip fuses q, k, v into one in_proj
            kind = key.rsplit(".", 1)[1]
            parts = [state_key_of(state, key, name) for name in "qkv"]
            out[key.split(".self_attn.")[0] + f".attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".self_attn." not in key:
            out[key] = tensor
    return out


def state_key_of(state, open_clip_key, name):
    """The transformers tensor for q/k/v of the block that ``open_clip_key`` (renamed, q_proj) belongs to."""
    block, rest = open_clip_key.split(".self_attn.")
    tower = "vision_model.encoder.layers." if block.startswith("visual.") else "text_model.encoder.layers."
    index = block.rsplit(".", 1)[1]
    return state[f"{tower}{index}.self_attn.{name}_proj.{rest.rsplit('.', 1)[1]}"]


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(0)
    return HFCLIPModel(TINY).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, oracle):
    root = tmp_path_factory.mktemp("scorers")
    oracle.save_pretrained(root / "PickScore_tiny")
    state = {k: v for k, v in oracle.state_dict().items()}
    torch.save({"state_dict": to_open_clip(state)}, root / "HPS_v2_tiny.pt")
    CLIPTokenizer().save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def hf_tokenizer(weights):
    return HFCLIPTokenizer.from_pretrained(weights / "tokenizer")


def smooth_image(width, height, seed=0):
    y, x = np.mgrid[0:height, 0:width]
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    channels = [127 + 100 * np.sin(x / 17.0 + phase[0]), 127 + 100 * np.cos(y / 23.0 + phase[1]),
                127 + 90 * np.sin((x + y) / 31.0 + phase[2])]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def noise_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def oracle_score(oracle, tokenizer, pixels):
    """Mean per-sentence cosine (LongAlign §4's segment-level score), straight from transformers."""
    with torch.no_grad():
        ids = tokenizer(SENTENCES, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = F.normalize(oracle.get_text_features(input_ids=ids.input_ids).pooler_output, dim=-1)
        image = F.normalize(oracle.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    return (image @ text.T).mean().item()


def run(capsys, *argv):
    code = score.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------------------

def test_pickscore_layout_parity_with_transformers(weights, oracle, hf_tokenizer, tmp_path, capsys):
    image = noise_image(224, 224)  # resize is the identity; noise makes any pixel slip visible
    image.save(tmp_path / "img.png")
    (tmp_path / "prompt.txt").write_text(PROMPT)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    expected = oracle_score(oracle, hf_tokenizer, processor(images=image, return_tensors="pt").pixel_values)
    [row] = run_json(capsys, tmp_path / "img.png", tmp_path / "prompt.txt", "--scorer", weights / "PickScore_tiny")
    assert abs(row["original"] / 100 - expected) <= 1e-5
    assert row["segments"] == 3


def test_pickscore_resized_image_is_close_to_pil(weights, oracle, hf_tokenizer, tmp_path, capsys):
    """A 320×256 image goes through a real bicubic resize: torch (float) vs PIL (8-bit) agree to 1e-3."""
    image = smooth_image(320, 256)
    image.save(tmp_path / "img.png")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    expected = oracle_score(oracle, hf_tokenizer, processor(images=image, return_tensors="pt").pixel_values)
    [row] = run_json(capsys, tmp_path / "img.png", "--prompt", PROMPT, "--scorer", weights / "PickScore_tiny")
    assert abs(row["original"] / 100 - expected) <= 1e-3


def test_hpsv2_layout_parity_with_transformers(weights, oracle, hf_tokenizer, tmp_path, capsys):
    """HPSv2 preprocessing: longest side to 224, zero-pad to a square (open_clip's ResizeMaxSize, fill 0)."""
    image = noise_image(224, 160, seed=1)  # longest side already 224: no resize, 32 black rows above and below
    image.save(tmp_path / "img.png")
    canvas = np.zeros((224, 224, 3), dtype=np.float32)
    canvas[32:192] = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (torch.from_numpy(canvas).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) \
        / torch.tensor(CLIP_STD)[:, None, None]
    expected = oracle_score(oracle, hf_tokenizer, pixels[None])
    [row] = run_json(capsys, tmp_path / "img.png", "--prompt", PROMPT, "--scorer", weights / "HPS_v2_tiny.pt")
    assert abs(row["original"] / 100 - expected) <= 1e-5
    # and the kind really changed the preprocessing: the PickScore crop gives another score here
    [cropped] = run_json(capsys, tmp_path / "img.png", "--prompt", PROMPT, "--scorer", weights / "HPS_v2_tiny.pt",
                         "--kind", "pickscore")
    assert abs(cropped["original"] / 100 - expected) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Scoring many images, the direction, retrieval
# ---------------------------------------------------------------------------------------------------------

def test_fit_direction_then_decompose_and_rank(weights, tmp_path, capsys):
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join([PROMPT, "A lone tree on a hill.", "Snow. Wind! A cabin with a red door.",
                                 "Two dogs run along a beach at dusk."]))
    direction = tmp_path / "V.safetensors"
    code, out, err = run(capsys, "--fit-direction", corpus, "-o", direction, "--scorer", weights / "PickScore_tiny")
    assert code == 0, err
    assert "saved V (48 dims, 4 prompts" in out

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        noise_image(256, 224, seed=i).save(folder / f"{i}.png")
    rows = run_json(capsys, folder, "--prompt", PROMPT, "--scorer", weights / "PickScore_tiny",
                    "--direction", direction)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert sorted(r["image"] for r in rows) == [str(folder / f"{i}.png") for i in range(3)]
    assert [r["relevant"] for r in rows] == sorted((r["relevant"] for r in rows), reverse=True)
    for r in rows:
        assert abs(r["original"] - (r["relevant"] + r["irrelevant"])) < 1e-4
        assert 0 < r["eta"] <= 1

    code, out, err = run(capsys, folder / "0.png", folder / "1.png", "--prompt", PROMPT,
                         "--scorer", weights / "PickScore_tiny", "--direction", direction)
    assert code == 0 and "irrelevant" in out and "eta" in out


def test_retrieval_tables_use_one_pass_over_the_images(weights, tmp_path, capsys, monkeypatch):
    captions = [PROMPT, "A lone tree on a hill. The grass is dry. Clouds gather.",
                "Snow. Wind! A cabin with a red door.", "Two dogs run along a beach at dusk. One is wet."]
    lines = []
    for i, caption in enumerate(captions):
        noise_image(224, 224, seed=10 + i).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *args: opened.append(path) or original_open(path, *args))
    results = run_json(capsys, "--retrieval", tmp_path / "manifest.jsonl", "--scorer", weights / "PickScore_tiny",
                       "--max-sentences", "1,2,3")
    assert len(opened) == 4  # every table from one pass over the images
    assert results["pairs"] == 4 and results["direction"] == "fitted on these captions"
    assert set(results["table1"]) == {"original", "relevant"}
    assert set(results["table1"]["original"]) == {"single", "average"}
    assert set(results["table4"]["relevant"]) == {"1", "2", "3"}
    for table in ("table1", "table4"):
        for row in results[table].values():
            assert all(value in (0.0, 25.0, 50.0, 75.0, 100.0) for value in row.values())
    code, out, _ = run(capsys, "--retrieval", tmp_path / "manifest.jsonl", "--scorer", weights / "PickScore_tiny")
    assert code == 0 and "C⊥(p) text-relevant" in out and "single" in out


def test_unusual_image_modes_are_converted(weights, tmp_path, capsys):
    base = smooth_image(240, 200)
    base.convert("L").save(tmp_path / "gray.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).save(tmp_path / "deep16.png")
    assert Image.open(tmp_path / "deep16.png").mode.startswith("I")
    rows = run_json(capsys, tmp_path, "--prompt", PROMPT, "--scorer", weights / "PickScore_tiny")
    assert len(rows) == 3
    by_name = {r["image"].rsplit("/", 1)[1]: r["original"] for r in rows}
    assert abs(by_name["gray.png"] - by_name["deep16.png"]) < 0.5  # the same picture at 8 and 16 bits


# ---------------------------------------------------------------------------------------------------------
# Clear errors: exit code 2, one line, no traceback
# ---------------------------------------------------------------------------------------------------------

def expect_error(capsys, message, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_clear_errors(weights, tmp_path, capsys):
    scorer = ("--scorer", weights / "PickScore_tiny")
    good = tmp_path / "good.png"
    noise_image(224, 224).save(good)
    (tmp_path / "prompt.txt").write_text(PROMPT)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "fake.png").write_text("not an image")
    expect_error(capsys, "is not a readable image", tmp_path / "fake.png", tmp_path / "prompt.txt", *scorer)
    expect_error(capsys, "image not found", tmp_path / "missing.png", tmp_path / "prompt.txt", *scorer)
    expect_error(capsys, "is empty", good, tmp_path / "empty.txt", *scorer)
    expect_error(capsys, "must be the prompt file", good, good, *scorer)

    wrong = tmp_path / "unet"
    wrong.mkdir()
    torch.save({"state_dict": {"conv_in.weight": torch.zeros(4, 4, 3, 3)}}, wrong / "open_clip_pytorch_model.bin")
    expect_error(capsys, "not the CLIP model expected here", good, "--prompt", PROMPT, "--scorer", wrong)
    expect_error(capsys, "no CLIP weights", good, "--prompt", PROMPT, "--scorer", tmp_path)

    other = tmp_path / "V.safetensors"
    from safetensors.torch import save_file
    save_file({"direction": torch.ones(1024)}, str(other))
    expect_error(capsys, "has 1024 dims", good, "--prompt", PROMPT, *scorer, "--direction", other)
    expect_error(capsys, "--max-sentences takes one number", good, "--prompt", PROMPT, *scorer,
                 "--max-sentences", "1,2")
    expect_error(capsys, "nothing to do", *scorer)


def test_the_miniature_evaluation_flags_name_their_new_command(capsys):
    """The miniature's evaluation left score.py: its flags get one line naming the command that has them."""
    flag = "--eval-" + "shapes"
    expect_error(capsys, f"{flag} is no longer part of score.py: run `python -m mini.evaluate`", flag, "--row",
                 "segment=runs/x/pipeline", "-o", "eval.md")
    with pytest.raises(SystemExit) as exit_info:  # any other unknown flag: argparse's own message
        score.main(["--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_no_scorer_and_no_default_names_where_to_get_one(tmp_path):
    """Run as a program from a checkout without weights/: the error lists the public scorers, in one line."""
    shutil.copy(REPO / "score.py", tmp_path / "score.py")
    noise_image(224, 224).save(tmp_path / "good.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "score.py", "good.png", "--prompt", PROMPT], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "no --scorer given" in bad.stderr and "PickScore_v1" in bad.stderr


# ---------------------------------------------------------------------------------------------------------
# Table 2's evaluation of a folder, and bad images that do not stop a run
# ---------------------------------------------------------------------------------------------------------

EVAL_PROMPTS = [PROMPT, "A lone tree on a hill. The grass is dry.", "Snow. Wind! A cabin with a red door.",
                "Two dogs run along a beach at dusk.", "A kettle on a stove. Steam rises.", "An empty road at noon."]


@pytest.fixture(scope="module")
def direction(weights, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "prompts.txt"
    corpus.write_text("\n".join(EVAL_PROMPTS))
    path = corpus.with_name("V.safetensors")
    assert score.main(["--fit-direction", str(corpus), "-o", str(path), "--scorer",
                       str(weights / "PickScore_tiny")]) == 0
    return path


def write_bad_images(folder, *names):
    """The first name is not an image at all, the second a PNG cut in half."""
    (folder / names[0]).write_text("not an image")
    noise_image(224, 224, seed=99).save(folder / names[1])
    whole = (folder / names[1]).read_bytes()
    (folder / names[1]).write_bytes(whole[:len(whole) // 2])


def test_eval_means_are_those_of_the_per_image_scores(weights, direction, tmp_path, capsys):
    """Pairs by name or 5-digit index; a broken, a truncated and a missing image are skipped and named."""
    folder = tmp_path / "samples"
    folder.mkdir()
    names = [None, "cabin", None, None, None, None]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p} | ({"name": n} if n else {})) + "\n"
                               for p, n in zip(EVAL_PROMPTS, names)))
    good = [folder / "00000.png", folder / "cabin.png", folder / "00002.png"]
    for seed, path in enumerate(good):
        noise_image(224, 224, seed=seed).save(path)
    write_bad_images(folder, "00003.png", "00004.png")  # and no 00005.png
    scorer = ("--scorer", weights / "PickScore_tiny", "--direction", direction)
    code, out, err = run(capsys, "--eval", folder, "--prompts", prompts, *scorer, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["images"], summary["skipped"], summary["direction"]) == (3, 3, f"from {direction}")
    notes = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(notes) == 3 and all(name in " ".join(notes) for name in ("00003.png", "00004.png", "00005.png"))
    assert "skipped 3 of 6 images" in err
    rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    assert [(r["index"], r["image"]) for r in rows] == [(0, str(good[0])), (1, str(good[1])), (2, str(good[2]))]
    plain = {}
    for row in rows:
        [single] = run_json(capsys, row["image"], "--prompt", EVAL_PROMPTS[row["index"]], *scorer)
        plain[row["index"]] = single
        for key in ("original", "relevant", "irrelevant", "eta"):
            assert abs(row[key] - single[key]) < 1e-4, key
    for key in ("original", "relevant"):
        values = [plain[i][key] for i in range(3)]
        mean = sum(values) / 3
        std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5  # the sample std, n - 1
        assert abs(summary[key]["mean"] - mean) < 1e-4
        assert abs(summary[key]["ci95"] - 1.96 * std / 3 ** 0.5) < 1e-4
    code, out, err = run(capsys, "--eval", folder, "--prompts", prompts, *scorer, "--out", tmp_path / "s.jsonl")
    assert code == 0 and "Denscore-O" in out and "±" in out
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3


def test_eval_pairs_by_the_manifest_of_the_batch_sampler(weights, direction, tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(EVAL_PROMPTS[:3]) + "\n\n")
    lines = [{"settings": {"steps": 10}}, {"file": "b.png", "prompt": EVAL_PROMPTS[0], "index": 0},
             {"file": "a.png", "prompt": EVAL_PROMPTS[1], "index": 1}]  # prompt 2 not written yet
    (folder / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    noise_image(224, 224, seed=0).save(folder / "a.png")
    noise_image(224, 224, seed=1).save(folder / "b.png")
    noise_image(224, 224, seed=2).save(folder / "00000.png")  # not the image of prompt 0: the manifest says b.png
    scorer = ("--scorer", weights / "PickScore_tiny", "--direction", direction)
    code, out, err = run(capsys, "--eval", folder, "--prompts", prompts, *scorer, "--json")
    assert code == 0, err
    assert json.loads(out)["skipped"] == 1 and "00002.png" in err
    rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    assert [(r["index"], Path(r["image"]).name) for r in rows] == [(0, "b.png"), (1, "a.png")]
    [single] = run_json(capsys, folder / "b.png", "--prompt", EVAL_PROMPTS[0], *scorer)
    assert abs(rows[0]["original"] - single["original"]) < 1e-4

    lines[1]["prompt"] = "another prompt"
    (folder / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    expect_error(capsys, "b.png was not sampled from prompt 0", "--eval", folder, "--prompts", prompts, *scorer)
    expect_error(capsys, "--eval DIR and --prompts FILE go together", "--eval", folder, *scorer)
    expect_error(capsys, "--eval folder not found", "--eval", tmp_path / "nowhere", "--prompts", prompts, *scorer)
    expect_error(capsys, "--retrieval and --eval do not go together", "--eval", folder, "--prompts", prompts,
                 "--retrieval", prompts, *scorer)


def test_a_bad_image_in_a_folder_is_skipped_not_fatal(weights, tmp_path, capsys):
    for i in range(2):
        noise_image(224, 224, seed=i).save(tmp_path / f"{i}.png")
    write_bad_images(tmp_path, "bad.png", "cut.png")
    code, out, err = run(capsys, tmp_path, "--prompt", PROMPT, "--scorer", weights / "PickScore_tiny", "--json")
    assert code == 0, err
    assert sorted(Path(r["image"]).name for r in json.loads(out)) == ["0.png", "1.png"]
    notes = err.strip().splitlines()
    assert len(notes) == 3 and "bad.png is not a readable image" in notes[0] and "cut.png" in notes[1]
    assert notes[2] == "skipped 2 of 4 images; scored the other 2"
    for i in range(2):
        (tmp_path / f"{i}.png").unlink()
    code, out, err = run(capsys, tmp_path, "--prompt", PROMPT, "--scorer", weights / "PickScore_tiny")
    assert code == 2 and err.strip().splitlines()[-1].endswith("none of the 2 images could be read (each is named "
                                                                "above)")


def test_retrieval_refuses_a_single_pair(weights, tmp_path, capsys):
    """One pair always retrieves itself: R@1 would read 100% whatever the scorer."""
    noise_image(224, 224).save(tmp_path / "0.png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "0.png", "caption": PROMPT}) + "\n")
    expect_error(capsys, "retrieval needs at least 2 image-caption pairs", "--retrieval", tmp_path / "manifest.jsonl",
                 "--scorer", weights / "PickScore_tiny")


def test_the_direction_file_used_is_named(weights, direction, tmp_path, capsys):
    """V beside the scorer is picked up (by the rule reward training uses too) and never silently."""
    beside = tmp_path / "scorer"
    beside.mkdir()
    for file in (weights / "PickScore_tiny").iterdir():
        (beside / file.name).symlink_to(file)
    noise_image(224, 224).save(tmp_path / "0.png")
    code, out, err = run(capsys, tmp_path / "0.png", "--prompt", PROMPT, "--scorer", beside, "--json")
    assert code == 0 and "relevant" not in json.loads(out)[0] and "common direction" not in err
    shutil.copy(direction, beside / "direction.safetensors")
    code, out, err = run(capsys, tmp_path / "0.png", "--prompt", PROMPT, "--scorer", beside, "--json")
    assert code == 0 and "relevant" in json.loads(out)[0]
    assert err == f"common direction V: {beside / 'direction.safetensors'} (found beside the scorer)\n"
    code, out, err = run(capsys, tmp_path / "0.png", "--prompt", PROMPT, "--scorer", beside, "--direction", direction)
    assert code == 0 and err == f"common direction V: {direction}\n"
