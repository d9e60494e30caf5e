"""Benchmark reading an original single-file .ckpt (a torch zip pickle) the way load_pipeline does.

    python bench/load_ckpt.py                 # a 1 GB synthetic checkpoint in a temporary folder
    python bench/load_ckpt.py --gigabytes 2

load_pipeline reads the file four times: once to see that it is a whole SD-1.5 checkpoint, then once for each
of the text encoder, the UNet and the VAE, each of which keeps only the tensors under its own prefix. A pickle
cannot be read in parts, so `model.weights.read_state_dict` memory-maps zip pickles instead: every read then
parses the small pickle index and pages in only the tensors a loader touches. The reference is the same four
reads with a plain `torch.load` (no mmap), which copies all tensors every time. The file is written first, so
both rows read it from the page cache: this measures the copying, not the disk.

The synthetic checkpoint has SD-1.5's proportions (UNet 80%, text encoder 12%, VAE 8% of the bytes, fp16) and
its three key prefixes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.convert import SINGLE_FILE_PREFIXES  # noqa: E402
from model.weights import read_state_dict  # noqa: E402

SHARES = {"unet": 0.80, "text_encoder": 0.12, "vae": 0.08}
TENSOR_ELEMENTS = 2**20  # 2 MB per fp16 tensor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="checkpoint size (default 1.0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions, best kept (default 3)")
    return parser.parse_args()


def write_checkpoint(path: Path, gigabytes: float) -> None:
    """A zip pickle {"state_dict": ...} with SD-1.5's three prefixes, as v1-5-pruned-emaonly.ckpt has."""
    state = {}
    for model, share in SHARES.items():
        count = max(1, round(gigabytes * 2**30 * share / (2 * TENSOR_ELEMENTS)))
        for index in range(count):
            state[f"{SINGLE_FILE_PREFIXES[model]}block{index}.weight"] = torch.randn(TENSOR_ELEMENTS).half()
    torch.save({"state_dict": state, "global_step": 1}, path)


def plain_read(path: Path) -> dict[str, torch.Tensor]:
    """The reference: an unmapped torch.load, which copies every tensor of the file."""
    return torch.load(str(path), map_location="cpu", weights_only=True)["state_dict"]


def load_like_pipeline(path: Path, read) -> float:
    """Seconds for the four reads of load_pipeline, each model copying out the tensors under its prefix."""
    start = time.perf_counter()
    list(read(path))  # detect_single_file: the keys
    for model in SHARES:
        prefix = SINGLE_FILE_PREFIXES[model]
        kept = [tensor.float() for key, tensor in read(path).items() if key.startswith(prefix)]
        assert kept, f"no {model} tensors"
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "synthetic-sd.ckpt"
        write_checkpoint(path, args.gigabytes)
        size = path.stat().st_size / 2**30
        rows = {"plain torch.load (reference)": plain_read, "read_state_dict (memory-mapped)": read_state_dict}
        seconds = {name: min(load_like_pipeline(path, read) for _ in range(args.repeats))
                   for name, read in rows.items()}
    reference = seconds["plain torch.load (reference)"]
    print(f"load_pipeline's four reads of a {size:.2f} GB zip .ckpt (best of {args.repeats}, "
          f"{torch.get_num_threads()} threads)\n")
    print("| reader | seconds | speed-up vs reference |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {reference / value:.2f}× |")


if __name__ == "__main__":
    main()
