"""python -m mini.pretrain --stage clip|vae on the "test" configs: both stages train and write folders that load,
a stopped run resumes exactly (EMA included), and two processes take one process's step with the global
batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mini import pretrain
from mini.world import ShapesDataset
from model.clip import CONFIGS as CLIP_CONFIGS, CLIPModel
from model.preference import load_direction
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL
from model.weights import load_clip, load_text_encoder, load_vae

REPO = Path(__file__).resolve().parents[1]


def clip_args(out, *extra):
    return ["--stage", "clip", "--data", "shapes:8", "--from-scratch", "test", "--out", str(out), "--batch-size", "4",
            "--steps", "2", "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--direction-prompts", "8", *extra]


def vae_args(out, *extra):
    return ["--stage", "vae", "--data", "shapes:8", "--from-scratch", "test", "--out", str(out), "--batch-size", "2",
            "--steps", "2", "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--num-val", "2", *extra]


def losses(records):
    return [r["loss"] for r in records]


def test_clip_stage_writes_a_scorer_and_text_encoder_that_load(tmp_path):
    out, export = tmp_path / "run", tmp_path / "mini"
    records = pretrain.main(clip_args(out, "--export", str(export)))
    assert len(records) == 2 and all(np.isfinite(losses(records)))
    assert pretrain.main(clip_args(out, "--export", str(export), "--resume")) == []  # finished: exports again
    torch.manual_seed(0)  # the run's initial weights (it seeds with --seed 0 right before building the model)
    initial = CLIPModel(CLIP_CONFIGS["test"]).state_dict()
    trained = load_clip(export / "scorer")
    assert all(not torch.equal(v, initial[k]) for k, v in trained.state_dict().items() if k.endswith("weight"))
    text = load_text_encoder(export)
    assert all(torch.equal(v, trained.text_model.state_dict()[k]) for k, v in text.text_model.state_dict().items())
    assert load_direction(export / "scorer" / "direction.safetensors", trained.config.projection_dim).norm() > 0.99
    assert (export / "tokenizer" / "vocab.json").is_file()

    # Oracle: transformers reads the scorer folder as the same CLIPModel.
    import transformers
    reference = transformers.CLIPModel.from_pretrained(export / "scorer").eval()
    ids, pixels = torch.tensor([[49406, 320, 1746, 49407, 49407]]), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        text = reference.text_projection(reference.text_model(input_ids=ids).pooler_output)
        image = reference.visual_projection(reference.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(trained.encode_text(ids), text, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(trained.encode_image(pixels), image, atol=1e-5, rtol=1e-4)


def test_vae_stage_trains_and_fits_its_scaling_factor(tmp_path):
    out = tmp_path / "run"
    records = pretrain.main(vae_args(out, "--sample-every", "2"))
    assert all(np.isfinite(losses(records))) and all(r["kl"] >= 0 for r in records)
    torch.manual_seed(0)
    initial = AutoencoderKL(VAE_CONFIGS["test"]).state_dict()
    vae = load_vae(out / "vae")
    assert any(not torch.equal(v, initial[k]) for k, v in vae.state_dict().items())
    with torch.no_grad():
        images = torch.stack([ShapesDataset("train", 8, 0.0)[i]["image"] for i in range(8)])
        latents = vae.encode(images)[0] * vae.scaling_factor
    assert vae.scaling_factor != 0.18215 and 0.5 < latents.std() < 2.0  # roughly unit-variance latents
    assert Image.open(out / "samples" / "step_000002.png").size == (2 * 64, 2 * 64)  # originals over recons


def test_a_stopped_run_resumes_exactly_with_its_ema(tmp_path):
    extra = ["--ema", "0.5"]
    straight = pretrain.main(clip_args(tmp_path / "straight", *extra, "--steps", "4"))
    first = pretrain.main(clip_args(tmp_path / "resumed", *extra))
    with pytest.raises(SystemExit) as refused:  # another global batch would change the data order
        pretrain.main(clip_args(tmp_path / "resumed", *extra, "--steps", "4", "--resume", "--batch-size", "2"))
    assert refused.value.code == 2
    second = pretrain.main(clip_args(tmp_path / "resumed", *extra, "--steps", "4", "--resume"))
    assert [r["step"] for r in first + second] == [1, 2, 3, 4]
    assert losses(first + second) == losses(straight)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == losses(straight)
    a = load_file(tmp_path / "straight" / "scorer" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "scorer" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA weights the outputs hold, bit for bit


@pytest.mark.parametrize("extra, message", [
    (["--from-scratch", "tiny"], "unknown --from-scratch config 'tiny'"),
    (["--resolution", "128"], "use --resolution 64"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_settings_get_one_line_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exited:
        pretrain.main(vae_args(tmp_path / "run", *extra))
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    pretrain.main(vae_args(tmp_path / "run", "--steps", "1"))
    with pytest.raises(SystemExit):
        pretrain.main(vae_args(tmp_path / "run", "--steps", "1"))
    assert "pass --resume" in capsys.readouterr().err


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """The VAE's loss is a mean over images, so averaging two half-batch gradients is the full batch's; CLIP's
    contrastive loss takes its negatives from each process's own batch, so it is not tested this way.

    Two half-batch means summed in another order differ from one batch mean by float32 rounding; AdamW's
    g / (|g| + eps) turns that into up to ±lr where |g| ≲ eps, so eps is raised to keep the comparison tight.
    """
    steps = ["--adam-eps", "1e-4"]
    one = pretrain.main(vae_args(tmp_path / "one", *steps, "--batch-size", "4"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mini.pretrain", *vae_args(tmp_path / "two", *steps, "--batch-size", "2")]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    a = load_file(tmp_path / "one" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "two" / "vae" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
