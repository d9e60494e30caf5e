"""Peak memory of one LongAlign reward step (§4) at 512², on random full-size weights.

    python bench/reward_memory.py                        # CUDA: SD-1.5 + LoRA r32, ViT-H/14 scorer, bf16
    python bench/reward_memory.py --device cpu --small   # test-size models at 64², on the CPU

One step is what train.py's reward stage does per micro-batch, then the optimizer step: a 50-step trailing DDIM
rollout with CFG from pure noise, gradient at K = 5 of its steps (steps[0::10]); the last x0-prediction decoded
by the VAE with gradient; one random 504/512 crop resized for the scorer; 0.5·(1 − score_ω) of the
ω-reweighted segment-level score (ω = 0.3); backward into the LoRA; clipping and AdamW. The frozen UNet base,
VAE, text encoder and scorer are bf16, the LoRA fp32 under bf16 autocast, with gradient checkpointing of the
UNet and the VAE (train.py's default for this stage).

On CUDA the figure is ``torch.cuda.max_memory_allocated`` during the step, with the weights already resident;
with two batch sizes (``--batches 1 2``) it also gives the cost of each further sample. On the CPU there is no
such counter: the process's peak resident set is reported instead, imports and weights included.
"""
import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: find model/

from model.clip import CONFIGS as CLIP_CONFIGS, CLIPModel, CLIPTextModel  # noqa: E402
from model.diffusion import DDIMSampler, NoiseSchedule, gradient_steps, rollout  # noqa: E402
from model.longtext import LongPromptEncoder  # noqa: E402
from model.lora import inject_lora, lora_parameters  # noqa: E402
from model.preference import KINDS, Scorer  # noqa: E402
from model.tokenizer import CLIPTokenizer  # noqa: E402
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel  # noqa: E402
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CFG_SCALE, OMEGA, SCORER_CROP = 7.5, 0.3, 504 / 512  # the paper's and the release's reward settings
PROMPT = ("A red fox sits on a mossy log at the edge of a pine forest. Morning fog drifts between the trunks. "
          "A small wooden cabin with a smoking chimney stands behind it. Yellow wildflowers grow along a narrow "
          "path. Snow-capped mountains rise in the distance under a pale blue sky.")


