"""What --compile buys: compiled against eager, in one run, for sampling and for an SFT step on the miniature.

    python bench/compile_speed.py                 # the shipped weights/mini, on the CPU
    python bench/compile_speed.py --repeats 9 --batch 8

Sampling is what ``sample.py --compile`` does after loading: ``model.speed.compile_for_sampling`` on the
UNet, the VAE decoder and the text encoder, then the DPM-Solver++ loop (10 steps, CFG 3, the recorded settings
of weights/mini) and the decode for a batch of prompts. The SFT step is what ``train.py --compile`` does:
``model.speed.compile_for_training`` on a full-UNet copy, then the ε loss, its backward and an AdamW step.
Eager and compiled run in the same process on the same weights, alternating, after their warm-ups; the
compile itself happens in the first, untimed, call and is reported on its own. Each figure is a median.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: find model/

from model.diffusion import DPMSolverSampler, NoiseSchedule, denoising_loss, sample_loop  # noqa: E402
from model.longtext import LongPromptEncoder  # noqa: E402
from model.speed import compile_for_sampling, compile_for_training, prefer_channels_last  # noqa: E402
from model.weights import load_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("There is a large red circle in the top left. A small blue square sits in the center. In the bottom "
          "right, you can see a large green triangle. The top right is empty.")


def sampling_job(pipe, batch: int):
    """One batch of images, as sample.py makes them: encode, guided DPM-Solver++ loop, decode."""
    encoder = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, strategy="segment")

    def job():
        with torch.inference_mode():
            cond, uncond = encoder([PROMPT] * batch), encoder([""])
            noise = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
            latents = sample_loop(pipe.unet, DPMSolverSampler(NoiseSchedule(), 10), noise, cond, uncond, 3.0,
                                  progress=False)
            return pipe.vae.decode(latents / pipe.vae.scaling_factor)
    return job


def sft_job(pipe, batch: int):
    """One full-UNet SFT step on fixed inputs: ε loss, backward, AdamW."""
    unet = prefer_channels_last(copy.deepcopy(pipe.unet).train().requires_grad_(True))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(batch, 4, 16, 16, generator=generator), torch.randn(batch, 4, 16, 16, generator=generator)
    with torch.no_grad():
        context = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, strategy="segment")([PROMPT] * batch)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)

    def job():
        loss = denoising_loss(unet, NoiseSchedule(), latents, context, noise, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return job, unet


def timed(job) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


def race(jobs: dict, repeats: int) -> dict:
    """Alternating rounds, the order reversed every other round: {name: [seconds, ...]}."""
    times, names = {name: [] for name in jobs}, list(jobs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(timed(jobs[name]))
    return times


def report(title: str, times: dict, compile_s: float) -> None:
    eager, compiled = (statistics.median(times[k]) for k in ("eager", "compiled"))
    print(f"{title}: eager {eager * 1000:.1f} ms, compiled {compiled * 1000:.1f} ms, compiled / eager "
          f"{compiled / eager:.3f} (compile, first call: {compile_s:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights" / "mini")
    parser.add_argument("--batch", type=int, default=4, help="images per sampling batch and per SFT step")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; {args.weights.name}, batch {args.batch}, medians of {args.repeats}")

    eager_pipe = load_pipeline(args.weights, dtype=torch.float32)
    for model in (eager_pipe.unet, eager_pipe.vae):
        prefer_channels_last(model.eval())
    compiled_pipe = copy.deepcopy(eager_pipe)
    compile_for_sampling(compiled_pipe, [compiled_pipe.text_encoder], "cpu")
    jobs = {"eager": sampling_job(eager_pipe, args.batch), "compiled": sampling_job(compiled_pipe, args.batch)}
    jobs["eager"]()
    compile_s = timed(jobs["compiled"])
    report("sampling, 10 DPM-Solver++ steps + decode", race(jobs, args.repeats), compile_s)

    eager_step, _ = sft_job(eager_pipe, args.batch)
    compiled_step, unet = sft_job(eager_pipe, args.batch)
    compile_for_training(unet)
    eager_step()
    compile_s = timed(compiled_step)
    report("SFT step, full UNet, fwd + bwd + AdamW", race({"eager": eager_step, "compiled": compiled_step},
                                                          args.repeats), compile_s)


if __name__ == "__main__":
    main()
