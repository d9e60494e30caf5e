"""train.py on tiny random models (CPU), driven through main(argv): both stages run and learn, the reward
stage's gradient has exactly the structure LongAlign §4 describes (checked on the model/ functions train.py
calls), a stopped-and-resumed run equals an uninterrupted one, and bad input gets a one-line error with exit
code 2."""
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sample
import train
from model import runtime, weights
from model.clip import CLIPConfig, CLIPModel, CLIPTextModel, TextConfig, VisionConfig
from model.diffusion import DDIMSampler, NoiseSchedule, denoising_loss, gradient_steps, rollout
from model.kernels import score_projection
from model.longtext import LongPromptEncoder
from model.lora import inject_lora, load_lora, lora_layers, merge_and_unload
from model.preference import Scorer, save_direction
from model.tokenizer import CLIPTokenizer
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL, posterior_sample
from model.weights import load_text_encoder, load_unet, load_vae, save_unet_diffusers, save_vae_diffusers

# Models this small gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's waiting
# between threads made every step about ten times slower.
torch.set_num_threads(1)

TEXT = TextConfig(width=32, layers=1, heads=2, mlp=64, act="quick_gelu", vocab_size=49408, max_positions=77)
VISION = VisionConfig(width=32, layers=1, heads=2, mlp=64, act="gelu", patch_size=32, image_size=224)
CAPTION = ("A red cube number {i} sits on a wooden table. It casts a long shadow to the left! The sky behind it "
           "is pale blue; two birds fly over the hills. A small boat floats on the lake in the distance.")


def build_tiny_world(root):
    """A tiny SD-style pipeline folder, a tiny scorer, 8 captioned images and a prompt file under ``root``."""
    torch.manual_seed(0)
    CLIPTokenizer().save_pretrained(root / "pipe" / "tokenizer")
    weights.save_text_encoder(CLIPTextModel(TEXT).text_model, root / "pipe" / "text_encoder")
    save_unet_diffusers(UNet2DConditionModel(UNET_CONFIGS["test"]), root / "pipe" / "unet")  # context width 32
    save_vae_diffusers(AutoencoderKL(VAE_CONFIGS["test"]), root / "pipe" / "vae")
    weights.save_clip_model(CLIPModel(CLIPConfig(TEXT, VISION, projection_dim=16)), root / "scorer")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(CAPTION.format(i=i))
    (root / "prompts.txt").write_text("\n".join(CAPTION.format(i=i) for i in range(8)))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("world"))


def tiny_args(world, out, stage="sft", *extra):
    """A fast command line: 16 px images (8×8 latents), batch 2, rank-4 LoRA, no workers, no previews."""
    data = world / ("prompts.txt" if stage == "reward" else "images")
    args = ["--stage", stage, "--weights", str(world / "pipe"), "--data", str(data), "--out", str(out),
            "--resolution", "16", "--batch-size", "2", "--grad-accum", "1", "--lora-rank", "4", "--lr", "1e-3",
            "--warmup", "1", "--workers", "0", "--sample-every", "0", "--val-steps", "2", "--num-val", "2"]
    if stage == "reward":
        args += ["--scorer", str(world / "scorer"), "--rollout-steps", "4", "--grad-stride", "2", "--cfg", "3"]
    return args + list(extra)


def losses(records):
    return [r["loss"] for r in records]


# ----------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------