class Models(NamedTuple):
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    encoder: LongPromptEncoder
    scorer: Scorer
    device: torch.device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="test-size models at 64², 5 steps (K = 5 still)")
    parser.add_argument("--batches", type=int, nargs="+", help="prompts per step, one step each (default: 1 2, "
                                                               "or 1 with --small)")
    parser.add_argument("--precision", choices=DTYPES, default="bf16", help="default: %(default)s")
    parser.add_argument("--lora-rank", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute UNet and VAE blocks in backward (default: on, as train.py's reward stage)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and torch sees none; use --device cpu --small on a CPU")
    args.batches = args.batches or ([1] if args.small else [1, 2])
    args.resolution, args.rollout_steps, args.grad_stride = (64, 5, 1) if args.small else (512, 50, 10)
    return args


def build_models(args) -> Models:
    """Random weights at full size (or the test configs), frozen in the working dtype, a fresh LoRA on the UNet."""
    size, dtype, device = "test" if args.small else "sd15", DTYPES[args.precision], torch.device(args.device)
    clip_text = CLIP_CONFIGS["test" if args.small else "vit-l-14"].text
    torch.manual_seed(0)
    with device:  # initialising a billion parameters is much faster on a GPU
        text_encoder = CLIPTextModel(clip_text)
        unet = UNet2DConditionModel(dataclasses.replace(UNET_CONFIGS[size], cross_attention_dim=clip_text.width))
        vae = AutoencoderKL(VAE_CONFIGS[size])
        scorer_model = CLIPModel(CLIP_CONFIGS["test" if args.small else "vit-h-14"])
    text_encoder = text_encoder.to(dtype).eval().requires_grad_(False)
    vae = vae.to(dtype).eval().requires_grad_(False)
    unet.to(dtype=dtype)  # the base only: the LoRA that inject_lora adds stays fp32
    inject_lora(unet, args.lora_rank, dropout=0.1)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    encoder = LongPromptEncoder(CLIPTokenizer(), text_encoder, max_tokens=240, strategy="segment")
    return Models(unet.train(), vae, encoder, Scorer(scorer_model.to(dtype), KINDS["clip"]), device)


def reward_loss(models: Models, prompts: list[str], args, generator: torch.Generator) -> torch.Tensor:
    """0.5 · (1 − score_ω) of the UNet's own rollouts with CFG, gradient at steps[0::stride] (LongAlign §4)."""
    unet, vae = models.unet, models.vae
    noise = torch.randn(vae.latent_shape(len(prompts), args.resolution, args.resolution), generator=generator)
    with torch.no_grad():
        cond, uncond = models.encoder(prompts), models.encoder([""])
    sampler = DDIMSampler(NoiseSchedule(), args.rollout_steps, spacing="trailing")
    with_grad = gradient_steps(args.rollout_steps, args.grad_stride, 0)
    x0 = rollout(unet, sampler, noise.to(models.device), cond, uncond, CFG_SCALE, with_grad)
    pixels = (vae.decode((x0 / vae.scaling_factor).to(DTYPES[args.precision])).float() / 2 + 0.5).clamp(0, 1)
    crop = round(args.resolution * SCORER_CROP)
    return 0.5 * (1.0 - models.scorer.score(pixels, prompts, None, OMEGA, random_crop=crop,
                                            generator=generator).score.mean())


def one_step(models: Models, optimizer: torch.optim.Optimizer, batch: int, args) -> dict[str, float]:
    """Run one reward step of ``batch`` prompts; its seconds and memory figures (GB)."""
    on_gpu = models.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if on_gpu else 0
    start = time.perf_counter()
    with torch.autocast(models.device.type, dtype=DTYPES[args.precision], enabled=args.precision != "fp32"):
        loss = reward_loss(models, [PROMPT] * batch, args, torch.Generator().manual_seed(batch))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora_parameters(models.unet), 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the reward loss is {loss.item()} at batch {batch}; the step is broken")
    if on_gpu:
        torch.cuda.synchronize()
        return {"step s": time.perf_counter() - start, "resident GB": resident / 1e9,
                "peak GB": torch.cuda.max_memory_allocated() / 1e9,
                "reserved GB": torch.cuda.max_memory_reserved() / 1e9}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes
    return {"step s": time.perf_counter() - start, "peak RSS GB": rss / 1e9}


def report(args, models: Models, steps: dict[int, dict[str, float]]) -> None:
    machine = torch.cuda.get_device_name() if models.device.type == "cuda" else "CPU"
    trained = sum(p.numel() for p in lora_parameters(models.unet))
    print(f"reward step: {'test-size models' if args.small else 'SD-1.5 + ViT-H/14 scorer'}, "
          f"{args.resolution}², {args.precision}, LoRA r{args.lora_rank} ({trained:,} parameters), "
          f"K = {len(gradient_steps(args.rollout_steps, args.grad_stride, 0))} gradient steps of "
          f"{args.rollout_steps} trailing DDIM, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
          f"; {machine}, torch {torch.__version__}")
    columns = list(next(iter(steps.values())))
    print(f"{'batch':>5} " + " ".join(f"{name:>12}" for name in columns))
    for batch, figures in steps.items():
        print(f"{batch:>5} " + " ".join(f"{figures[name]:>12.3f}" for name in columns))
    first = min(steps)
    if models.device.type != "cuda":
        print(f"summary: reward step peak n/a on CPU (no allocator counter); process peak RSS "
              f"{steps[first]['peak RSS GB']:.2f} GB at batch {first}, {steps[first]['step s']:.1f} s")
        return
    line = f"summary: reward step peak {steps[first]['peak GB']:.2f} GB at batch {first}"
    if len(steps) > 1:
        last = max(steps)
        extra = (steps[last]["peak GB"] - steps[first]["peak GB"]) / (last - first)
        line += f", +{extra:.2f} GB per further sample"
    print(line + f", {steps[first]['step s']:.1f} s per step at batch {first}")


def main(argv=None) -> None:
    args = parse_args(argv)
    models = build_models(args)
    optimizer = torch.optim.AdamW(lora_parameters(models.unet), lr=1e-6)
    steps = {batch: one_step(models, optimizer, batch, args) for batch in args.batches}
    report(args, models, steps)


if __name__ == "__main__":
    main()
