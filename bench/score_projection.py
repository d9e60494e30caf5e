"""Benchmark the LongAlign §4 score projection: forward + backward to the raw image embeddings.

    python bench/score_projection.py                  # CPU: eager twin vs torch.compile'd twin
    python bench/score_projection.py --device cuda    # GPU: eager twin vs compiled twin vs the Triton kernel

The reward stage calls this once per step with B images, S segments per prompt and the scorer's embed dim P
(defaults: B=48, S=16, P=1024, the paper's batch and ViT-H-14). The Triton kernel needs a GPU; on the CPU
the fused candidate is the twin compiled by torch.compile (inductor fuses it into C++ loops). The kernel
reads every input once, so on a GPU it is memory-bound: the table reports achieved bandwidth against the
minimum bytes the pass must move, next to a plain copy of as many bytes on the same device.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.kernels import HAVE_TRITON, score_projection_torch, score_projection_triton  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=48, help="B, images per step (default 48)")
    parser.add_argument("--segments", type=int, default=16, help="S, segments per prompt (default 16)")
    parser.add_argument("--dim", type=int, default=1024, help="P, the scorer's embed dim (default 1024)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--omega", type=float, default=0.3, help="the reweighting factor (default 0.3)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repetitions (default 50)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    return parser.parse_args()


def make_inputs(args) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    image = torch.randn(args.batch, args.dim, generator=gen)
    text = torch.randn(args.batch, args.segments, args.dim, generator=gen)
    mask = torch.arange(args.segments)[None] < torch.randint(1, args.segments + 1, (args.batch, 1), generator=gen)
    direction = torch.randn(args.dim, generator=gen)
    return tuple(t.to(args.device, dtype if t.is_floating_point() else t.dtype) for t in (image, text, mask, direction))


def forward_backward(fn, image, text, mask, direction, omega) -> torch.Tensor:
    x = image.detach().requires_grad_(True)
    fn(x, text, mask, direction, omega).score.sum().backward()
    return x.grad


def time_it(step, device: str, repeats: int) -> float:
    """Median milliseconds of ``step()`` after warm-up."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def minimum_bytes(image, text, mask) -> int:
    """What forward + backward must move at least: read x, T, mask; write ∂score/∂x; backward reads it and
    writes the gradient (the 5 scores and V are negligible)."""
    batch, width = image.shape
    valid = int(mask.sum())  # masked-out segments need not be read
    element = image.element_size()
    return element * (batch * width + valid * width) + 4 * batch * width * 2 + element * batch * width


def main() -> None:
    args = parse_args()
    inputs = make_inputs(args)
    candidates = {"eager twin": score_projection_torch}
    if not args.no_compile:
        candidates["compiled twin"] = torch.compile(score_projection_torch)
    if args.device.startswith("cuda") and HAVE_TRITON:
        candidates["triton kernel"] = score_projection_triton
    elif os.environ.get("TRITON_INTERPRET") != "1":
        print("(the Triton kernel runs on CUDA only; on the CPU its interpreter checks correctness, not speed)")

    reference = forward_backward(score_projection_torch, *inputs, args.omega)
    results = {}
    for name, fn in candidates.items():
        grad = forward_backward(fn, *inputs, args.omega)
        error = (grad.float() - reference.float()).abs().max().item()
        results[name] = (time_it(lambda: forward_backward(fn, *inputs, args.omega), args.device, args.repeats), error)
    report(args, results, minimum_bytes(*inputs[:3]))


def report(args, results: dict[str, tuple[float, float]], moved: int) -> None:
    """The table, a plain copy of the same bytes on the same device as the bandwidth yardstick, and a summary."""
    copy_source = torch.empty(moved // 2, dtype=torch.uint8, device=args.device)  # read half, write half
    copy_target = torch.empty_like(copy_source)
    copy_ms = time_it(lambda: copy_target.copy_(copy_source), args.device, args.repeats)
    on_gpu = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"score projection fwd+bwd, B={args.batch} S={args.segments} P={args.dim} {args.dtype} on {device_name}")
    baseline = results["eager twin"][0]
    print(f"{'path':<15} {'ms':>9} {'vs eager':>9} {'GB/s':>8} {'max |Δgrad|':>12}")
    for name, (ms, error) in results.items():
        print(f"{name:<15} {ms:9.3f} {baseline / ms:8.2f}x {moved / ms / 1e6:8.2f} {error:12.2e}")
    print(f"{'plain copy':<15} {copy_ms:9.3f} {'':>9} {moved / copy_ms / 1e6:8.2f}")
    best = list(results)[-1]  # the kernel where it ran, else the compiled twin, else the eager one
    speed, copy_speed = moved / results[best][0] / 1e6, moved / copy_ms / 1e6
    print(f"summary: score {best} {speed:.2f} GB/s = {100 * speed / copy_speed:.0f}% of a plain copy "
          f"({copy_speed:.2f} GB/s), fwd+bwd B={args.batch} S={args.segments} P={args.dim} {args.dtype}")


if __name__ == "__main__":
    main()
