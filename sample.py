"""Sample images from Stable Diffusion 1.5 (or the shipped miniature) with LongAlign's long-prompt encoding.

    python sample.py "A long, detailed prompt. Many sentences. Each one a fact."
    python sample.py "prompt" --weights /path/to/stable-diffusion-v1-5 --steps 25 --sampler dpm
    python sample.py --prompts prompts.jsonl --out-dir samples --batch-size 8
    torchrun --nproc_per_node=4 sample.py --prompts prompts.jsonl --out-dir samples

Prompts over CLIP's 77 tokens are encoded segment by segment (LongAlign §3) and concatenated into a
240-token context; shorter ones go through plain CLIP, exactly as SD-1.5 was trained. The negative
(unconditional) context always goes through the same encoder, so the two contexts have the same length.

--prompts FILE (an evaluation such as the paper's Table 2) writes one PNG per prompt into a flat folder with a
manifest.jsonl (model/sample_folder.py). Each prompt's noise comes from its own seed and the ranks take fixed
batches, so a batch size gives the same images with any number of processes; a rerun skips what is there.
"""
import argparse
import json
import math
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from model.diffusion import sample_loop
from model.longtext import RENAMED, STRATEGIES, DroppedTokensWarning, LongPromptEncoder, check_strategy
from model.lora import load_lora_state_dict, merge_lora, merge_lora_files, read_lora_file
from model.record import MAX_STEPS, fill_sampling_defaults, training_record
from model.sample_folder import (MANIFEST, RANK_MANIFEST, SEED_RANGE, PromptItem, append_line, images_on_disk,
                                 merge_manifest, rank_batches, read_prompt_file, write_png)
from model.scheduler import SAMPLER_NAMES, make_sampler
from model.speed import compile_for_sampling, keep_freed_memory, prefer_channels_last, text_encoder_modules
from model.t5 import CLIPT5Encoder, load_adapter, load_t5, load_t5_tokenizer, longsd_files
from model.vae import to_uint8
from model.weights import Pipeline, WeightsError, load_pipeline

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "mini"
MINI_WORLD_NOTE = (
    "note: the shipped default model is a miniature trained only on the 64x64 'shapes world' (coloured circles, "
    "squares and triangles on a 3x3 grid). For real images pass --weights with a Stable Diffusion 1.5 folder or "
    "single-file checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hugging Face Hub).")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the x86 bf16 instructions oneDNN uses
