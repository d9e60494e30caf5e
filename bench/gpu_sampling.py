"""Sampling speed: our UNet and guided DDIM loop against diffusers' on the same random SD-1.5 UNet weights.

    python bench/gpu_sampling.py                        # CUDA, 512², batch 1 with CFG (UNet batch 2), fp16
    python bench/gpu_sampling.py --device cpu --small   # the test-size UNet and a few steps, fp32

diffusers' UNet2DConditionModel is built from the SD-1.5 config with a random init and saved as a diffusers
folder; ours is loaded from that folder by model/weights.py, as a user's checkpoint would be. Each timed run
is ``--steps`` guided steps (one UNet call on [uncond, cond] plus one DDIM update), after ``--warmup`` untimed
ones, with the device synchronized around it. The two loops alternate which goes first, ``--rounds`` times;
it/s is steps / the median run. Ours is model/diffusion.py's ``sample_loop``; theirs is the loop diffusers'
StableDiffusionPipeline runs: its UNet on the doubled batch, the guidance sum, ``DDIMScheduler.step``.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: find model/

import diffusers  # noqa: E402  (the reference; only benchmarks and tests import it)

from model.convert import unet_config_to_diffusers  # noqa: E402
from model.diffusion import DDIMSampler, NoiseSchedule, sample_loop  # noqa: E402
from model.unet import CONFIGS  # noqa: E402
from model.weights import load_unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CFG_SCALE = 7.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="the test-size UNet, 3 steps: a quick end-to-end run")
    parser.add_argument("--dtype", choices=DTYPES, help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--steps", type=int, help="guided steps per timed run (default: 50, or 3 with --small)")
    parser.add_argument("--warmup", type=int, help="untimed guided steps first (default: 5, or 1 with --small)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each loop (default: %(default)s)")
    parser.add_argument("--context", type=int, default=77, help="context rows (77 plain SD, 240 LongAlign)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and torch sees none; use --device cpu --small on a CPU")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.steps = args.steps or (3 if args.small else 50)
    args.warmup = (1 if args.small else 5) if args.warmup is None else args.warmup
    return args


def build_unets(args, folder: Path):
    """diffusers' UNet with a random init, saved to ``folder``, and ours loaded from that folder."""
    config = unet_config_to_diffusers(CONFIGS["test" if args.small else "sd15"])
    torch.manual_seed(0)
    with torch.device(args.device):  # initialising 860M parameters is much faster on a GPU
        theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    theirs = theirs.to(dtype=DTYPES[args.dtype]).eval()
    theirs.save_pretrained(folder)
    ours = load_unet(folder, dtype=DTYPES[args.dtype], device=args.device)
    return ours, theirs


def diffusers_loop(unet, scheduler, latents, cond, uncond, scale: float) -> torch.Tensor:
    """The guided loop as diffusers' StableDiffusionPipeline runs it (its defaults: no rescale, eta 0)."""
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, latents).prev_sample
    return latents


def sd15_ddim(steps: int):
    """diffusers' DDIMScheduler set up as SD-1.5's scheduler_config.json sets it up."""
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


def timed(run, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args, ours, theirs) -> tuple[dict[str, list[float]], float]:
    """Seconds of each timed run per loop, and the largest difference of one UNet forward between the two."""
    dtype, cfg = DTYPES[args.dtype], ours.config
    generator = torch.Generator().manual_seed(0)
    side = cfg.sample_size if args.small else 64  # 64×64 latents: 512² images
    latents = torch.randn(1, cfg.in_channels, side, side, generator=generator).to(args.device, dtype)
    cond, uncond = (torch.randn(1, args.context, cfg.cross_attention_dim, generator=generator).to(args.device, dtype)
                    for _ in range(2))
    runs = {
        "ours": lambda steps: sample_loop(ours, DDIMSampler(NoiseSchedule(), steps), latents, cond, uncond,
                                          CFG_SCALE, progress=False),
        "diffusers": lambda steps: diffusers_loop(theirs, sd15_ddim(steps), latents, cond, uncond, CFG_SCALE),
    }
    with torch.inference_mode():
        difference = (ours(latents, 500, cond) - theirs(latents, 500, encoder_hidden_states=cond).sample)
        difference = difference.abs().max().item()
        for run in runs.values():
            run(args.warmup)
        seconds = {name: [] for name in runs}
        for round_ in range(args.rounds):
            for name in (["ours", "diffusers"] if round_ % 2 == 0 else ["diffusers", "ours"]):
                seconds[name].append(timed(lambda: runs[name](args.steps), args.device))
    return seconds, difference


def main(argv=None) -> None:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = build_unets(args, Path(folder))
    seconds, difference = measure(args, ours, theirs)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    size = "test-size UNet" if args.small else "SD-1.5 UNet, 512²"
    print(f"sampling: {size}, batch 1 with CFG {CFG_SCALE} (UNet batch 2), {args.dtype}, context {args.context}, "
          f"{machine}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"{args.steps} guided DDIM steps per run, median of {args.rounds} after {args.warmup} warm-up steps")
    print(f"{'loop':<10} {'median s':>9} {'it/s':>8}")
    speed = {}
    for name, values in seconds.items():
        speed[name] = args.steps / statistics.median(values)
        print(f"{name:<10} {statistics.median(values):>9.3f} {speed[name]:>8.2f}")
    print(f"max |difference| of one UNet forward: {difference:.2e}")
    print(f"summary: sampling {args.dtype}: ours {speed['ours']:.2f} it/s, diffusers {speed['diffusers']:.2f} it/s, "
          f"ours/diffusers {speed['ours'] / speed['diffusers']:.3f}x")


if __name__ == "__main__":
    main()
