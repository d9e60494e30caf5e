"""Multi-process training: `torchrun --nproc_per_node=2 train.py` (gloo on CPU) takes the same optimizer steps
as one process with the same global batch, because each rank reads its DistributedSampler share, draws its
rows of the global batch's noise, and the gradients are averaged over the ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import torch

import train
from test_train import build_tiny_world, losses, tiny_args

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # as in test_train.py; the two ranks get OMP_NUM_THREADS=1


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_processes_match_one_process_with_the_global_batch(tmp_path, stage):
    world = build_tiny_world(tmp_path)
    # Two half-batch means summed in another order differ from one batch mean by float32 rounding (~1e-9).
    # AdamW's update g / (|g| + eps) multiplies such differences by up to lr / eps where |g| ≲ eps (the LoRA
    # down weights get tiny gradients while up is near zero): 1e5 at eps 1e-8, 10 at eps 1e-4.
    # LoRA dropout draws its masks per process, so it is off here: the test is about the data, noise and
    # gradient paths, which must give one process's update exactly.
    steps = ["--steps", "2", "--save-every", "2", "--adam-eps", "1e-4", "--lora-dropout", "0"]
    one = train.main(tiny_args(world, tmp_path / "one", stage, *steps, "--batch-size", "4"))

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *tiny_args(world, tmp_path / "two", stage, *steps, "--batch-size", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses(two), losses(one), atol=1e-6)
    a, b = load_file(tmp_path / "one" / "lora.safetensors"), load_file(tmp_path / "two" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(v.abs().sum() > 0 for k, v in b.items() if k.endswith("lora_up.weight"))  # it did train
