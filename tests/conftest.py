"""Shared test setup: by default everything runs on the CPU, and Triton kernels run in the interpreter.

``LONGALIGN_TEST_DEVICE=cuda`` runs the kernel tests (test_concat_kernel.py, test_score_kernel.py) on the GPU
instead, with the kernels compiled: the interpreter is then left off and the GPU stays visible. This is how
bench/gpu_check.sh runs them on a GPU machine.
"""
import os

import pytest

TEST_DEVICE_ENV = "LONGALIGN_TEST_DEVICE"
TEST_DEVICE = os.environ.get(TEST_DEVICE_ENV, "cpu")

if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: one thread avoids thread start-up costing more than the maths (also in the
# subprocesses the tests start, which inherit this environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)


def pytest_configure(config):
    if TEST_DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"{TEST_DEVICE_ENV}={TEST_DEVICE!r} is not a test device; use cpu or cuda")
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{TEST_DEVICE_ENV}=cuda but torch sees no CUDA GPU; unset it to test on the CPU "
                                "under the Triton interpreter")


def pytest_sessionfinish(session, exitstatus):
    # "no tests collected" (exit 5) is not a failure for a folder that is still empty.
    if exitstatus == 5:
        session.exitstatus = 0
