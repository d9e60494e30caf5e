"""Time our SD-1.5 UNet (or VAE decoder) against diffusers' (UNet2DConditionModel, AutoencoderKL): same full
config, same random weights.

    python bench/unet_speed.py                              # CPU: diffusers fp32 vs ours fp32 and bf16
    python bench/unet_speed.py --device cuda --dtype fp16   # on a GPU: diffusers fp32 vs ours fp32 and fp16
    python bench/unet_speed.py --vae-decode                 # the VAE decoder instead: 64×64 latents to 512²

diffusers runs as a user runs it: eager, contiguous, fp32. Ours runs as sample.py runs it: channels-last
(``model.speed.prefer_channels_last``), conv weights laid out once for oneDNN (model/packed_conv.py), each
upsampling conv folded into one 2×2 conv on the small map (model/upsample.py), freed memory kept for reuse on
the CPU (``model.speed.keep_freed_memory``), in fp32 and in the half dtype (bf16 on a CPU: only worth it where
the CPU has native bf16 instructions, e.g. AVX512-BF16 or AMX). Each contender lives in its own worker process
(its own allocator and thread pool, as one sampling process would have), and they run one forward each in
turn, alternating the order, so that load from other programs on the machine hits all of them alike. Each
figure is the median over ``--repeats`` forwards after one untimed forward; the table gives wall time and
the process's CPU time (user + system), which other programs disturb less than the wall clock. Every worker
runs with ``OMP_WAIT_POLICY=PASSIVE``, so that a thread waiting for another sleeps instead of spinning and the
CPU time counts work only.

``--compile`` times ours under ``torch.compile(fullgraph=True)`` instead, with inductor's freezing on the CPU
(the weights become constants that oneDNN lays out once, not at every call; the frozen copy doubles ours'
memory); the compile itself, a minute or two on a CPU, happens in the untimed forward.

``--plain-memory`` leaves glibc's defaults in our workers too, to show what keeping freed memory is worth.
"""
import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: find model/

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(kind: str, dtype: torch.dtype, device: str, vae_decode: bool = False):
    """(forward function, model) for one contender; both models start from diffusers' seeded random init.

    The forward is the UNet's (latents, timesteps, context) -> ε, or with ``vae_decode`` the VAE's latents ->
    image."""
    import diffusers  # the reference; only the benchmarks and the tests import it

    from model.convert import unet_config_to_diffusers, vae_config_to_diffusers
    from model.speed import prefer_channels_last
    from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel
    from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL
    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    if vae_decode:  # the configs, not a built model: building one only to read its config costs gigabytes
        ours_class, theirs_class = AutoencoderKL, diffusers.AutoencoderKL
        config = vae_config_to_diffusers(VAE_CONFIGS["sd15"])
    else:
        ours_class, theirs_class = UNet2DConditionModel, diffusers.UNet2DConditionModel
        config = unet_config_to_diffusers(UNET_CONFIGS["sd15"])
    config = {k: v for k, v in config.items() if k[0] != "_"}
    theirs = theirs_class(**config).eval()
    if kind == "diffusers":
        theirs.to(device=device, dtype=dtype)
        if vae_decode:
            return (lambda z: theirs.decode(z).sample), theirs
        return (lambda x, t, c: theirs(x, t, c).sample), theirs
    with torch.device("meta"):
        ours = ours_class()
    ours.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in theirs.state_dict().items()}, assign=True)
    del theirs
    ours = prefer_channels_last(ours.eval())
    forward = ours.decode if vae_decode else ours
    if kind == "compiled":
        if device == "cpu":
            import torch._inductor.config as inductor
            inductor.freezing = True  # inference only: the weights are read once, at compile time
        return torch.compile(forward, fullgraph=True), ours
    return forward, ours


