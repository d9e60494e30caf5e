"""What does LongAlign's segment-level encoding cost over a plain 77-token encode? (paper §3)

Times, in one run and with the same text encoder (the full ViT-L/14 text tower of SD-1.5, random weights):
  - the plain SD-1.5 encode of the prompt cut to 77 tokens ("truncate"),
  - the segment encode of a ~230-token, 10-sentence prompt ("segment", the paper's variant), which encodes
    each sentence only as far as the longest kept run (the encoder is causal),
  - the two parts of the segment encode on their own: the batched encoder forward and the concatenation,
and the floor of the ratio: the context rows really kept, over 77.
With ``--device cuda`` it also measures the concatenation kernel's achieved memory bandwidth on a large
batch, next to its PyTorch twin and a plain device-to-device copy of the same output.

    python bench/segment_encode.py                      # CPU, fp32
    python bench/segment_encode.py --device cuda --dtype float16
    python bench/segment_encode.py --bandwidth-only --small   # the bandwidth table alone (CPU: twin vs copy)
"""
import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.clip import CONFIGS, CLIPTextModel  # noqa: E402
from model.kernels import concat_segments, concat_segments_torch, concat_segments_triton, use_triton  # noqa: E402
from model.longtext import DroppedTokensWarning, LongPromptEncoder, encoded_length  # noqa: E402
from model.tokenizer import CLIPTokenizer  # noqa: E402

