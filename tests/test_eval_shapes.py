"""python -m mini.evaluate: the miniature's evaluation table, on small random models, and its measurements
(mini/metrics.py)."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from mini import evaluate, metrics, world
from model import weights
from model.clip import CONFIGS as CLIP_CONFIGS, CLIPModel
from model.preference import KINDS, Scorer, fit_direction, save_direction
from model.tokenizer import CLIPTokenizer
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL
from model.weights import save_unet_diffusers, save_vae_diffusers


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random tiny pipeline folder and a random tiny scorer folder with its direction.safetensors."""
    root = tmp_path_factory.mktemp("mini")
    torch.manual_seed(0)
    clip = CLIPModel(CLIP_CONFIGS["test"])
    weights.save_clip_model(clip, root / "scorer")
    tokenizer = CLIPTokenizer()
    scorer = Scorer(clip, KINDS["clip"], tokenizer)
    prompts = [caption for _, caption in world.shapes_split("train", 8)]
    save_direction(root / "scorer" / "direction.safetensors", fit_direction(scorer, prompts, progress=False),
                   scorer, len(prompts))

    pipe = root / "pipeline"
    weights.save_text_encoder(clip.text_model, pipe / "text_encoder")
    tokenizer.save_pretrained(pipe / "tokenizer")
    width = CLIP_CONFIGS["test"].text.width
    save_unet_diffusers(UNet2DConditionModel(dataclasses.replace(UNET_CONFIGS["test"], cross_attention_dim=width)),
                        pipe / "unet")
    # Three VAE levels (like the miniature's) give 16×16 latents, which keeps the UNet cheap.
    save_vae_diffusers(AutoencoderKL(dataclasses.replace(VAE_CONFIGS["test"], block_out_channels=(32, 32, 32))),
                       pipe / "vae")
    weights.write_pipeline_files(pipe)
    return root


def test_frechet_distance_is_zero_for_equal_sets_and_the_mean_gap_for_a_shift():
    features = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    assert abs(metrics.frechet_distance(features, features)) < 1e-6
    # Equal covariances cancel the trace term, leaving |μa − μb|² exactly.
    assert metrics.frechet_distance(features, features + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)
    # Scaling one set by 2 multiplies its covariance by 4: tr(Σ + 4Σ − 2·2Σ) = tr(Σ).
    centred = features - features.mean(0)
    expected = torch.cov(centred.T.double()).trace().item()
    assert metrics.frechet_distance(centred, 2 * centred) == pytest.approx(expected, rel=1e-6)


def test_parse_row():
    assert metrics.parse_row("base=runs/x/pipeline:truncate") == metrics.EvalRow("base", Path("runs/x/pipeline"),
                                                                                 "truncate")
    assert metrics.parse_row("SFT + reward ω=0.3=a/b").path == Path("a/b")  # only the last '=' separates
    assert metrics.parse_row("seg=a/b").encoding == "segment"
    assert metrics.parse_row("seg=a/b:segment") == metrics.parse_row("seg=a/b")
    with pytest.raises(ValueError, match="NAME=PATH"):
        metrics.parse_row("no-path")


def test_last_change_sees_files_inside_linked_folders(tmp_path):
    (tmp_path / "unet-run").mkdir()
    weights_file = tmp_path / "unet-run" / "model.safetensors"
    weights_file.write_bytes(b"x")
    os.utime(weights_file, (2_000_000_000, 2_000_000_000))
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    os.utime(pipeline / "model_index.json", (1_000_000_000, 1_000_000_000))
    (pipeline / "unet").symlink_to(tmp_path / "unet-run", target_is_directory=True)
    assert metrics.last_change(pipeline) == 2_000_000_000  # a retrained, linked UNet makes a cached row stale
    assert metrics.last_change(tmp_path / "missing") == 0.0


def test_fact_accuracy_of_real_renders_is_near_perfect():
    examples = world.shapes_split("test", 20)
    real = metrics.renders(examples)
    assert real.shape == (20, 64, 64, 3) and real.dtype == torch.uint8
    assert metrics.fact_accuracy(real, examples)["all"] >= 99.0
    blank = torch.full_like(real, 255)  # a white canvas: only the "is empty" facts hold
    assert metrics.fact_accuracy(blank, examples)["all"] < 60.0


def test_eval_shapes_writes_the_table(tiny_models, tmp_path, capsys):
    out = tmp_path / "eval.md"
    pipe = tiny_models / "pipeline"
    argv = ["--scenes", "3", "--sample-steps", "2", "--batch-size", "2",
            "--scorer", str(tiny_models / "scorer"), "--row", f"truncate={pipe}:truncate",
            "--row", f"segment={pipe}", "-o", str(out), "--device", "cpu"]
    assert evaluate.main(argv) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    # Finished rows are cached beside the table; a rerun reuses them and writes the same table.
    assert sorted(p.name for p in (tmp_path / "eval.md.rows").iterdir()) == ["segment.json", "truncate.json"]
    out.unlink()
    assert evaluate.main(argv) == 0
    assert out.read_text() == text
    # Retrained weights (a newer file in the pipeline folder) make the cached row stale: it is generated again.
    cached = (tmp_path / "eval.md.rows" / "segment.json").read_text()
    unet_file = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    later = unet_file.stat().st_mtime + 60
    os.utime(unet_file, (later, later))
    assert evaluate.main(argv) == 0
    assert (tmp_path / "eval.md.rows" / "segment.json").read_text() != cached
    rows = [line for line in text.splitlines() if line.startswith("| truncate") or line.startswith("| segment")]
    assert len(rows) == 2
    for row in rows:
        all_facts = float(row.split("|")[2])
        assert 0.0 <= all_facts <= 100.0
    assert "C⊥(p) text-relevant" in text and "η = C_P·V" in text


def test_eval_shapes_refuses_a_lora_row_without_base(tiny_models, capsys):
    code = evaluate.main(["--scenes", "2", "--scorer", str(tiny_models / "scorer"),
                       "--row", "x=adapter.safetensors", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--lora-base" in err and len(err.splitlines()) == 1


def test_evaluate_refuses_a_scorer_without_its_direction(tiny_models, tmp_path, capsys):
    bare = tmp_path / "scorer"
    bare.mkdir()
    for part in (tiny_models / "scorer").iterdir():
        if part.name != "direction.safetensors":
            (bare / part.name).symlink_to(part)
    assert evaluate.main(["--scenes", "2", "--scorer", str(bare), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--direction" in err and len(err.splitlines()) == 1