def test_sft_lora_trains_and_is_loadable(world, tmp_path, capsys):
    records = train.main(tiny_args(world, tmp_path, "sft", "--steps", "3", "--grad-accum", "2"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(losses(records)))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses(lines) == losses(records)

    lora = load_file(tmp_path / "lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in lora)  # kohya names, which A1111, ComfyUI and diffusers read
    with safe_open(tmp_path / "lora.safetensors", "pt") as f:
        metadata = f.metadata()
    assert (metadata["encoding"], metadata["max_tokens"], metadata["stage"]) == ("segment", "240", "sft")
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and all(u.abs().sum() > 0 for u in ups)  # up starts at zero: a nonzero one was trained

    # What sample.py --weights BASE --lora OUT/lora.safetensors does: base UNet + LoRA changes the output.
    base = load_unet(world / "pipe")
    tuned = load_unet(world / "pipe")
    load_lora(tuned, tmp_path / "lora.safetensors")
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 240, 32)
    with torch.no_grad():
        assert not torch.allclose(base(x, 500, context), tuned(x, 500, context))
    sample.main([CAPTION.format(i=0), "--weights", str(world / "pipe"), "--lora", str(tmp_path / "lora.safetensors"),
                 "--steps", "2", "--height", "16", "--width", "16", "--out", str(tmp_path / "sample.png")])
    assert Image.open(tmp_path / "sample.png").size == (16, 16)
    # The caption fits 77 tokens, where sample.py's auto encoding would pick plain CLIP for an untrained model;
    # the LoRA file's metadata says it was trained with segment encoding, so that is what sampling uses.
    assert "encoding: segment" in capsys.readouterr().out


def test_sft_full_writes_unet_previews_and_a_loadable_export(world, tmp_path):
    out, export = tmp_path / "run", tmp_path / "pipeline"
    train.main(tiny_args(world, out, "sft", "--steps", "2", "--full", "--sample-every", "1", "--export", str(export)))
    assert (out / "samples" / "step_000001.png").is_file() and (out / "samples" / "step_000002.png").is_file()
    base, trained, exported = load_unet(world / "pipe"), load_unet(out / "unet"), load_unet(export)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) > 0.9 * len(base.state_dict())  # the whole UNet trained, not a LoRA
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in trained.state_dict().items())
    load_vae(export), load_text_encoder(export)
    assert (export / "tokenizer" / "vocab.json").is_file()
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def frozen_parts(world):
    """The tokenizer, text encoder and VAE as train.py holds them: frozen."""
    text_encoder = load_text_encoder(world / "pipe").eval().requires_grad_(False)
    return CLIPTokenizer(), text_encoder, load_vae(world / "pipe").eval().requires_grad_(False)


def test_sft_loss_falls_on_a_fixed_batch(world):
    torch.manual_seed(0)
    tokenizer, text_encoder, vae = frozen_parts(world)
    unet = load_unet(world / "pipe")
    inject_lora(unet, 4)
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    captions = [CAPTION.format(i=0), CAPTION.format(i=1)]
    with torch.no_grad():
        mean, logvar = vae.encode(images)
        latents = posterior_sample(mean, logvar, torch.randn(2, 4, 8, 8)) * vae.scaling_factor
        context = encoder(captions)
    noise, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100, 600])
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(15):
        loss = denoising_loss(unet, NoiseSchedule(), latents, context, noise, timesteps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history


# ----------------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------------

def test_reward_stage_trains_and_logs_the_score_parts(world, tmp_path):
    sft = tmp_path / "sft"
    train.main(tiny_args(world, sft, "sft", "--steps", "1"))
    records = train.main(tiny_args(world, tmp_path / "reward", "reward", "--steps", "2", "--sft-lora",
                                   str(sft / "lora.safetensors"), "--sample-every", "2"))
    assert all(np.isfinite(losses(records)))
    for r in records:
        assert r["original"] == pytest.approx(r["relevant"] + r["irrelevant"], abs=1e-5)
        assert r["loss"] == pytest.approx(0.5 * (1 - r["score"]), abs=1e-6)
        assert r["score"] == pytest.approx(r["relevant"] + 0.3 * r["irrelevant"], abs=1e-5)
    assert (tmp_path / "reward" / "samples" / "step_000002.png").is_file()

    # lora.safetensors (SFT and reward stacked, rank 8) on the ORIGINAL base equals merging SFT, then reward.
    reward_only = load_file(tmp_path / "reward" / "lora_reward.safetensors")
    assert any(v.abs().sum() > 0 for k, v in reward_only.items() if k.endswith("lora_up.weight"))
    stacked = load_unet(world / "pipe")
    load_lora(stacked, tmp_path / "reward" / "lora.safetensors")
    assert next(iter(lora_layers(stacked).values())).rank == 8
    in_turn = load_unet(world / "pipe")
    load_lora(in_turn, sft / "lora.safetensors")
    merge_and_unload(in_turn)
    load_lora(in_turn, tmp_path / "reward" / "lora_reward.safetensors")
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 240, 32)
    with torch.no_grad():
        torch.testing.assert_close(stacked(x, 300, context), in_turn(x, 300, context), atol=1e-5, rtol=1e-5)


