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
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from model.diffusion import DDIMSampler, DPMSolverSampler, NoiseSchedule, sample_loop
from model.longtext import RENAMED, STRATEGIES, DroppedTokensWarning, LongPromptEncoder, check_strategy
from model.lora import load_lora_state_dict, merge_lora, read_lora_file
from model.vae import to_uint8
from model.weights import WeightsError, load_pipeline

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "mini"
MINI_WORLD_NOTE = (
    "note: the shipped default model is a miniature trained only on the 64x64 'shapes world' (coloured circles, "
    "squares and triangles on a 3x3 grid). For real images pass --weights with a Stable Diffusion 1.5 folder or "
    "single-file checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hugging Face Hub)."
)
# train.py --export writes {"encoding": ..., "max_tokens": ...}; a shipped model may add the sampling settings
# it was measured with, {"sampling": {"sampler": "dpm", "steps": 10, "cfg": 3.0}}, which fill the flags left out.
TRAINING_RECORD_FILE = "longalign.json"
SD15_SAMPLING = {"sampler": "ddim", "steps": 50, "cfg": 7.5}  # the defaults for weights that recommend none
SAMPLERS = {"ddim": DDIMSampler, "dpm": DPMSolverSampler}
MAX_STEPS = 999  # one step per training timestep at most
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ENCODINGS = ("auto", *STRATEGIES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the prompt; any length (use \"\" for an unconditional sample)")
    p.add_argument("--weights", type=Path, default=None,
                   help=f"SD-1.5 diffusers folder or single-file checkpoint (default: the shipped miniature, "
                        f"{DEFAULT_WEIGHTS})")
    p.add_argument("--lora", type=Path, default=None,
                   help="a LoRA file: train.py's, kohya/A1111, diffusers/PEFT, or the LongAlign release's .pt list")
    p.add_argument("--negative", default="", help="negative prompt (default: empty)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: what the weights recommend in longalign.json, else 50)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the weights' recommendation, else 7.5); 1 or "
                        "less turns guidance off, as in diffusers")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="DDIM (eta 0) or DPM-Solver++(2M), which is good in 20-25 steps (default: the weights' "
                        "recommendation, else ddim)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: model's)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: model's)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="output PNG; with --batch N > 1, files are numbered NAME-0.png, NAME-1.png, ...")
    p.add_argument("--encoding", default="auto", metavar="{" + ",".join(ENCODINGS) + "}",
                   help="auto: the encoding the weights were fine-tuned with when train.py recorded it "
                        "(longalign.json), else LongAlign's segment encoding for prompts over 77 tokens and "
                        "plain 77-token CLIP otherwise; the others force one strategy")
    p.add_argument("--max-tokens", type=int, default=240, help="context length of segment encoding (default 240)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="fp16 (default on CUDA), bf16, or fp32 (default and only choice on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p.parse_args(argv)


def check_args(args):
    """Refuse settings that would fail deep inside the model, with a message that names the fix."""
    if args.encoding in RENAMED:
        raise ValueError(f"--encoding {args.encoding} is now called --encoding {RENAMED[args.encoding]}; pass that")
    if args.encoding not in ENCODINGS:
        raise ValueError(f"unknown --encoding {args.encoding!r}; choose one of {', '.join(ENCODINGS)}")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{side} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
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


def training_record(weights: Path) -> dict:
    """What ``train.py --export`` (and the recipe that ships a model) recorded beside the weights; {} if nothing."""
    record_file = weights / TRAINING_RECORD_FILE
    if not record_file.is_file():
        return {}
    try:
        record = json.loads(record_file.read_text())
        encoding = record.get("encoding", "segment") if isinstance(record, dict) else None
        if not isinstance(encoding, str):
            raise ValueError("expected an object whose 'encoding' is a string")
        check_strategy(encoding)
        check_recommended_sampling(record.get("sampling", {}))
    except ValueError as err:  # json.JSONDecodeError included
        raise WeightsError(f"{record_file} is not a valid LongAlign record ({err}); delete it, or pass --encoding, "
                           "--sampler, --steps and --cfg yourself.") from None
    return record


def check_recommended_sampling(sampling):
    """The record's sampling settings must be ones the flags could have given."""
    if not isinstance(sampling, dict) or set(sampling) - set(SD15_SAMPLING):
        raise ValueError(f"'sampling' may hold only {sorted(SD15_SAMPLING)}")
    steps, cfg = sampling.get("steps", 1), sampling.get("cfg", 1.0)
    if (sampling.get("sampler", "ddim") not in SAMPLERS or type(steps) is not int or not 1 <= steps <= MAX_STEPS
            or type(cfg) not in (int, float)):
        raise ValueError(f"'sampling' needs a sampler in {sorted(SAMPLERS)}, integer steps in 1..{MAX_STEPS} and a "
                         f"numeric cfg, got {sampling}")


def fill_sampling_defaults(args, record: dict):
    """Flags left out take the weights' recommended sampling (the settings the shipped miniature was measured
    with), else SD-1.5's usual DDIM, 50 steps, CFG 7.5."""
    recommended = {**SD15_SAMPLING, **record.get("sampling", {})}
    for name, value in recommended.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def choose_strategy(args, tokenizer, trained: str | None) -> str:
    """'auto': the encoding the weights (or the LoRA) were fine-tuned with, if they say; otherwise the paper's segment
    encoding for prompts over 77 tokens and plain CLIP, as SD-1.5 was trained, for prompts that fit."""
    if args.encoding != "auto":
        return args.encoding
    if trained is not None:
        return trained
    too_long = max(len(tokenizer.encode(text)) for text in (args.prompt, args.negative)) > 75
    return "segment" if too_long else "truncate"


def dropped_tokens_fix(what: str, strategy: str, dropped: int, max_tokens: int) -> str:
    """What to do when a prompt does not fit the context (sample.py's wording of the encoder's warning)."""
    if strategy == "truncate":
        return (f"the {what}'s last {dropped} tokens do not fit plain CLIP's 77 and are ignored; "
                "pass --encoding segment to keep them")
    return (f"the {what}'s last {dropped} tokens do not fit the context of --max-tokens {max_tokens} and are ignored; "
            "pass a larger --max-tokens to keep them (longer than the model was trained with may sample worse), "
            "or shorten the prompt")


def initial_latents(args, vae, height: int, width: int, device, dtype):
    """Noise drawn on the CPU from the seed, as diffusers does, so the same seed gives the same image."""
    generator = torch.Generator("cpu").manual_seed(args.seed)
    shape = vae.latent_shape(args.batch, height, width)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    return [Image.fromarray(np.ascontiguousarray(img)) for img in to_uint8(x).numpy()]


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


def load_model(args, weights: Path, device, dtype):
    """The pipeline in ``dtype`` on ``device`` with the --lora merged into its UNet, and the encoding that LoRA
    was trained with when its file records it (train.py's files do; kohya, PEFT and older files do not)."""
    pipe = load_pipeline(weights, dtype=dtype, device=device)
    if args.lora is None:
        return pipe, None
    lora = read_lora_file(args.lora, pipe.unet)
    load_lora_state_dict(pipe.unet, lora.state, source=f"{args.lora} ({lora.layout})")
    merge_lora(pipe.unet)  # folded into the weights: sampling then costs no more than without it
    trained = lora.metadata.get("encoding")
    if trained is not None:
        try:
            check_strategy(trained)
        except ValueError as err:
            raise WeightsError(f"{args.lora} records an unknown encoding ({err}); pass --encoding yourself") from None
    return pipe, trained


def encode_contexts(args, encoder: LongPromptEncoder, strategy: str, text_width: int):
    """The conditional contexts (one per image) and the negative one (None without guidance), after saying
    how the prompt was encoded and, for a prompt that does not fit, how to keep all of it."""
    plans = {"prompt": encoder.plan(args.prompt)}
    if args.cfg > 1:  # the negative is encoded only under guidance (below)
        plans["negative prompt"] = encoder.plan(args.negative)
    plan = plans["prompt"]
    print(f"encoding: {strategy}, {plan.segments} segments, {plan.tokens_used} tokens used"
          f"{f', {plan.tokens_dropped} dropped' if plan.tokens_dropped else ''}; "
          f"context {encoder.context_length} x {text_width}")
    print(f"sampling: {args.sampler}, {args.steps} steps, CFG {args.cfg}")
    for what, text_plan in plans.items():
        if text_plan.tokens_dropped:
            print(f"note: {dropped_tokens_fix(what, strategy, text_plan.tokens_dropped, args.max_tokens)}",
                  file=sys.stderr)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DroppedTokensWarning)  # the note above already said it, with the fix
        cond = encoder([args.prompt] * args.batch)
        # as in diffusers, a scale <= 1 turns guidance off: the conditional ε alone, no negative context
        uncond = encoder([args.negative]) if args.cfg > 1 else None
    return cond, uncond


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        device, dtype = pick_device(args)
        weights = weights_path(args)
        record = training_record(weights)
        fill_sampling_defaults(args, record)
        pipe, lora_encoding = load_model(args, weights, device, dtype)
        strategy = choose_strategy(args, pipe.tokenizer, lora_encoding or record.get("encoding"))
        encoder = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, args.max_tokens, strategy)
        sampler = SAMPLERS[args.sampler](NoiseSchedule(), args.steps)
        height, width = args.height or pipe.default_size, args.width or pipe.default_size
        latents = initial_latents(args, pipe.vae, height, width, device, dtype)
    except ValueError as err:  # bad input (WeightsError included): one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    cond, uncond = encode_contexts(args, encoder, strategy, pipe.text_encoder.hidden_size)
    latents = sample_loop(pipe.unet, sampler, latents, cond, uncond, args.cfg)
    with torch.no_grad():
        images = to_images(pipe.vae.decode(latents / pipe.vae.scaling_factor))
    for image, path in zip(images, output_paths(args.out, args.batch)):
        image.save(path, pnginfo=png_parameters(args, weights, strategy, height, width))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
