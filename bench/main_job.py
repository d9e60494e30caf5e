"""Time the README's first command as a whole process against the same sampling through diffusers.

    python bench/main_job.py               # 5 runs of each, interleaved
    python bench/main_job.py --repeats 9

Ours is `python sample.py "<the README's prompt>"` with no flags (the shipped miniature, the DPM-Solver++
10 steps and CFG 3 that weights/mini/longalign.json records, the CPU's default precision). The reference is
a fresh process that imports diffusers, loads `StableDiffusionPipeline.from_pretrained("weights/mini")`
in fp32 (the files are fp16; without torch_dtype diffusers mixes the two and fails) with
`DPMSolverMultistepScheduler`, and samples the same prompt, seed, steps, CFG and size. The prompt
fits CLIP's 77 tokens, so diffusers sees all of it. Both are timed from process start to exit, imports
included; the runs alternate which goes first, so machine load hits both alike, and each figure is a median.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("There is a large red circle in the top left. A small blue square sits in the center. In the bottom "
          "right, you can see a large green triangle. The top right is empty. There is a small yellow circle in "
          "the middle left. A large purple square sits in the bottom left.")
DIFFUSERS_JOB = """
import sys, torch, diffusers
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None)
pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe(sys.argv[2], num_inference_steps=10, guidance_scale=3.0, height=64, width=64,
     generator=torch.Generator("cpu").manual_seed(0)).images[0].save(sys.argv[3])
"""


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {"ours": [sys.executable, "sample.py", PROMPT, "--out", f"{tmp}/ours.png"],
                "diffusers": [sys.executable, "-c", DIFFUSERS_JOB, str(REPO / "weights" / "mini"), PROMPT,
                              f"{tmp}/diffusers.png"]}
        print(f"main job, whole process: {machine()}; median of {args.repeats}")
        times = {name: [] for name in jobs}
        for repeat in range(args.repeats):
            for name in (["ours", "diffusers"] if repeat % 2 == 0 else ["diffusers", "ours"]):
                times[name].append(timed(jobs[name]))
    print(f"{'job':<10} {'median s':>9} {'min s':>8}")
    for name, values in times.items():
        print(f"{name:<10} {statistics.median(values):>9.2f} {min(values):>8.2f}")
    print(f"ratio ours / diffusers: {statistics.median(times['ours']) / statistics.median(times['diffusers']):.3f}")


if __name__ == "__main__":
    main()