@pytest.fixture()
def reward_parts(world):
    torch.manual_seed(0)
    tokenizer, text_encoder, vae = frozen_parts(world)
    unet = load_unet(world / "pipe")
    inject_lora(unet, 4)
    scorer = Scorer.load(world / "scorer")
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    prompts = [CAPTION.format(i=0), CAPTION.format(i=1)]
    with torch.no_grad():
        cond, uncond = encoder(prompts), encoder([""])
    return dict(unet=unet, vae=vae, scorer=scorer, text_encoder=text_encoder, cond=cond, uncond=uncond,
                prompts=prompts, encoded=scorer.encode_prompts(prompts),
                sampler=DDIMSampler(NoiseSchedule(), 4, "trailing"))


def run_reward(p, grad_steps, omega=0.3):
    """What train.py's reward step computes: rollout, decode to [0, 1], Scorer.score, 0.5 · (1 − score)."""
    x0 = rollout(p["unet"], p["sampler"], torch.randn(2, 4, 8, 8), p["cond"], p["uncond"], 3.0, grad_steps)
    images = (p["vae"].decode(x0 / p["vae"].scaling_factor) / 2 + 0.5).clamp(0, 1)
    parts = p["scorer"].score(images, p["prompts"], None, omega, random_crop=15,
                              generator=torch.Generator().manual_seed(0))
    return 0.5 * (1 - parts.score.mean()), parts


def test_reward_gradient_reaches_only_lora_and_only_through_the_k_steps(reward_parts):
    unet = reward_parts["unet"]
    calls = []  # (grad enabled, input latent requires grad) for every UNet forward
    unet.register_forward_pre_hook(lambda _, inputs: calls.append((torch.is_grad_enabled(), inputs[0].requires_grad)))
    assert gradient_steps(50, 10, 3) == {3, 13, 23, 33, 43}
    grad_steps = gradient_steps(4, 2, 1)  # {1, 3}
    loss, _ = run_reward(reward_parts, grad_steps)

    # Forward: two UNet calls recorded a graph and two ran under no_grad; none got a latent with history.
    assert [enabled for enabled, _ in calls] == [False, True, False, True]
    assert not any(needs_grad for _, needs_grad in calls)
    loss.backward()
    assert len(calls) == 4 + 2  # backward recomputed exactly the two checkpointed calls

    lora = {id(p) for layer in lora_layers(unet).values() for p in (layer.lora_down.weight, layer.lora_up.weight)}
    models = [unet, reward_parts["vae"], reward_parts["scorer"].model, reward_parts["text_encoder"]]
    with_grad = [p for model in models for p in model.parameters() if p.grad is not None]
    assert with_grad and all(id(p) in lora for p in with_grad)
    assert all(p.grad is not None for layer in lora_layers(unet).values() for p in (layer.lora_up.weight,))


