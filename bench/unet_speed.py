"""Time our SD-1.5 UNet against diffusers' UNet2DConditionModel: same full config, same random weights.

    python bench/unet_speed.py                              # CPU fp32, batch 2 (as with CFG), 64×64 latents
    python bench/unet_speed.py --device cuda --dtype fp16   # on a GPU

Both models are timed in the same run, interleaved and alternating which goes first, so that machine load
hits both alike; each figure is the median over ``--repeats`` forwards after ``--warmup`` untimed ones.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: find model/

import diffusers  # noqa: E402  (the reference; only this benchmark and the tests import it)

from model.convert import unet_config_to_diffusers  # noqa: E402
from model.unet import CONFIGS, UNet2DConditionModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", choices=DTYPES, default="fp32")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px images)")
parser.add_argument("--context", type=int, default=77, help="context tokens (77 plain SD, 240 LongAlign)")
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
device, dtype = torch.device(args.device), DTYPES[args.dtype]
diffusers.utils.logging.set_verbosity_error()  # its warning about .to(dtype) does not apply to a plain UNet

# diffusers' model with random weights; ours shares the very same tensors (assign=True: no second copy).
torch.manual_seed(0)
sd15 = unet_config_to_diffusers(CONFIGS["sd15"])
theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in sd15.items() if not k.startswith("_")})
theirs = theirs.to(device=device, dtype=dtype).eval()
with torch.device("meta"):
    ours = UNet2DConditionModel()
ours.load_state_dict(theirs.state_dict(), assign=True)
ours.eval()

generator = torch.Generator().manual_seed(0)
latents = torch.randn(args.batch, 4, args.size, args.size, generator=generator).to(device, dtype)
context = torch.randn(args.batch, args.context, 768, generator=generator).to(device, dtype)
timesteps = torch.full((args.batch,), 500, device=device)
runs = {"ours": lambda: ours(latents, timesteps, context),
        "diffusers": lambda: theirs(latents, timesteps, context).sample}


def timed(run) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


with torch.inference_mode():
    difference = (runs["ours"]() - runs["diffusers"]()).abs().max().item()
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name in (["ours", "diffusers"] if repeat % 2 == 0 else ["diffusers", "ours"]):
            times[name].append(timed(runs[name]))

name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
print(f"SD-1.5 UNet forward: {name}, {args.dtype}, batch {args.batch}, latents {args.size}×{args.size}, "
      f"context {args.context}; median of {args.repeats} after {args.warmup} warm-up")
print(f"{'model':<10} {'median s':>9} {'min s':>8}")
for name, values in times.items():
    print(f"{name:<10} {statistics.median(values):>9.3f} {min(values):>8.3f}")
ratio = statistics.median(times["ours"]) / statistics.median(times["diffusers"])
print(f"ratio ours / diffusers: {ratio:.3f}  (max |difference| of outputs: {difference:.2e})")
