"""The shipped miniature, weights/mini: it loads in the layouts the scripts read, fits the size budget, and
samples a 64×64 image of the shapes world, both through the library and through sample.py."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sample
from mini import world
from model.diffusion import DPMSolverSampler, NoiseSchedule, sample_loop
from model.longtext import LongPromptEncoder
from model.preference import Scorer, load_direction
from model.weights import load_pipeline

MINI = Path(__file__).resolve().parent.parent / "weights" / "mini"
# The shipped miniature stays small enough to live in the repository: 20 MB of pipeline and first scorer, and
# 16 MB of separate scorer, 12.6 MB of which is CLIP's 49,408-row token table at 128 wide in fp16.
BUDGET_BYTES = 40 * 1024 * 1024
CAPTION = world.shapes_example("test", 0)[1]


def test_the_shipped_folder_is_complete_and_within_budget():
    for part in ("tokenizer/vocab.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "scorer/config.json", "scorer/model.safetensors",
                 "scorer/direction.safetensors", "separate_scorer/config.json", "separate_scorer/model.safetensors",
                 "separate_scorer/direction.safetensors"):
        assert (MINI / part).is_file(), part
    assert sum(f.stat().st_size for f in MINI.rglob("*") if f.is_file()) <= BUDGET_BYTES


def test_the_shipped_pipeline_samples_a_shapes_image():
    pipe = load_pipeline(MINI, dtype=torch.float32, device="cpu")
    assert pipe.text_encoder.hidden_size == pipe.unet.config.cross_attention_dim
    encoder = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder)
    with torch.no_grad():
        cond, uncond = encoder([CAPTION]), encoder([""])
    noise = torch.randn(pipe.vae.latent_shape(1, world.CANVAS, world.CANVAS), generator=torch.Generator().manual_seed(0))
    latents = sample_loop(pipe.unet, DPMSolverSampler(NoiseSchedule(), 4), noise, cond, uncond, 3.0, progress=False)
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.scaling_factor)
    assert image.shape == (1, 3, world.CANVAS, world.CANVAS)
    assert torch.isfinite(image).all()


def test_the_shipped_scorer_loads_with_its_direction():
    scorer = Scorer.load(MINI / "scorer")
    direction = load_direction(MINI / "scorer" / "direction.safetensors", scorer.embed_dim)
    render = world.render(world.shapes_example("test", 0)[0])
    parts = scorer.score([render], [CAPTION], direction)
    assert torch.allclose(parts.original, parts.relevant + parts.irrelevant, atol=1e-5)


def test_sample_py_with_no_weights_flag_uses_the_miniature(tmp_path, capsys):
    out = tmp_path / "mini.png"
    sample.main([CAPTION, "--steps", "4", "--out", str(out)])
    image = Image.open(out)
    assert image.size == (world.CANVAS, world.CANVAS)
    assert np.asarray(image.convert("RGB")).std() > 0  # not a blank canvas
    assert "shapes world" in capsys.readouterr().err


def test_sample_py_with_no_flags_draws_the_captions_facts(tmp_path, capsys):
    """The miniature's main job: `python sample.py "<caption>"`, no flags, writes an image whose facts hold. It samples
    with the settings weights/mini/longalign.json records (those of the README table, 89.1% of facts over 500
    scenes). Over the first 8 held-out captions (about 60 facts, a standard error near 5 points) at least 70%
    of the facts must hold, by mini.world.check_facts."""
    holds = []
    for index in range(8):
        scene, caption = world.shapes_example("test", index)
        out = tmp_path / f"scene{index}.png"
        sample.main([caption, "--out", str(out)])
        holds += [fact["holds"] for fact in world.check_facts(Image.open(out), scene)["facts"]]
    assert "sampling: dpm, 10 steps, CFG 3.0" in capsys.readouterr().out
    assert len(holds) >= 50 and np.mean(holds) >= 0.70


def test_a_prompt_outside_the_world_still_gives_an_image(tmp_path):
    out = tmp_path / "dog.png"
    sample.main(["a photo of a dog on a beach", "--steps", "2", "--out", str(out)])
    assert Image.open(out).size == (world.CANVAS, world.CANVAS)