ENCODINGS = ("auto", *STRATEGIES)
# A rank whose share of a resumed folder was already on disk waits at the final barrier for the others.
FINAL_BARRIER_TIMEOUT = timedelta(days=1)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets the scripts' one-line error instead of the usage text and a second line."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt; any length (use \"\" for an unconditional sample)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="many prompts instead of one: a .txt file (one a line) or JSONL with \"prompt\" or "
                        "\"caption\", optional \"seed\" and \"name\"; one PNG each in --out-dir")
    p.add_argument("--out-dir", type=Path, default=None, help="with --prompts: the folder of PNGs and manifest.jsonl")
    p.add_argument("--batch-size", type=int, default=None, help="with --prompts: prompts per batch (default 1)")
    p.add_argument("--weights", type=Path, default=None,
                   help=f"SD-1.5 diffusers folder or single-file checkpoint (default: the shipped miniature, "
                        f"{DEFAULT_WEIGHTS})")
    p.add_argument("--lora", type=Path, default=None,
                   help="a LoRA file: train.py's, kohya/A1111, diffusers/PEFT, or the LongAlign release's .pt list")
    p.add_argument("--longsd", type=Path, default=None,
                   help="the authors' released LongSD folder (s28750_adapter/, s28750_lora_vis.pt, "
                        "sd15-reward-3750.pt) or a train.py --t5 run: the 480-row CLIP+T5 context; needs --t5 "
                        "and --weights SD-1.5, and samples as released (UniPC, 25 steps, CFG 7.5)")
    p.add_argument("--t5", type=Path, default=None, help="with --longsd: the T5 folder (google-t5/t5-large with "
                                                         "tokenizer.json); T5 runs in bf16 where fp16 is asked")
    p.add_argument("--negative", default="", help="negative prompt (default: empty)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: what the weights recommend in longalign.json, else 50)")
    p.add_argument("--cfg", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: the weights' recommendation, else 7.5); 1 or "
                        "less turns guidance off, as in diffusers")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial noise (default 0); with --prompts, prompt i's is this + i")
    p.add_argument("--sampler", choices=list(SAMPLER_NAMES), default=None,
                   help="DDIM (eta 0), DPM-Solver++(2M) or UniPC (bh2), the last two good in 20-25 steps, with the "
                        "folder's scheduler_config.json (default: the weights' recommendation, else ddim)")
    size_help = "image {} (default: the model's), a multiple of the VAE's downsample factor: 8 in SD-1.5, 4 in mini"
    p.add_argument("--height", type=int, default=None, help=size_help.format("height"))
    p.add_argument("--width", type=int, default=None, help=size_help.format("width"))
    p.add_argument("--batch", type=int, default=1, help="images of the one prompt (default 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="output PNG (default out.png); with --batch N > 1, files are numbered NAME-0.png, ...")
    p.add_argument("--encoding", default="auto", metavar="{" + ",".join(ENCODINGS) + "}",
                   help="auto: the encoding the weights were fine-tuned with when train.py recorded it "
                        "(longalign.json), else LongAlign's segment encoding for prompts over 77 tokens and "
                        "plain 77-token CLIP otherwise; the others force one strategy")
    p.add_argument("--max-tokens", type=int, default=240, help="context length of segment encoding (default 240)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="fp16 (CUDA only), bf16 or fp32. Default: what the weights recommend, else fp16 on CUDA, "
                        "and on the CPU bf16 where it computes bf16 natively (AVX512-BF16, AMX), else fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet, VAE decoder and text encoders (CUDA graphs on a GPU, frozen weights "
                        "on a CPU): a one-off compile of a minute or two on a CPU, worth it for many images")
    return p.parse_args(argv)


def check_args(args):
    """Refuse settings that would fail deep inside the model, with a message that names the fix."""
    if args.encoding in RENAMED:
        raise ValueError(f"--encoding {args.encoding} is now called --encoding {RENAMED[args.encoding]}; pass that")
    if args.encoding not in ENCODINGS:
        raise ValueError(f"unknown --encoding {args.encoding!r}; choose one of {', '.join(ENCODINGS)}")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and value <= 0:
            raise ValueError(f"--{side} must be a positive number of pixels, got {value}")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if args.seed not in SEED_RANGE:
        raise ValueError(f"--seed must be a whole number in [-2**63, 2**64), got {args.seed}")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if (args.longsd is None) != (args.t5 is None):
        raise ValueError("--longsd and --t5 go together: the released folder and the T5 folder it conditions on "
                         "(google-t5/t5-large)")
    if args.prompts is None:
        check_one_prompt_args(args)
    else:
        check_prompt_file_args(args)


def check_one_prompt_args(args):
    if args.prompt is None:
        raise ValueError("give a prompt (\"\" for an unconditional sample), or --prompts FILE for many")
    if args.out_dir is not None or args.batch_size is not None:
        raise ValueError("--out-dir and --batch-size go with --prompts FILE; for one prompt use --out and --batch")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("several processes need a prompt file: pass --prompts FILE --out-dir DIR under torchrun")
    args.out = args.out or Path("out.png")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file (the settings are stored in its text chunk), got {args.out}")
    check_writable(args.out.parent, args.out.name, "--out")


def check_prompt_file_args(args):
    if args.prompt is not None:
        raise ValueError("give either a prompt or --prompts FILE, not both")
    if args.out_dir is None or args.out is not None or args.batch != 1:
        raise ValueError("--prompts writes one PNG per prompt into --out-dir DIR; pass --out-dir, and neither "
                         "--out nor --batch (repeat a line, with its own seed, for more images of a prompt)")
    args.batch_size = 1 if args.batch_size is None else args.batch_size
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_writable(args.out_dir, f"probe-{os.getpid()}", "--out-dir")


def check_writable(folder: Path, name: str, flag: str):
    """Fail now, not after minutes of sampling."""
    probe = folder / f"{name}.check"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {folder} ({err.strerror}); choose another {flag}") from None


def first_rank() -> bool:
    """Whether this process says what all say: the only one, or rank 0 under torchrun."""
    return int(os.environ.get("RANK", 0)) == 0


def native_bf16_flag() -> str | None:
    """The CPU flag that makes bf16 fast here (its maths in hardware), or None: then bf16 would be emulated."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split() for line in info if line.startswith("flags")), [])
    except OSError:  # not Linux: say nothing native, and keep fp32
        return None
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags and torch.backends.mkldnn.is_available()), None)


def pick_device(args):
    """The device, and the dtype the model runs in (the latent trajectory stays fp32, see sample_loop)."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"unknown --device {args.device!r}; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun rank
    if device.type == "cpu" and args.dtype == "fp16":
        raise ValueError("--dtype fp16 needs CUDA; on the CPU the model runs in bf16 or fp32")
    if args.dtype is None:
        flag = None if device.type == "cuda" else native_bf16_flag()
        cuda_default = "bf16" if args.longsd else "fp16"  # the release samples in bf16
        args.dtype = cuda_default if device.type == "cuda" else "bf16" if flag else "fp32"
        if flag and first_rank():
            print(f"precision: bf16, which this CPU computes natively ({flag}); --dtype fp32 for full precision")
    return device, DTYPES[args.dtype]


def weights_path(args) -> Path:
    if args.weights is not None:
        return args.weights
    if not DEFAULT_WEIGHTS.exists():
        raise WeightsError(
            f"no --weights given and the shipped default model is missing ({DEFAULT_WEIGHTS}). Download Stable "
            "Diffusion 1.5 (a diffusers folder, or v1-5-pruned-emaonly.safetensors) and pass --weights PATH.")
    if first_rank():
        print(MINI_WORLD_NOTE, file=sys.stderr)
    return DEFAULT_WEIGHTS


def choose_strategy(args, tokenizer, trained: str | None, prompts: list[str]) -> str:
    """'auto': the encoding the weights (or the LoRA) were fine-tuned with, if they say; otherwise the paper's segment
    encoding when a prompt is over 77 tokens and plain CLIP, as SD-1.5 was trained, when all fit. One strategy for
    all the prompts: a batch shares one context length."""
    if args.encoding != "auto":
        return args.encoding
    if trained is not None:
        return trained
    too_long = max(len(tokenizer.encode(text)) for text in (*prompts, args.negative)) > 75
    return "segment" if too_long else "truncate"


def dropped_tokens_fix(what: str, strategy: str, dropped: int, max_tokens: int) -> str:
    """What to do when a prompt does not fit the context (sample.py's wording of the encoder's warning)."""
    if strategy == "truncate":
        return (f"the {what}'s last {dropped} tokens do not fit plain CLIP's 77 and are ignored; "
                "pass --encoding segment to keep them")
    return (f"the {what}'s last {dropped} tokens do not fit the context of --max-tokens {max_tokens} and are ignored; "
            "pass a larger --max-tokens to keep them (longer than the model was trained with may sample worse), "
            "or shorten the prompt")


def load_model(args, weights: Path, device, dtype):
    """The pipeline in ``dtype`` on ``device`` with the --lora (or --longsd's LoRAs) merged into its UNet, and
    the encoding the LoRA was trained with when its file records it (train.py's do; others do not)."""
    pipe = load_pipeline(weights, dtype=dtype, device=device)
    if args.longsd is not None:  # the release's SFT list, then its reward list; or our stacked file
        merge_lora_files(pipe.unet, longsd_files(args.longsd)[1])
        return pipe, "segment"
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


def text_encoder_for(args, pipe: Pipeline, strategy: str, dtype):
    """LongAlign's segment encoder (§3); with --longsd the release's [CLIP | adapter(T5)] 480-row context,
    T5 in bf16 where fp16 was asked (it overflows in fp16)."""
    clip = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, args.max_tokens, strategy)
    if args.longsd is None:
        return clip
    device = next(pipe.unet.parameters()).device
    if dtype == torch.float16 and first_rank():
        print("note: T5 runs in bf16, not the fp16 asked for: its activations overflow fp16", file=sys.stderr)
    t5 = load_t5(args.t5, dtype=torch.bfloat16 if dtype == torch.float16 else dtype, device=device)
    adapter = load_adapter(longsd_files(args.longsd)[0], dtype=dtype, device=device)
    return CLIPT5Encoder(clip, load_t5_tokenizer(args.t5), t5, adapter)