def test_reward_gradient_flows_through_the_linear_ddim_steps(reward_parts):
    # Only step 0 has gradient; steps 1..3 see a detached-or-no-grad UNet. Its ε still reaches the image
    # through x_{i+1} = a_i·x_i + b_i·ε_i, so the LoRA gets a gradient.
    loss, _ = run_reward(reward_parts, {0})
    loss.backward()
    grads = [layer.lora_up.weight.grad for layer in lora_layers(reward_parts["unet"]).values()]
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("omega", [0.0, 0.3, 1.0])
def test_omega_sets_the_gradient_along_v_at_the_image_embedding(reward_parts, omega):
    """∂score/∂C_X = T' = C_P⊥ + ω·η·V: its component along V is ω·η, zero for ω = 0 (LongAlign §4)."""
    scorer, encoded = reward_parts["scorer"], reward_parts["encoded"]
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    direction = F.normalize(torch.randn(scorer.embed_dim), dim=0)
    embeddings = scorer.encode_images(images, random_crop=15, generator=torch.Generator().manual_seed(0))
    embeddings.retain_grad()
    parts = score_projection(embeddings, encoded.segments, encoded.mask(), direction, omega)
    (0.5 * (1 - parts.score.mean())).backward()
    # The kernel normalizes x: g_x = (I − C_X C_Xᵀ)·∂L/∂C_X / |x|, and ∂L/∂C_X = −T'/(2B), C_X·T' = score,
    # so T' = −2B·|x|·g_x + score·C_X recovers the gradient at the normalized embedding exactly.
    x = embeddings.detach()
    unit = F.normalize(x, dim=-1)
    text_grad = -2 * len(x) * x.norm(dim=-1, keepdim=True) * embeddings.grad + parts.score.detach()[:, None] * unit
    along_v = text_grad @ direction
    torch.testing.assert_close(along_v, omega * parts.eta, atol=1e-5, rtol=1e-4)
    if omega > 0:
        assert along_v.abs().min() > 1e-3  # the check can fail: the V component is really there


# ----------------------------------------------------------------------------------------------------------
# Checkpoints, signals, divergence
# ----------------------------------------------------------------------------------------------------------

def test_learning_rate_warms_up_holds_then_falls_linearly_to_zero():
    factors = [runtime.learning_rate_factor(step, warmup=4, decay_from=10, steps=14) for step in range(14)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert [runtime.learning_rate_factor(step, 4, None, 14) for step in (3, 13)] == [1, 1]  # no decay: constant


def test_sigterm_then_resume_equals_an_uninterrupted_run(world, tmp_path, monkeypatch):
    extra = ["--steps", "4", "--ema", "0.5", "--caption-dropout", "0.5", "--decay-from", "1"]
    straight = train.main(tiny_args(world, tmp_path / "straight", "sft", *extra))
    assert [r["lr"] for r in straight] == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])  # resume continues it

    real_step = runtime.optimizer_step

    def step_then_sigterm(state, *rest):
        logged = real_step(state, *rest)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return logged

    monkeypatch.setattr(runtime, "optimizer_step", step_then_sigterm)
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(world, tmp_path / "resumed", "sft", *extra))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(runtime, "optimizer_step", real_step)
    with pytest.raises(SystemExit) as refused:  # no silent overwrite of a run
        train.main(tiny_args(world, tmp_path / "resumed", "sft", *extra))
    assert refused.value.code == 2
    with pytest.raises(SystemExit) as changed:  # another global batch would read other data: refused too
        train.main(tiny_args(world, tmp_path / "resumed", "sft", *extra, "--resume", "--batch-size", "4"))
    assert changed.value.code == 2
    resumed = train.main(tiny_args(world, tmp_path / "resumed", "sft", *extra, "--resume"))

    assert [r["step"] for r in resumed] == [3, 4]
    np.testing.assert_allclose(losses(straight), losses(json.loads(line) for line in
                               (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()), atol=1e-6)
    a, b = load_file(tmp_path / "straight" / "lora.safetensors"), load_file(tmp_path / "resumed" / "lora.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch, capsys):
    real_add_noise, calls = NoiseSchedule.add_noise, []

    def poisoned(self, *args):  # the third SFT batch meets a NaN latent, as a corrupt image would give
        calls.append(1)
        noisy = real_add_noise(self, *args)
        return noisy * float("nan") if len(calls) == 3 else noisy

    monkeypatch.setattr(NoiseSchedule, "add_noise", poisoned)
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(world, tmp_path, "sft", "--steps", "5", "--save-every", "1"))
    assert stopped.value.code == 1
    assert "the loss is nan at step 3" in capsys.readouterr().err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem, expected", [
    ("empty folder", "no images found"),
    ("manifest without caption", "missing key 'caption'"),
    ("weights path", "weights file not found"),
    ("resolution", "multiple of 8"),
    ("decay after the end", "--decay-from must be a step in [0, --steps=1)"),
    ("nan learning rate", "--lr must be a finite number, positive; got nan"),
    ("infinite guidance", "--cfg must be a finite number, at least 0; got inf"),
])
def test_bad_input_gives_one_line_and_exit_code_2(world, tmp_path, capsys, problem, expected):
    args = tiny_args(world, tmp_path / "out", "sft", "--steps", "1")
    if problem == "empty folder":
        (tmp_path / "empty").mkdir()
        args[args.index("--data") + 1] = str(tmp_path / "empty")
    elif problem == "manifest without caption":
        (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(world / "images" / "0.png")}) + "\n")
        args[args.index("--data") + 1] = str(tmp_path / "m.jsonl")
    elif problem == "weights path":
        args[args.index("--weights") + 1] = str(tmp_path / "no-such-model")
    elif problem == "resolution":
        args[args.index("--resolution") + 1] = "20"
    elif problem == "nan learning rate":
        args += ["--lr", "nan"]
    elif problem == "infinite guidance":
        args += ["--cfg", "inf"]
    else:
        args += ["--decay-from", "1"]
    with pytest.raises(SystemExit) as exited:
        train.main(args)
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2
    assert expected in err and err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# Renamed and moved
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--stage", "clip"], "python -m mini.pretrain --stage clip"),
    (["--stage", "vae"], "python -m mini.pretrain --stage vae"),
    (["--stage", "sft", "--encoding", "concat"], "use --encoding segment"),
])
def test_old_names_give_one_line_naming_the_new_one(world, tmp_path, capsys, flags, expected):
    args = tiny_args(world, tmp_path / "out", "sft", "--steps", "1")
    args = args[2:] + flags  # the test's own --stage comes last, so it wins
    with pytest.raises(SystemExit) as exited:
        train.main(args)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


