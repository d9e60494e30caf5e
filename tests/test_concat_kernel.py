"""The segment-concatenation Triton kernel against its PyTorch twin.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py); with
LONGALIGN_TEST_DEVICE=cuda the same tests run on the GPU with the kernel compiled.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import kernels
from model.kernels import concat_segments, concat_segments_torch, concat_segments_triton

BLOCK = 77
DEVICE = torch.device(os.environ.get("LONGALIGN_TEST_DEVICE", "cpu"))  # see conftest.py
REPO = Path(__file__).resolve().parents[1]


def random_layout(runs_per_prompt, dim, dtype=torch.float32, seed=0):
    """hidden [S, 77, dim] and the kept runs: ``runs_per_prompt`` lists (start, length) per segment, per prompt.

    Drawn on the CPU, so every device sees the same values, then moved to the test device.
    """
    generator = torch.Generator().manual_seed(seed)
    runs = [run for prompt in runs_per_prompt for run in prompt]
    hidden = torch.randn(len(runs), BLOCK, dim, generator=generator).to(dtype)
    kept_start = torch.tensor([start for start, _ in runs], dtype=torch.long)
    kept_len = torch.tensor([length for _, length in runs], dtype=torch.long)
    counts = torch.tensor([len(prompt) for prompt in runs_per_prompt], dtype=torch.long)
    pad = torch.randn(dim, generator=generator)
    return tuple(tensor.to(DEVICE) for tensor in (hidden, kept_start, kept_len, counts, pad))


LAYOUTS = {
    "several prompts, different segment counts": ([[(0, 12), (0, 30), (0, 5)], [(0, 76)], [(0, 8)] * 6], 240),
    "one segment": ([[(0, 20)]], 240),
    "overflow beyond max_tokens": ([[(0, 76)] * 5, [(0, 3)]], 240),
    "max_tokens inside the first segment": ([[(0, 50), (0, 50)]], 7),
    "empty prompt (sot only)": ([[(0, 1)], [(0, 40), (0, 2)]], 240),
    "no-sot and keep-all runs": ([[(1, 10), (1, 0), (1, 33)], [(0, 77), (0, 77), (0, 77), (0, 77)]], 240),
    "prompt with no segments": ([[], [(0, 9)]], 30),
}


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_twin(name, dtype):
    runs_per_prompt, max_tokens = LAYOUTS[name]
    hidden, kept_start, kept_len, counts, pad = random_layout(runs_per_prompt, dim=40, dtype=dtype)
    expected = concat_segments_torch(hidden, kept_start, kept_len, counts, pad, max_tokens)
    got = concat_segments_triton(hidden, kept_start, kept_len, counts, pad, max_tokens)
    assert got.shape == (len(runs_per_prompt), max_tokens, 40) and got.dtype == dtype
    assert torch.equal(got, expected)  # a pure copy: bit-exact in every dtype


def test_wide_features_span_several_column_tiles():
    hidden, kept_start, kept_len, counts, pad = random_layout([[(0, 30), (0, 20)], [(0, 3)]], dim=600)
    expected = concat_segments_torch(hidden, kept_start, kept_len, counts, pad, 64)
    assert torch.equal(concat_segments_triton(hidden, kept_start, kept_len, counts, pad, 64), expected)


def test_twin_follows_the_rule_by_hand():
    """The twin against the rule spelled out with Python lists: runs in order, cut, then pad rows."""
    hidden, kept_start, kept_len, counts, pad = random_layout([[(0, 3), (1, 2)], [(0, 4)]], dim=5)
    out = concat_segments_torch(hidden, kept_start, kept_len, counts, pad, 6)
    rows_0 = [hidden[0, 0], hidden[0, 1], hidden[0, 2], hidden[1, 1], hidden[1, 2], pad]
    rows_1 = [hidden[2, 0], hidden[2, 1], hidden[2, 2], hidden[2, 3], pad, pad]
    assert torch.equal(out, torch.stack([torch.stack(rows_0), torch.stack(rows_1)]))


def test_dispatcher_modes(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.use_triton(cpu) is False  # auto: the twin for CPU tensors
    if DEVICE.type == "cuda":
        assert kernels.use_triton(torch.zeros(1, device=DEVICE)) is True  # auto: the kernel for CUDA tensors
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    assert kernels.use_triton(cpu) is True
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert kernels.use_triton(cpu) is False
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda-please")
    with pytest.raises(ValueError, match="LONGALIGN_KERNELS"):
        kernels.use_triton(cpu)


def test_dispatcher_runs_the_kernel_when_forced(monkeypatch):
    calls = []
    real_kernel = kernels.concat_segments_triton
    monkeypatch.setattr(kernels, "concat_segments_triton", lambda *args: calls.append(1) or real_kernel(*args))
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    hidden, kept_start, kept_len, counts, pad = random_layout([[(0, 4)]], dim=8)
    out = concat_segments(hidden, kept_start, kept_len, counts, pad, 10)
    assert calls == [1]
    assert torch.equal(out, concat_segments_torch(hidden, kept_start, kept_len, counts, pad, 10))


def test_gradients_use_the_twin(monkeypatch):
    """The kernel has no backward, so a graph-carrying input takes the twin even when Triton is forced."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    hidden, kept_start, kept_len, counts, pad = random_layout([[(0, 3), (0, 2)]], dim=4)
    hidden.requires_grad_(True)
    concat_segments(hidden, kept_start, kept_len, counts, pad, 4).sum().backward()
    expected = torch.zeros_like(hidden)
    expected[0, :3] = 1
    expected[1, :1] = 1  # only 4 rows fit: 3 from segment 0, 1 from segment 1
    assert torch.equal(hidden.grad, expected)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(hidden=a["hidden"][0]), "hidden must be"),
    (lambda a: a.update(kept_len=a["kept_len"][:1]), "kept_start and kept_len"),
    (lambda a: a.update(segments_per_prompt=torch.tensor([1], device=DEVICE)), "summing to the 2 segments"),
    (lambda a: a.update(kept_len=torch.tensor([3, 70], device=DEVICE)), "inside its 77-token block"),
    (lambda a: a.update(pad=torch.zeros(3, device=DEVICE)), "pad must have shape"),
    (lambda a: a.update(max_tokens=0), "max_tokens must be at least 1"),
])
@pytest.mark.parametrize("fn", [concat_segments_torch, concat_segments_triton])
def test_bad_layouts_get_clear_errors(fn, change, message):
    hidden, kept_start, kept_len, counts, pad = random_layout([[(0, 3), (10, 2)]], dim=4)
    args = dict(hidden=hidden, kept_start=kept_start, kept_len=kept_len, segments_per_prompt=counts, pad=pad,
                max_tokens=8)
    change(args)
    with pytest.raises(ValueError, match=message):
        fn(**args)