class Setup(NamedTuple):
    pipe: Pipeline
    encoder: LongPromptEncoder | CLIPT5Encoder
    sampler: object  # a DDIM, DPM-Solver++ or UniPC sampler of model/diffusion.py
    settings: dict  # what decides the images besides prompt and seed (the PNG chunk and the manifest say it)


def prepare(args, prompts: list[str]) -> Setup:
    """Everything but the prompts: the weights' recommendations, the model, the image size and the encoding."""
    weights = weights_path(args)
    record = training_record(weights)
    fill_sampling_defaults(args, record, release=args.longsd is not None)
    device, dtype = pick_device(args)
    if device.type == "cpu":
        keep_freed_memory()  # every denoising step reuses the last one's activation memory
    pipe, lora_encoding = load_model(args, weights, device, dtype)
    for model in (pipe.unet, pipe.vae):  # NHWC convolutions, laid out after the dtype cast and the LoRA merge
        prefer_channels_last(model)
    height, width = args.height or pipe.default_size, args.width or pipe.default_size
    pipe.vae.latent_shape(1, height, width)  # refuses a size that is no multiple of the VAE's own downsample factor
    strategy = choose_strategy(args, pipe.tokenizer, lora_encoding or record.get("encoding"), prompts)
    settings = {"weights": weights.name, "lora": args.lora.name if args.lora else None, "negative": args.negative,
                "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "encoding": strategy,
                "max_tokens": args.max_tokens, "height": height, "width": width, "dtype": args.dtype,
                "longsd": args.longsd.name if args.longsd else None, "t5": args.t5.name if args.t5 else None}
    encoder = text_encoder_for(args, pipe, strategy, dtype)
    if args.compile:  # the weights are final now: on a CPU they are frozen into the graphs
        compile_for_sampling(pipe, text_encoder_modules(encoder), device)
    return Setup(pipe, encoder, make_sampler(args.sampler, args.steps, pipe.scheduler_config), settings)


