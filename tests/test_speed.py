"""The fast path of model/speed.py through the scripts: ``sample.py --compile`` gives the eager image within 1/255
per pixel and ``train.py --compile`` the eager SFT losses within 1e-4, on the tiny pipelines that test_sample.py
and test_train.py build; the channels-last default is checked against diffusers by test_sample.py itself.

Compiling takes tens of seconds on a CPU, so each script compiles once, at the smallest sizes.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from model.clip import CONFIGS as CLIP_CONFIGS, CLIPTextModel
from model.longtext import LongPromptEncoder
from model.meta import empty_model
from model.speed import text_encoder_modules
from model.t5 import ADAPTER_CONFIGS, CONFIGS as T5_CONFIGS, CLIPT5Encoder, T5EncoderModel, TextAdapter
from model.tokenizer import CLIPTokenizer
from test_sample import pixels, reference, run_sample, tiny_sd  # noqa: F401 (reference: tiny_sd's fixture)
from test_train import losses, tiny_args, world  # noqa: F401 (world: a fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()  # each test compiles from scratch: no graph cached by another test
    yield
    torch._dynamo.reset()


def watch_calls(monkeypatch, script, function_name: str) -> list:
    """Record the first argument of every call of ``script.<function_name>``: what the script compiled."""
    seen, original = [], getattr(script, function_name)

    def watch(first, *rest, **kwargs):
        seen.append(first)
        return original(first, *rest, **kwargs)

    monkeypatch.setattr(script, function_name, watch)
    return seen


def test_compiled_sampling_gives_the_eager_image(tiny_sd, tmp_path, monkeypatch):
    run_sample("a red cube on a blue sphere", tiny_sd, tmp_path / "eager.png", "--steps", "2")
    compiled = watch_calls(monkeypatch, sample, "compile_for_sampling")
    run_sample("a red cube on a blue sphere", tiny_sd, tmp_path / "compiled.png", "--steps", "2", "--compile")
    assert len(compiled) == 1
    pipe = compiled[0]
    assert all(m._compiled_call_impl is not None for m in (pipe.unet, pipe.vae.decoder, pipe.text_encoder))
    eager, fast = pixels(tmp_path / "eager.png"), pixels(tmp_path / "compiled.png")
    assert eager.std() > 5  # a real picture, not a flat field that would match anything
    assert np.abs(fast - eager).max() <= 1


def test_compiled_sft_gives_the_eager_losses(world, tmp_path, monkeypatch):
    # no LoRA dropout: compiled dropout draws other random numbers than eager's
    options = ("--steps", "2", "--lora-dropout", "0")
    eager = losses(train.main(tiny_args(world, tmp_path / "eager", "sft", *options)))
    compiled = watch_calls(monkeypatch, train, "compile_for_training")
    fast = losses(train.main(tiny_args(world, tmp_path / "compiled", "sft", *options, "--compile")))
    assert len(compiled) == 1 and compiled[0]._compiled_call_impl is not None
    assert np.allclose(fast, eager, rtol=0, atol=1e-4), (fast, eager)  # step 2 follows compiled gradients


def test_text_encoder_modules_name_every_network_of_the_context():
    text = CLIPTextModel(CLIP_CONFIGS["test"].text)
    t5, adapter = T5EncoderModel(T5_CONFIGS["test"]), TextAdapter(ADAPTER_CONFIGS["test"])
    clip = LongPromptEncoder(CLIPTokenizer(), text)
    assert text_encoder_modules(clip) == [text]
    assert text_encoder_modules(CLIPT5Encoder(clip, None, t5, adapter)) == [text, t5, adapter]


def test_a_fast_start_loads_the_miniature_without_the_compiler_stack_or_triton():
    """The README's first command: loading builds every model on the meta device (model/meta.py), where
    nn.Embedding's own init would import torch._dynamo; neither it nor triton may be loaded on the way."""
    code = ("import sys; from model.weights import load_pipeline; from model.t5 import TextAdapter; "
            "from model.meta import empty_model; load_pipeline('weights/mini'); "
            "empty_model(lambda: TextAdapter(), 'cpu'); "
            "print('torch._dynamo' in sys.modules, 'triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "LONGALIGN_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_an_empty_model_has_every_tensor_and_leaves_embedding_init_alone():
    model = empty_model(lambda: CLIPTextModel(CLIP_CONFIGS["test"].text), "cpu")
    assert all(not p.is_meta for p in model.state_dict().values())
    torch.manual_seed(0)
    fresh = torch.nn.Embedding(4, 3).weight
    assert fresh.abs().sum() > 0  # nn.Embedding initialises again outside empty_model


REUSE_PROBE = """
import resource, sys, torch
from model.speed import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for forward in range(3):  # eight 16 MB blocks held at once, like a forward's activations, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(4 << 20) for _ in range(8)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, faults[1] + faults[2])
"""


def test_kept_freed_memory_spares_the_next_forwards_their_page_faults():
    """128 MB of blocks made, written and freed three times. With glibc's defaults the later rounds map most of
    it afresh (here about 65,000 faults of 4 KiB over rounds 2 and 3), because glibc trims the freed heap top
    past 32 MB; after keep_freed_memory (what sample.py does on the CPU) they reuse the first round's pages
    (here 0 to 8,200: now and then one block is fresh)."""
    later = {}
    for mode in ("plain", "keep"):
        done = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        later[mode] = done.stdout.split()
    assert later["keep"][0] == "True"
    assert int(later["plain"][1]) > 30_000 and int(later["keep"][1]) < int(later["plain"][1]) / 4