def test_help_shows_the_stage_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one help entry per line
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "optimizer steps; default: 10000 for sft, 3750 for reward" in out and re.search(r"--lr LR +default: 3e-05", out)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_a_bf16_step_runs_on_the_cpu(world, tmp_path, stage):
    """bf16 autocast on the CPU takes the mixed-precision path of a GPU run: a bf16 base with fp32 LoRA masters,
    the score path with an fp32 V, the VAE decode in bf16."""
    extra = ["--steps", "1", "--precision", "bf16"]
    if stage == "reward":
        train.main(tiny_args(world, tmp_path / "sft", "sft", "--steps", "1"))
        extra += ["--sft-lora", str(tmp_path / "sft" / "lora.safetensors")]
    records = train.main(tiny_args(world, tmp_path / "run", stage, *extra))
    assert all(np.isfinite(losses(records))) and records[0]["grad_norm"] > 0
    lora = load_file(tmp_path / "run" / "lora.safetensors")
    assert all(v.dtype == torch.float32 for v in lora.values())  # the trained masters stay fp32


def test_a_warmup_longer_than_the_run_is_said(world, tmp_path, capsys):
    train.main(tiny_args(world, tmp_path, "sft", "--steps", "1", "--warmup", "2000"))
    assert "--warmup 2000 is longer than --steps 1, so the learning rate ends at 5e-07" in capsys.readouterr().err


def test_reward_takes_the_direction_beside_the_scorer_as_score_py_does(world, tmp_path, capsys):
    scorer_dir = tmp_path / "scorer"
    shutil.copytree(world / "scorer", scorer_dir)
    scorer = Scorer.load(scorer_dir)
    save_direction(scorer_dir / "direction.safetensors", F.normalize(torch.randn(scorer.embed_dim), dim=0), scorer, 8)
    args = tiny_args(world, tmp_path / "run", "reward", "--steps", "1")
    args[args.index("--scorer") + 1] = str(scorer_dir)
    train.main(args)
    assert f"common direction V: {scorer_dir / 'direction.safetensors'}" in capsys.readouterr().out


def test_weights_whose_scheduler_predicts_v_are_refused(world, tmp_path, capsys):
    pipe = tmp_path / "pipe"
    shutil.copytree(world / "pipe", pipe)
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction"}))
    args = tiny_args(world, tmp_path / "out", "sft", "--steps", "1")
    args[args.index("--weights") + 1] = str(pipe)
    with pytest.raises(SystemExit) as exited:
        train.main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "prediction_type" in err and "v_prediction" in err