def test_strided_int32_kept_runs_are_read_as_values():
    """Columns of an int32 [S, 2] table are strided views; the kernel must see their values, not their memory."""
    kept = torch.tensor([[0, 5], [2, 7], [1, 3]], dtype=torch.int32, device=DEVICE)
    hidden, _, _, counts, pad = random_layout([[(0, 5), (2, 7)], [(1, 3)]], dim=12)
    expected = concat_segments_torch(hidden, kept[:, 0], kept[:, 1], counts, pad, 16)
    assert torch.equal(concat_segments_triton(hidden, kept[:, 0], kept[:, 1], counts, pad, 16), expected)


def test_strided_int32_segment_counts_are_read_as_values():
    hidden, kept_start, kept_len, _, pad = random_layout([[(0, 5), (2, 7)], [(1, 3)]], dim=12)
    counts = torch.tensor([[2, 40], [1, 50]], dtype=torch.int32, device=DEVICE)[:, 0]  # every other int32
    expected = concat_segments_torch(hidden, kept_start, kept_len, counts, pad, 16)
    assert torch.equal(concat_segments_triton(hidden, kept_start, kept_len, counts, pad, 16), expected)


def test_float64_takes_the_twin_in_auto_mode_and_is_refused_by_the_kernel(monkeypatch):
    hidden, kept_start, kept_len, counts, pad = random_layout([[(0, 4)]], dim=8, dtype=torch.float64)
    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)  # as on a GPU in auto mode
    expected = concat_segments_torch(hidden, kept_start, kept_len, counts, pad, 10)
    assert torch.equal(concat_segments(hidden, kept_start, kept_len, counts, pad, 10), expected)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16.*LONGALIGN_KERNELS=torch"):
        concat_segments_triton(hidden, kept_start, kept_len, counts, pad, 10)


def test_triton_mode_without_a_gpu_or_the_interpreter_names_the_fix():
    """Without TRITON_INTERPRET the kernels are compiled for a GPU; on a CPU-only machine say how to run anyway."""
    program = (
        "import torch\n"
        "from model.kernels import concat_segments, score_projection\n"
        "calls = [lambda: concat_segments(torch.zeros(1, 77, 4), torch.tensor([0]), torch.tensor([3]),\n"
        "                                 torch.tensor([1]), torch.zeros(4), 8),\n"
        "         lambda: score_projection(torch.ones(1, 4), torch.ones(1, 1, 4), torch.ones(1, 1), torch.ones(4))]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as error:\n"
        "        print(error)\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(LONGALIGN_KERNELS="triton", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert "TRITON_INTERPRET=1" in line and "LONGALIGN_KERNELS=torch" in line


def test_importing_the_model_does_not_import_triton():
    """Triton is imported only when a kernel is launched: importing it costs a noticeable part of a script's start."""
    program = "import sys, model.longtext, model.preference; print('triton' in sys.modules)"
    env = {key: value for key, value in os.environ.items() if key != kernels.KERNELS_ENV}
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
