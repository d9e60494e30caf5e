"""What does LongAlign's segment-level encoding cost over a plain 77-token encode? (paper §3)

Times, in one run and with the same text encoder (the full ViT-L/14 text tower of SD-1.5, random weights):
  - the plain SD-1.5 encode of the prompt cut to 77 tokens ("truncate"),
  - the segment encode of a ~230-token, 10-sentence prompt ("segment", the paper's variant),
  - the two parts of the segment encode on their own: the batched encoder forward and the concatenation.
With ``--device cuda`` it also measures the concatenation kernel's achieved memory bandwidth on a large
batch, next to its PyTorch twin and a plain device-to-device copy of the same output.

    python bench/segment_encode.py                      # CPU, fp32
    python bench/segment_encode.py --device cuda --dtype float16
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.clip import CONFIGS, CLIPTextModel  # noqa: E402
from model.kernels import concat_segments, concat_segments_torch, concat_segments_triton, use_triton  # noqa: E402
from model.longtext import LongPromptEncoder  # noqa: E402
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
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_encode(args) -> None:
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CONFIGS["vit-l-14"].text).to(device=device, dtype=dtype).eval()
    tokenizer = CLIPTokenizer()
    segment = LongPromptEncoder(tokenizer, text_encoder, max_tokens=240, strategy="segment")
    plain = LongPromptEncoder(tokenizer, text_encoder, strategy="truncate")
    plan = segment.plan(PROMPT)
    n_tokens = len(tokenizer.encode(PROMPT))

    ids = torch.tensor(plan.blocks, device=device)  # [segments, 77]
    with torch.no_grad():
        hidden = text_encoder(ids)
    kept = torch.tensor(plan.kept, device=device)
    counts = torch.tensor([len(plan.blocks)], device=device)
    pad = segment.pad_star()

    rows = []
    with torch.no_grad():
        rows.append(("plain encode, 77 tokens (truncate)", 1,
                     median_seconds(lambda: plain([PROMPT]), device, args.repeats)))
        rows.append((f"segment encode, {segment.context_length} tokens (segment)", len(plan.blocks),
                     median_seconds(lambda: segment([PROMPT]), device, args.repeats)))
        rows.append(("  of which: encoder forward", len(plan.blocks),
                     median_seconds(lambda: text_encoder(ids), device, args.repeats)))
        which = "kernel" if use_triton(hidden) else "twin"
        rows.append((f"  of which: concatenation ({which})", len(plan.blocks), median_seconds(
            lambda: concat_segments(hidden, kept[:, 0], kept[:, 1], counts, pad, 240), device, args.repeats)))

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViT-L/14 text encoder, random weights, {args.dtype}, {name}")
    print(f"prompt: {n_tokens} tokens, {plan.segments} sentences -> {plan.tokens_used} tokens used, "
          f"{plan.tokens_dropped} dropped")
    print(f"{'':42s} {'blocks':>6s} {'ms':>9s} {'x plain':>8s}")
    for label, blocks, seconds in rows:
        print(f"{label:42s} {blocks:6d} {seconds * 1e3:9.2f} {seconds / rows[0][2]:8.2f}")


def bench_kernel_bandwidth(args) -> None:
    """Achieved bandwidth of the concatenation kernel vs its twin vs a device-to-device copy of the output."""
    import triton.testing

    dtype, dim, prompts, segments, max_tokens = DTYPES[args.dtype], 768, 256, 10, 240
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(prompts * segments, 77, dim, device="cuda", generator=generator).to(dtype)
    kept_len = torch.randint(10, 30, (prompts * segments,), device="cuda", generator=generator)
    kept_start = torch.zeros_like(kept_len)
    counts = torch.full((prompts,), segments, device="cuda")
    pad = torch.randn(dim, device="cuda", generator=generator).to(dtype)
    args_ = (hidden, kept_start, kept_len, counts, pad, max_tokens)

    out = concat_segments_triton(*args_)
    assert torch.equal(out, concat_segments_torch(*args_)), "kernel and twin disagree"
    rows_read = int(kept_len.view(prompts, segments).sum(1).clamp(max=max_tokens).sum())
    element = hidden.element_size()
    moved = (rows_read + prompts * max_tokens) * dim * element  # read the kept rows, write every output row
    copy_source = torch.empty_like(out)
    results = [
        ("concatenation kernel (Triton)", triton.testing.do_bench(lambda: concat_segments_triton(*args_)), moved),
        ("concatenation twin (PyTorch)", triton.testing.do_bench(lambda: concat_segments_torch(*args_)), moved),
        ("device-to-device copy of the output", triton.testing.do_bench(lambda: out.copy_(copy_source)),
         2 * out.numel() * element),
    ]
    print(f"\nconcatenation of {prompts} prompts x {segments} segments -> [{prompts}, {max_tokens}, {dim}] "
          f"{args.dtype}, {torch.cuda.get_device_name()}")
    print(f"{'':38s} {'ms':>8s} {'GB/s':>8s}")
    for label, ms, nbytes in results:
        print(f"{label:38s} {ms:8.3f} {nbytes / ms / 1e6:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median is reported)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible.")
    bench_encode(args)
    if args.device == "cuda":
        bench_kernel_bandwidth(args)


if __name__ == "__main__":
    main()