def worker(connection, kind: str, dtype_name: str, args) -> None:
    """Build one contender, then answer "out" (its output) and "run" (time one forward) until "stop"."""
    dtype, device = DTYPES[dtype_name], args.device
    if kind != "diffusers" and device == "cpu" and not args.plain_memory:
        from model.speed import keep_freed_memory
        keep_freed_memory()  # as sample.py does on the CPU
    forward, _ = build(kind, dtype, device, args.vae_decode)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, args.size, args.size, generator=generator).to(device, dtype)
    context = torch.randn(args.batch, args.context, 768, generator=generator).to(device, dtype)
    timesteps = torch.full((args.batch,), 500, device=device)
    inputs = (latents,) if args.vae_decode else (latents, timesteps, context)
    connection.send("ready")
    with torch.inference_mode():
        forward(*inputs)  # warm-up
        for command in iter(connection.recv, "stop"):
            if command == "out":
                connection.send(forward(*inputs).float().cpu())
                continue
            start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            forward(*inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            end = resource.getrusage(resource.RUSAGE_SELF)
            connection.send((time.perf_counter() - start,
                             end.ru_utime - cpu.ru_utime + end.ru_stime - cpu.ru_stime))


def start_workers(contenders: list[tuple[str, str]], args) -> dict:
    """One process per contender, started one after the other (each briefly holds two copies of the UNet)."""
    context = multiprocessing.get_context("spawn")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when a worker's OpenMP starts
    workers = {}
    for kind, dtype in contenders:
        ours_end, theirs_end = context.Pipe()
        process = context.Process(target=worker, args=(theirs_end, kind, dtype, args), daemon=True)
        process.start()
        while not ours_end.poll(5):
            if not process.is_alive():
                sys.exit(f"error: the {kind} {dtype} worker did not start")
        ours_end.recv()
        workers[f"{'ours compiled' if kind == 'compiled' else kind} {dtype}"] = (process, ours_end)
    return workers


def ask(worker, command: str):
    """Send ``command`` to a worker (process, connection) and wait for its answer while it lives."""
    process, connection = worker
    connection.send(command)
    while not connection.poll(5):
        if not process.is_alive():
            sys.exit(f"error: a worker died (exit code {process.exitcode}; out of memory?)")
    return connection.recv()


def measure(workers: dict, repeats: int) -> dict:
    """Interleaved rounds, the order reversed every other round: {name: [(wall s, cpu s), ...]}."""
    times = {name: [] for name in workers}
    names = list(workers)
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            times[name].append(ask(workers[name], "run"))
    return times


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "CPU"
    return f"{name}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"


def report(args, times: dict, differences: dict, load_before: str) -> None:
    what = "VAE decode" if args.vae_decode else f"UNet forward, context {args.context}"
    print(f"SD-1.5 {what}: {machine(args.device)} (before: {load_before}); batch {args.batch}, latents "
          f"{args.size}×{args.size}; medians of {args.repeats}, interleaved"
          + ("; ours with glibc's default memory reuse" if args.plain_memory else ""))
    print(f"{'contender':<18} {'wall s':>8} {'x diffusers':>11} {'cpu s':>8} {'x diffusers':>11} {'max |diff|':>10}")
    reference = next(iter(times))
    wall0 = statistics.median(t[0] for t in times[reference])
    cpu0 = statistics.median(t[1] for t in times[reference])
    for name, values in times.items():
        wall, cpu = statistics.median(t[0] for t in values), statistics.median(t[1] for t in values)
        print(f"{name:<18} {wall:>8.3f} {wall / wall0:>11.3f} {cpu:>8.3f} {cpu / cpu0:>11.3f} "
              f"{differences[name]:>10.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="ours' half dtype")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 (CFG) for the UNet, 1 for the VAE")
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px images)")
    parser.add_argument("--context", type=int, default=77, help="context tokens (77 plain SD, 240 LongAlign)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plain-memory", action="store_true", help="ours without keep_freed_memory")
    parser.add_argument("--compile", action="store_true", help="time ours compiled (fullgraph, frozen on a CPU)")
    parser.add_argument("--vae-decode", action="store_true", help="time the VAE's decode instead of the UNet")
    args = parser.parse_args()
    args.batch = args.batch or (1 if args.vae_decode else 2)
    load_before = f"load average {os.getloadavg()[0]:.2f}"
    ours = "compiled" if args.compile else "ours"
    workers = start_workers([("diffusers", "fp32"), (ours, "fp32"), (ours, args.dtype)], args)
    outputs = {name: ask(worker, "out") for name, worker in workers.items()}
    reference = outputs["diffusers fp32"]
    differences = {name: (out - reference).abs().max().item() for name, out in outputs.items()}
    times = measure(workers, args.repeats)
    for _, connection in workers.values():
        connection.send("stop")
    report(args, times, differences, load_before)


if __name__ == "__main__":
    main()