def encode(encoder: LongPromptEncoder, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DroppedTokensWarning)  # sample.py says it in its own words, with the fix
        return encoder(prompts)


def seeded_noise(seed: int, shape) -> torch.Tensor:
    """Noise drawn on the CPU from the seed, as diffusers does, so the same seed gives the same image anywhere."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def generate(setup: Setup, cond, uncond, noise: torch.Tensor, progress: bool) -> list[Image.Image]:
    """Sample from ``noise`` and decode; a NaN or infinity anywhere in the images is an error, never a PNG."""
    pipe, s = setup.pipe, setup.settings
    latents = noise.to(device=cond.device, dtype=cond.dtype)
    latents = sample_loop(pipe.unet, setup.sampler, latents, cond, uncond, s["cfg"], progress=progress)
    with torch.no_grad():
        images = pipe.vae.decode(latents / pipe.vae.scaling_factor)
    if not torch.isfinite(images).all():
        raise ValueError(f"the decoded images hold NaN or infinite values, so nothing was written: the weights "
                         f"hold non-finite numbers, or CFG {s['cfg']} overflows in {s['dtype']}; check the weights, "
                         "lower --cfg, or pass --dtype fp32")
    return [Image.fromarray(np.ascontiguousarray(img)) for img in to_uint8(images).numpy()]


# ---- One prompt: --out (numbered with --batch) ----

def report_encoding(args, encoder: LongPromptEncoder, texts: dict[str, str], width: int):
    """Say how the (first) prompt was encoded and, for each text that does not fit, how to keep all of it."""
    plans = {what: encoder.plan(text) for what, text in texts.items()}
    plan = next(iter(plans.values()))
    print(f"encoding: {encoder.strategy}, {plan.segments} segments, {plan.tokens_used} tokens used"
          f"{f', {plan.tokens_dropped} dropped' if plan.tokens_dropped else ''}; "
          f"context {encoder.context_length} x {width}")
    print(f"sampling: {args.sampler}, {args.steps} steps, CFG {args.cfg}")
    for what, text_plan in plans.items():
        if text_plan.tokens_dropped:
            print(f"note: {dropped_tokens_fix(what, encoder.strategy, text_plan.tokens_dropped, args.max_tokens)}",
                  file=sys.stderr)


def sample_one_prompt(args):
    setup = prepare(args, [args.prompt])
    pipe, s = setup.pipe, setup.settings
    guided = args.cfg > 1  # as in diffusers, a scale <= 1 turns guidance off: no negative context at all
    texts = {"prompt": args.prompt, **({"negative prompt": args.negative} if guided else {})}
    report_encoding(args, setup.encoder, texts, pipe.text_encoder.hidden_size)
    cond = encode(setup.encoder, [args.prompt] * args.batch)
    uncond = encode(setup.encoder, [args.negative]) if guided else None
    noise = seeded_noise(args.seed, pipe.vae.latent_shape(args.batch, s["height"], s["width"]))
    images = generate(setup, cond, uncond, noise, progress=True)
    paths = [args.out] if args.batch == 1 else [
        args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}") for i in range(args.batch)]
    for image, path in zip(images, paths):
        write_png(path, image, args.prompt, args.seed, s)
        print(f"wrote {path}")


# ---- A prompt file: --prompts FILE --out-dir DIR, under torchrun too ----

def sample_batches(setup: Setup, args, batches: list[list[PromptItem]], done: set[str], rank: int):
    """Sample each batch that misses an image, and write the missing images with their manifest lines."""
    uncond = encode(setup.encoder, [args.negative]) if args.cfg > 1 else None
    shape = setup.pipe.vae.latent_shape(1, setup.settings["height"], setup.settings["width"])
    bar = tqdm(total=sum(map(len, batches)), initial=sum(item.file in done for b in batches for item in b),
               unit="image", desc=f"rank {rank}", disable=rank != 0)
    with bar, open(args.out_dir / RANK_MANIFEST.format(rank), "a", encoding="utf-8") as lines:
        # a batch with one image missing is sampled whole: other batch mates would round differently
        for batch in (b for b in batches if any(item.file not in done for item in b)):
            noise = torch.cat([seeded_noise(item.seed, shape) for item in batch])  # each image its own noise
            cond = encode(setup.encoder, [item.prompt for item in batch])
            for item, image in zip(batch, generate(setup, cond, uncond, noise, progress=False)):
                if item.file not in done:
                    append_line(lines, item, setup.settings)
                    write_png(args.out_dir / item.file, image, item.prompt, item.seed, setup.settings)
            bar.update(len(batch))


def report_prompt_file(args, encoder: LongPromptEncoder, items: list[PromptItem], width: int):
    """Say how the prompts are encoded and how many do not fit, in a few lines however many prompts there are."""
    print(f"encoding: {encoder.strategy} for {len(items)} prompts; context {encoder.context_length} x {width}")
    print(f"sampling: {args.sampler}, {args.steps} steps, CFG {args.cfg}, batches of {args.batch_size}")
    texts = [(f"prompt at index {item.index}", item.prompt) for item in items]
    texts += [("negative prompt", args.negative)] if args.cfg > 1 else []
    cut = [(what, plan.tokens_dropped) for what, text in texts if (plan := encoder.plan(text)).tokens_dropped]
    if cut:
        what, dropped = cut[0]
        fix = dropped_tokens_fix(what, encoder.strategy, dropped, args.max_tokens)
        print(f"note: {len(cut)} of {len(texts)} texts do not fit; e.g. {fix}", file=sys.stderr)


def sample_prompt_file(args):
    items = read_prompt_file(args.prompts, args.seed)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:  # gloo on any device: the ranks share no tensors, they only meet at the final barrier
        dist.init_process_group("gloo", timeout=FINAL_BARRIER_TIMEOUT)
    setup = prepare(args, [item.prompt for item in items])
    if rank == 0:
        report_prompt_file(args, setup.encoder, items, setup.pipe.text_encoder.hidden_size)
    done = images_on_disk(args.out_dir, items, setup.settings)
    sample_batches(setup, args, rank_batches(items, args.batch_size, rank, world), done, rank)
    if world > 1:
        dist.barrier()
    if rank == 0:
        print(f"{merge_manifest(args.out_dir)} images and {MANIFEST} in {args.out_dir}")
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        if args.prompts is None:
            sample_one_prompt(args)
        else:
            sample_prompt_file(args)
    except ValueError as err:  # bad input (WeightsError included): one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
