"""Sample images from Stable Diffusion 1.5 (or the shipped miniature) with LongAlign's long-prompt encoding.

    python sample.py "A long, detailed prompt. Many sentences. Each one a fact."
    python sample.py "prompt" --weights /path/to/stable-diffusion-v1-5 --steps 25 --sampler dpm

Prompts over CLIP's 77 tokens are encoded segment by segment (LongAlign §3) and concatenated into a
240-token context; shorter ones go through plain CLIP, exactly as SD-1.5 was trained. The negative
(unconditional) context always goes through the same encoder, so the two contexts have the same length.
The PNG keeps the prompt and settings in a "parameters" text chunk, as other SD tools do.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from model.diffusion import DDIMSampler, DPMSolverSampler, NoiseSchedule, sample_loop
from model.longtext import LongPromptEncoder
from model.lora import load_lora, merge_lora
from model.weights import WeightsError, load_pipeline

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "mini"
MINI_WORLD_NOTE = (
    "note: the shipped default model is a miniature trained only on the 64x64 'shapes world' (coloured circles, "
    "squares and triangles on a 3x3 grid). For real images pass --weights with a Stable Diffusion 1.5 folder or "
    "single-file checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hugging Face Hub)."
)
TRAINED_ENCODING_FILE = "longalign.json"  # train.py --export writes {"encoding": ..., "max_tokens": ...}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the prompt; any length (use \"\" for an unconditional sample)")
    p.add_argument("--weights", type=Path, default=None,
                   help=f"SD-1.5 diffusers folder or single-file checkpoint (default: the shipped miniature, "
                        f"{DEFAULT_WEIGHTS})")
    p.add_argument("--lora", type=Path, default=None, help="a LoRA .safetensors written by train.py")
    p.add_argument("--negative", default="", help="negative prompt (default: empty)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--cfg", type=float, default=7.5,
                   help="classifier-free guidance scale (default 7.5); 1 or less turns guidance off, as in diffusers")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--sampler", choices=["ddim", "dpm"], default="ddim",
                   help="DDIM (eta 0) or DPM-Solver++(2M), which is good in 20-25 steps")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: model's)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: model's)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="output PNG; with --batch N > 1, files are numbered NAME-0.png, NAME-1.png, ...")
    p.add_argument("--encoding", choices=["auto", "segment", "truncate", "chunk75", "keep-all", "no-sot"],
                   default="auto", help="auto: the encoding the weights were fine-tuned with when train.py "
                                        "recorded it (longalign.json), else LongAlign's segment encoding for "
                                        "prompts over 77 tokens and plain 77-token CLIP otherwise; the others "
                                        "force one strategy")
    p.add_argument("--max-tokens", type=int, default=240, help="context length of segment encoding (default 240)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="fp16 (default on CUDA), bf16, or fp32 (default and only choice on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p.parse_args(argv)


def check_args(args):
    """Refuse settings that would fail deep inside the model, with a message that names the fix."""
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{side} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if not 1 <= args.steps <= 999:
        raise ValueError(f"--steps must be between 1 and 999, got {args.steps}")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file (the settings are stored in its text chunk), got {args.out}")
    probe = args.out.with_name(args.out.name + ".check")  # fail now, not after minutes of sampling
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {args.out.parent} ({err.strerror}); choose another --out") from None


def pick_device(args):
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"unknown --device {args.device!r}; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "cpu" and args.dtype not in (None, "fp32"):
        raise ValueError(f"--dtype {args.dtype} needs CUDA; on the CPU the model runs in fp32")
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    return device, dtype


def weights_path(args) -> Path:
    if args.weights is not None:
        return args.weights
    if not DEFAULT_WEIGHTS.exists():
        raise WeightsError(
            f"no --weights given and the shipped default model is missing ({DEFAULT_WEIGHTS}). Download Stable "
            "Diffusion 1.5 (a diffusers folder, or v1-5-pruned-emaonly.safetensors) and pass --weights PATH.")
    print(MINI_WORLD_NOTE, file=sys.stderr)
    return DEFAULT_WEIGHTS


def trained_encoding(weights: Path) -> str | None:
    """The text encoding a LongAlign-trained UNet learned, recorded by ``train.py --export`` (else None)."""
    record = weights / TRAINED_ENCODING_FILE
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())["encoding"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(f"{record} is not a valid record of the training encoding ({err}); delete it or "
                           "choose --encoding yourself.") from None


def choose_strategy(args, tokenizer, trained: str | None) -> str:
    """'auto': the encoding the weights were fine-tuned with, if they say; otherwise the paper's segment
    concat for prompts over 77 tokens and plain CLIP, as SD-1.5 was trained, for prompts that fit."""
    if args.encoding == "auto":
        if trained is not None:
            return trained
        too_long = max(len(tokenizer.encode(text)) for text in (args.prompt, args.negative)) > 75
        return "concat" if too_long else "truncate"
    return "concat" if args.encoding == "segment" else args.encoding


def initial_latents(args, downsample: int, height: int, width: int, device, dtype):
    """Noise drawn on the CPU from the seed, as diffusers does, so the same seed gives the same image."""
    generator = torch.Generator("cpu").manual_seed(args.seed)
    shape = (args.batch, 4, height // downsample, width // downsample)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(img)) for img in x]


def png_parameters(args, weights, strategy, height, width) -> PngInfo:
    """The prompt and settings in the common 'parameters' text-chunk convention."""
    info = PngInfo()
    settings = (f"Steps: {args.steps}, Sampler: {args.sampler.upper()}, CFG scale: {args.cfg}, Seed: {args.seed}, "
                f"Size: {width}x{height}, Model: {weights.name}, Encoding: {strategy}, Max tokens: {args.max_tokens}")
    if args.lora is not None:
        settings += f", LoRA: {args.lora.name}"
    info.add_text("parameters", f"{args.prompt}\nNegative prompt: {args.negative}\n{settings}")
    return info


def output_paths(out: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(batch)]


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        device, dtype = pick_device(args)
        weights = weights_path(args)
        pipe = load_pipeline(weights, dtype=dtype, device=device)
        if args.lora is not None:
            load_lora(pipe.unet, args.lora)
            merge_lora(pipe.unet)  # folded into the weights: sampling then costs no more than without it
        strategy = choose_strategy(args, pipe.tokenizer, trained_encoding(weights))
        encoder = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, args.max_tokens, strategy)
        schedule = NoiseSchedule()
        sampler = (DDIMSampler if args.sampler == "ddim" else DPMSolverSampler)(schedule, args.steps)
    except ValueError as err:  # bad input (WeightsError included): one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    height = args.height or pipe.default_size
    width = args.width or pipe.default_size

    plan = encoder.plan(args.prompt)
    print(f"encoding: {strategy}, {plan.segments} segments, {plan.tokens_used} tokens used"
          f"{f', {plan.tokens_dropped} dropped' if plan.tokens_dropped else ''}; "
          f"context {encoder.context_length} x {pipe.text_encoder.hidden_size}")
    with torch.no_grad():
        cond = encoder([args.prompt] * args.batch)
        # as in diffusers, a scale <= 1 turns guidance off: the conditional ε alone, no negative context
        uncond = encoder([args.negative]) if args.cfg > 1 else None

    latents = initial_latents(args, pipe.vae.downsample_factor, height, width, device, dtype)
    latents = sample_loop(pipe.unet, sampler, latents, cond, uncond, args.cfg)
    with torch.no_grad():
        images = to_images(pipe.vae.decode(latents / pipe.vae.scaling_factor))

    for image, path in zip(images, output_paths(args.out, args.batch)):
        image.save(path, pnginfo=png_parameters(args, weights, strategy, height, width))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