PROMPT = (
    "An old stone bridge crosses a slow green river in a quiet village at dawn. "
    "Mist rises from the still water and hangs low between the tall reeds and willow trees along both banks. "
    "On the left bank, a row of narrow houses with red tiled roofs and blue shutters leans toward the river. "
    "A woman in a yellow raincoat walks a small brown dog across the bridge, holding a paper cup of coffee. "
    "Two white swans glide under the central arch, leaving long ripples that catch the pink morning light. "
    "Dark green ivy climbs the bridge's mossy parapet, and a rusty iron lamp post with a cracked glass "
    "shade stands at each end of it. "
    "Behind the houses, a church tower with a golden clock rises above a line of dark cypress trees. "
    "A wooden rowing boat painted turquoise is tied to a crooked post, half full of rainwater and "
    "fallen orange leaves. "
    "Thin clouds stretch across the pale sky, lit from below by the sun that is just climbing over the hills. "
    "The picture is a detailed watercolour with soft edges, gentle washes of colour, fine ink lines "
    "and the cream paper texture showing through.")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def median_seconds(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    return interleaved_medians([fn], device, repeats)[0]


def interleaved_medians(fns, device: str, repeats: int) -> list[float]:
    """Median wall time of each of ``fns`` over ``repeats`` rounds that run them in turn (reversing the order
    every other round), after one warm-up round: load on a shared machine then hits all of them alike."""
    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    for fn in fns:
        timed(fn)
    times = [[] for _ in fns]
    for repeat in range(repeats):
        order = list(range(len(fns))) if repeat % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            times[i].append(timed(fns[i]))
    return [statistics.median(t) for t in times]


def bench_encode(args) -> None:
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CONFIGS["vit-l-14"].text).to(device=device, dtype=dtype).eval()
    tokenizer = CLIPTokenizer()
    segment = LongPromptEncoder(tokenizer, text_encoder, max_tokens=240, strategy="segment")
    plain = LongPromptEncoder(tokenizer, text_encoder, strategy="truncate")
    plan = segment.plan(PROMPT)
    n_tokens = len(tokenizer.encode(PROMPT))
    kept_rows = min(segment.context_length, sum(length for _, length in plan.kept))
    length = encoded_length(plan.kept)

    ids = torch.tensor([block[:length] for block in plan.blocks], device=device)  # [segments, length]
    with torch.no_grad():
        hidden = text_encoder(ids)
    kept = torch.tensor(plan.kept, device=device)
    counts = torch.tensor([len(plan.blocks)], device=device)
    pad = segment.pad_star()

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DroppedTokensWarning)  # truncate drops most of the prompt, as it should
        plain_s, segment_s = interleaved_medians([lambda: plain([PROMPT]), lambda: segment([PROMPT])], device,
                                                 args.repeats)
        rows = [("plain encode, 77 tokens (truncate)", 1, 77, plain_s),
                (f"segment encode, {segment.context_length} tokens (segment)", len(plan.blocks), length, segment_s),
                ("  of which: encoder forward", len(plan.blocks), length,
                 median_seconds(lambda: text_encoder(ids), device, args.repeats))]
        which = "kernel" if use_triton(hidden) else "twin"
        rows.append((f"  of which: concatenation ({which})", len(plan.blocks), length, median_seconds(
            lambda: concat_segments(hidden, kept[:, 0], kept[:, 1], counts, pad, 240), device, args.repeats)))

    name = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"ViT-L/14 text encoder, random weights, {args.dtype}, {name}; load average {os.getloadavg()[0]:.2f}")
    print(f"prompt: {n_tokens} tokens, {plan.segments} sentences -> {plan.tokens_used} tokens used, "
          f"{plan.tokens_dropped} dropped; medians of {args.repeats}, plain and segment interleaved")
    print(f"{'':42s} {'blocks':>6s} {'length':>6s} {'ms':>9s} {'x plain':>8s}")
    for label, blocks, positions, seconds in rows:
        print(f"{label:42s} {blocks:6d} {positions:6d} {seconds * 1e3:9.2f} {seconds / rows[0][3]:8.2f}")
    print(f"segment / plain: {segment_s / plain_s:.2f}   floor (kept rows / 77): {kept_rows} / 77 = "
          f"{kept_rows / 77:.2f}   encoded positions / 77: {len(plan.blocks) * length / 77:.2f}")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def bench_kernel_bandwidth(args) -> None:
    """Achieved bandwidth of the concatenation kernel vs its twin vs a plain copy of the output, same device.

    On CUDA the kernel runs compiled and triton's ``do_bench`` times it. On the CPU only the twin (the path a
    CPU takes) and the copy are timed: the interpreter says nothing about the kernel's speed.
    """
    device, dtype, dim, max_tokens = args.device, DTYPES[args.dtype], 768, 240
    prompts, segments = (8, 10) if args.small else (256, 10)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(prompts * segments, 77, dim, generator=generator).to(device, dtype)
    kept_len = torch.randint(10, 30, (prompts * segments,), generator=generator).to(device)
    kept_start = torch.zeros_like(kept_len)
    counts = torch.full((prompts,), segments, device=device)
    pad = torch.randn(dim, generator=generator).to(device, dtype)
    inputs = (hidden, kept_start, kept_len, counts, pad, max_tokens)

    out = concat_segments_torch(*inputs)
    rows_read = int(kept_len.view(prompts, segments).sum(1).clamp(max=max_tokens).sum())
    element = hidden.element_size()
    moved = (rows_read + prompts * max_tokens) * dim * element  # read the kept rows, write every output row
    copy_source = torch.empty_like(out)
    candidates = {"concatenation twin (PyTorch)": (lambda: concat_segments_torch(*inputs), moved),
                  "plain copy of the output": (lambda: out.copy_(copy_source), 2 * out.numel() * element)}
    if device == "cuda":
        assert torch.equal(concat_segments_triton(*inputs), out), "kernel and twin disagree"
        candidates = {"concatenation kernel (Triton)": (lambda: concat_segments_triton(*inputs), moved),
                      **candidates}
    results = [(label, milliseconds(fn, device, args.repeats), nbytes) for label, (fn, nbytes) in candidates.items()]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nconcatenation of {prompts} prompts x {segments} segments -> [{prompts}, {max_tokens}, {dim}] "
          f"{args.dtype}, {name}")
    print(f"{'':38s} {'ms':>8s} {'GB/s':>8s}")
    for label, ms, nbytes in results:
        print(f"{label:38s} {ms:8.3f} {nbytes / ms / 1e6:8.1f}")
    (label, ms, nbytes), (_, copy_ms, copy_bytes) = results[0], results[-1]
    speed, copy_speed = nbytes / ms / 1e6, copy_bytes / copy_ms / 1e6
    print(f"summary: {label.split(' (')[0].replace('concatenation', 'concat')} {speed:.1f} GB/s = "
          f"{100 * speed / copy_speed:.0f}% of a plain copy ({copy_speed:.1f} GB/s), {args.dtype}")


def milliseconds(fn, device: str, repeats: int) -> float:
    """``fn``'s time in ms: triton's ``do_bench`` on CUDA (it flushes the L2 between runs), else the median."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn)
    return 1e3 * median_seconds(fn, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median is reported)")
    parser.add_argument("--bandwidth-only", action="store_true",
                        help="skip the encode timings and measure only the concatenation's bandwidth (on the CPU: "
                             "its twin's, against a plain copy)")
    parser.add_argument("--small", action="store_true", help="a small concatenation batch (8 prompts), for a quick run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible.")
    if not args.bandwidth_only:
        bench_encode(args)
    if args.device == "cuda" or args.bandwidth_only:
        bench_kernel_bandwidth(args)


if __name__ == "__main__":
    main()
