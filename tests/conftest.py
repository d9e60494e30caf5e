"""Shared test setup: everything runs on the CPU, and Triton kernels run in the interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: one thread avoids thread start-up costing more than the maths (also in the
# subprocesses the tests start, which inherit this environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    # "no tests collected" (exit 5) is not a failure for a folder that is still empty.
    if exitstatus == 5:
        session.exitstatus = 0
