"""What does the released LongSD's 480-row context cost over LongAlign's 240-row CLIP context?

LongSD conditions the UNet on [CLIP segment encoding (paper §3), 240 rows | TextAdapter(T5-large(caption)),
240 rows]. This times, in one run, with random weights:
  - encoding one long prompt: the CLIP segment encoding alone, then with the T5 half added (T5-large over 240
    ids, then LaVi-Bridge's TextAdapter);
  - one UNet forward at batch 2 (classifier-free guidance) with 240 and with 480 context rows;
and from those the cost of a whole 25-step sample. T5 tokenization is left out (microseconds, and there is no
T5 vocabulary offline): the T5 encoder gets 240 random ids, as many as a tokenized caption has.

    python bench/t5_context.py                        # real sizes: ViT-L/14 text, T5-large, SD-1.5, 64×64
    python bench/t5_context.py --small --repeats 1    # the small test models: a smoke run of this script
    python bench/t5_context.py --device cuda --dtype bfloat16
"""
import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: find model/

from model.clip import CONFIGS as CLIP_CONFIGS, CLIPTextModel  # noqa: E402
from model.longtext import DroppedTokensWarning, LongPromptEncoder  # noqa: E402
from model.t5 import ADAPTER_CONFIGS, CONFIGS as T5_CONFIGS, T5_MAX_TOKENS, TextAdapter, T5EncoderModel  # noqa: E402
from model.tokenizer import CLIPTokenizer  # noqa: E402
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel  # noqa: E402

PROMPT = (
    "A narrow cobbled street in an old harbour town climbs toward a white lighthouse in the late afternoon. "
    "Fishing nets hang to dry over blue wooden railings, and a grey cat sleeps on a stack of orange crates. "
    "Two children in striped sweaters chase a red kite past a bakery whose window is full of round loaves. "
    "Gulls circle above the masts of small boats moored along the stone quay, their hulls painted green and "
    "yellow. Laundry flutters on lines strung between the upper windows of tall, pastel-coloured houses. "
    "A fisherman in a yellow oilskin coat mends a lobster pot on an upturned barrel near the water's edge. "
    "The sea beyond the breakwater is choppy and deep blue, flecked with white, under a sky of torn clouds. "
    "The picture is a crisp oil painting with thick brush strokes, warm light and long violet shadows.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE_STEPS = 25  # the release samples with 25 UniPC steps


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one untimed warm-up run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # GPU work runs asynchronously
    seconds = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])  # the first run pays for one-time allocations


def models(args):
    """The random-weight text encoders and UNet at the sizes asked for, in eval mode."""
    size = "test" if args.small else None
    clip_cfg = CLIP_CONFIGS[size or "vit-l-14"].text
    t5_cfg = T5_CONFIGS[size or "t5-large"]
    adapter_cfg = ADAPTER_CONFIGS["longsd"]
    unet_cfg = UNET_CONFIGS[size or "sd15"]
    if args.small:  # the small models' widths differ; join them up as the real ones are
        adapter_cfg = dataclasses.replace(adapter_cfg, in_dim=t5_cfg.d_model, int_dim=48, out_dim=clip_cfg.width)
        unet_cfg = dataclasses.replace(unet_cfg, cross_attention_dim=clip_cfg.width)
    torch.manual_seed(0)
    built = [CLIPTextModel(clip_cfg), T5EncoderModel(t5_cfg), TextAdapter(adapter_cfg), UNet2DConditionModel(unet_cfg)]
    return [m.to(device=args.device, dtype=args.torch_dtype).eval() for m in built]


def bench(args) -> list[tuple[str, int, float]]:
    """(label, context rows, median seconds) for each row of the table."""
    clip, t5, adapter, unet = models(args)
    segment = LongPromptEncoder(CLIPTokenizer(), clip, max_tokens=T5_MAX_TOKENS, strategy="segment")
    vocab = t5.config.vocab_size
    ids = torch.randint(3, vocab, (1, T5_MAX_TOKENS), generator=torch.Generator().manual_seed(0)).to(args.device)

    def t5_half():
        return adapter(t5(ids))

    def both_halves():
        return torch.cat([segment([PROMPT]), t5_half()], dim=1)

    latent = args.latent or unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, unet.config.in_channels, latent, latent, generator=generator)
    x = x.to(args.device, args.torch_dtype)
    t = torch.full((args.batch,), 500, device=args.device)
    contexts = {rows: torch.randn(args.batch, rows, unet.config.cross_attention_dim, generator=generator)
                .to(args.device, args.torch_dtype) for rows in (T5_MAX_TOKENS, 2 * T5_MAX_TOKENS)}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DroppedTokensWarning)
        assert both_halves().shape[1] == 2 * T5_MAX_TOKENS
        return [("encode: CLIP segment", T5_MAX_TOKENS, median_seconds(lambda: segment([PROMPT]), args.device,
                                                                        args.repeats)),
                ("encode: CLIP segment + T5 + adapter", 2 * T5_MAX_TOKENS,
                 median_seconds(both_halves, args.device, args.repeats)),
                ("  of which T5 + adapter", T5_MAX_TOKENS, median_seconds(t5_half, args.device, args.repeats)),
                (f"UNet forward, batch {args.batch}, {latent}x{latent}", T5_MAX_TOKENS,
                 median_seconds(lambda: unet(x, t, contexts[T5_MAX_TOKENS]), args.device, args.repeats)),
                (f"UNet forward, batch {args.batch}, {latent}x{latent}", 2 * T5_MAX_TOKENS,
                 median_seconds(lambda: unet(x, t, contexts[2 * T5_MAX_TOKENS]), args.device, args.repeats))]


def report(args, rows) -> None:
    sizes = "test-size models" if args.small else "ViT-L/14 text, T5-large, SD-1.5 UNet"
    where = torch.cuda.get_device_name() if args.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{sizes}; random weights, {args.dtype}, {where}; median of {args.repeats} after 1 warm-up")
    print(f"{'':44s} {'rows':>5s} {'ms':>10s} {'ratio':>6s}")
    base = {"encode": rows[0][2], "UNet": rows[3][2]}
    for label, n_rows, seconds in rows:
        ratio = seconds / base["UNet" if label.startswith("UNet") else "encode"]
        print(f"{label:44s} {n_rows:5d} {seconds * 1e3:10.1f} {ratio:6.2f}")
    clip_only = rows[0][2] + SAMPLE_STEPS * rows[3][2]
    longsd = rows[1][2] + SAMPLE_STEPS * rows[4][2]
    print(f"a {SAMPLE_STEPS}-step CFG sample (encode + UNet calls, no VAE): CLIP context {clip_only:.2f} s, "
          f"LongSD context {longsd:.2f} s, ratio {longsd / clip_only:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="float16 is refused: T5 overflows in it; the release runs bfloat16")
    parser.add_argument("--small", action="store_true", help="the small test models instead of the real sizes")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the UNet's, 64 for SD-1.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible.")
    if args.dtype == "float16":
        parser.error("T5 overflows in float16; use --dtype bfloat16 or float32.")
    args.device, args.torch_dtype = torch.device(args.device), DTYPES[args.dtype]
    report(args, bench(args))


if __name__ == "__main__":
    main()
