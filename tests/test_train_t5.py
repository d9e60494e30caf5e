"""train.py on the released LongSD's CLIP+T5 path (tiny random models, CPU): SFT trains the UNet LoRA and
the TextAdapter on the 480-row context, the reward stage keeps the adapter frozen, sample.py --longsd samples
the result, and a stopped run resumes exactly."""
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import sample
import train
from model.t5 import CONFIGS, AdapterConfig, T5EncoderModel, TextAdapter, load_adapter, save_adapter
from test_t5 import build_t5_tokenizer
from test_train import build_tiny_world, losses, tiny_args

torch.set_num_threads(1)  # as in test_train.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """test_train's tiny pipeline, plus a tiny T5 folder (transformers layout, tokenizer.json) and an
    initial adapter from T5's width to the text encoder's (both 32)."""
    root = build_tiny_world(tmp_path_factory.mktemp("world"))
    cfg = CONFIGS["test"]
    torch.manual_seed(1)
    t5 = T5EncoderModel(cfg)
    (root / "t5").mkdir()
    save_file({k: v.clone() for k, v in t5.state_dict().items()}, root / "t5" / "model.safetensors")
    hf = transformers.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                               num_layers=cfg.num_layers, num_heads=cfg.num_heads)
    (root / "t5" / "config.json").write_text(json.dumps(hf.to_dict()))
    build_t5_tokenizer(root / "t5")
    save_adapter(TextAdapter(AdapterConfig(in_dim=32, int_dim=24, out_dim=32)), root / "adapter-init")
    return root


def t5_args(world, out, stage="sft", *extra):
    args = tiny_args(world, out, stage, "--t5", str(world / "t5"), *extra)
    return args if "--adapter" in extra else args + ["--adapter", str(world / "adapter-init")]


def test_sft_trains_lora_and_adapter_then_reward_keeps_the_adapter(world, tmp_path):
    sft = tmp_path / "sft"
    records = train.main(t5_args(world, sft, "sft", "--steps", "2"))
    assert all(np.isfinite(losses(records)))
    initial, trained = load_adapter(world / "adapter-init"), load_adapter(sft / "adapter")
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in trained.state_dict().items())
    with safe_open(sft / "lora.safetensors", "pt") as f:
        assert f.metadata()["t5"] == "yes"

    reward = tmp_path / "reward"
    records = train.main(t5_args(world, reward, "reward", "--steps", "1", "--adapter", str(sft / "adapter"),
                                 "--sft-lora", str(sft / "lora.safetensors")))
    assert all(np.isfinite(losses(records)))
    kept = load_adapter(reward / "adapter")  # the run folder holds what sample.py --longsd reads
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in kept.state_dict().items())

    out = tmp_path / "sample.png"
    sample.main(["A red cube sits on a table. It is small.", "--weights", str(world / "pipe"), "--longsd",
                 str(reward), "--t5", str(world / "t5"), "--steps", "2", "--height", "16", "--width", "16",
                 "--dtype", "fp32", "--out", str(out)])
    text = Image.open(out).text["parameters"]
    assert "Sampler: UNIPC" in text and f"LongSD: {reward.name}" in text


def test_t5_sft_resumes_exactly(world, tmp_path):
    extra = ["--steps", "3", "--save-every", "1"]
    straight = train.main(t5_args(world, tmp_path / "straight", "sft", *extra))
    train.main(t5_args(world, tmp_path / "resumed", "sft", "--steps", "2", "--save-every", "1"))
    resumed = train.main(t5_args(world, tmp_path / "resumed", "sft", *extra, "--resume"))
    assert [r["step"] for r in resumed] == [3]
    np.testing.assert_allclose(losses(straight)[-1:], losses(resumed), atol=1e-6)
    a, b = load_adapter(tmp_path / "straight" / "adapter"), load_adapter(tmp_path / "resumed" / "adapter")
    assert all((v - b.state_dict()[k]).abs().max() <= 1e-6 for k, v in a.state_dict().items())


@pytest.mark.parametrize("flags, expected", [
    (["--precision", "fp16"], "fp16 needs CUDA"),
    (["--omega", "nan"], "--omega must be in [0, 1]"),
])
def test_bad_t5_settings_give_one_line(world, tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exited:
        train.main(t5_args(world, tmp_path / "out", "sft", "--steps", "1", *flags))
    assert exited.value.code == 2 and expected in capsys.readouterr().err


def test_reward_on_the_t5_path_needs_the_sft_adapter(world, tmp_path, capsys):
    args = tiny_args(world, tmp_path / "out", "reward", "--t5", str(world / "t5"), "--steps", "1")
    with pytest.raises(SystemExit) as exited:
        train.main(args)
    assert exited.value.code == 2 and "needs --adapter" in capsys.readouterr().err
