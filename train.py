"""Train LongAlign's two stages on Stable Diffusion 1.5.

    # Stage 1, supervised fine-tuning (LongAlign §3): ε-prediction MSE under segment-level encoding, UNet LoRA
    python train.py --stage sft --weights stable-diffusion-v1-5 --data captions.jsonl --out runs/sft

    # Stage 2, reward fine-tuning (LongAlign §4): merge the SFT LoRA, add a fresh one, ascend the ω-score
    python train.py --stage reward --weights stable-diffusion-v1-5 --sft-lora runs/sft/lora.safetensors \\
        --scorer Denscore --data prompts.txt --out runs/reward

    # either stage on 8 GPUs (the batch size is per GPU)
    torchrun --nproc_per_node=8 train.py --stage sft ...

The run folder (--out) gets metrics.jsonl (one JSON line per step), checkpoint.pt (written atomically;
--resume continues a run so that it gives the same losses as an uninterrupted one), previews in samples/,
and lora.safetensors (for sample.py --weights BASE --lora ...) or, with --full, unet/. --export DIR writes a
complete diffusers pipeline with the trained weights merged. The miniature trains its own CLIP and VAE with
`python -m mini.pretrain` (see mini/README.md) and its UNet with this script.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import data
from model import runtime
from model.diffusion import DDIMSampler, NoiseSchedule, denoising_loss, gradient_steps, rollout, sample_loop
from model.longtext import DroppedTokensWarning, LongPromptEncoder
from model.lora import (inject_lora, load_lora_state_dict, lora_state_dict, merge_and_unload, read_lora_file,
                        stack_loras)
from model.lora_formats import lora_metadata, save_lora_file
from model.preference import KINDS, Scorer, direction_path, load_direction
from model.record import TRAINING_RECORD_FILE
from model.scheduler import read_scheduler_config, scheduler_options
from model.speed import compile_for_training, prefer_channels_last, text_encoder_modules
from model.t5 import (ADAPTER_CONFIGS, CLIPT5Encoder, TextAdapter, load_adapter, load_t5, load_t5_tokenizer,
                      save_adapter)
from model.tokenizer import load_tokenizer
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel
from model.vae import posterior_sample
from model.weights import (load_text_encoder, load_unet, load_vae, save_text_encoder, save_unet_diffusers,
                           save_vae_diffusers, write_json, write_pipeline_files)

# The official runs: lr 3e-5 after 2000 warm-up steps, gradient clip 0.3; SFT 16 images × 2 accumulation per
# GPU, reward 8 prompts per GPU for about 3750 steps.
STAGE_DEFAULTS = {
    "sft": dict(steps=10_000, lr=3e-5, warmup=2000, grad_clip=0.3, batch_size=16, grad_accum=2),
    "reward": dict(steps=3750, lr=3e-5, warmup=2000, grad_clip=0.3, batch_size=8, grad_accum=1),
}
ENCODINGS = ("segment", "truncate")
SCORER_CROP = 504 / 512  # the official reward preprocessing crops 504 of 512 pixels before resizing


def by_stage(key: str) -> str:
    """The help text of a stage default, e.g. "default: 16 for sft, 8 for reward", or "default: 0.3"."""
    values = {stage: f"{defaults[key]:g}" for stage, defaults in STAGE_DEFAULTS.items()}
    if len(set(values.values())) == 1:
        return f"default: {values['sft']}"
    return "default: " + ", ".join(f"{value} for {stage}" for stage, value in values.items())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help="sft (stage 1) or reward (stage 2)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics, outputs, samples")
    p.add_argument("--data", required=True,
                   help="sft: a JSONL/CSV manifest with image (or path) and caption, an image folder with .txt "
                        "captions, or WebDataset tar shards (shards/train-{00000..00099}.tar, one .tar, or a folder "
                        "of them); reward: a prompt file (.txt one per line, or .jsonl); or the miniature's world "
                        "(see mini/README.md)")
    p.add_argument("--image-root", type=Path, help="sft: the folder relative image paths of a manifest resolve "
                                                   "against (default: the manifest's folder)")
    p.add_argument("--resolution", type=int, help="image side (default: 512, or the miniature world's 64)")

    g = p.add_argument_group("models")
    g.add_argument("--weights", type=Path, help="SD-1.5 diffusers folder or single-file checkpoint")
    g.add_argument("--unet", type=Path, help="take the UNet from here instead (e.g. a --full SFT run's unet/)")
    g.add_argument("--from-scratch", metavar="CONFIG", choices=list(UNET_CONFIGS),
                   help="sft --full: train a fresh UNet of this model/unet.py config instead of --weights' UNet")
    g.add_argument("--full", action="store_true", help="sft: train the whole UNet instead of a LoRA")
    g.add_argument("--lora-rank", type=int, default=32, help="default: %(default)s")
    g.add_argument("--lora-dropout", type=float, default=0.1,
                   help="dropout on the LoRA branch in training, as the release (default: %(default)s)")
    g.add_argument("--sft-lora", type=Path, help="reward: the SFT LoRA to merge into the UNet first")
    g.add_argument("--t5", type=Path, help="the released LongSD's path: a T5 encoder folder (google-t5/t5-large, "
                                           "with tokenizer.json) whose states, through the adapter, add 240 rows")
    g.add_argument("--adapter", type=Path, help="with --t5: the TextAdapter folder; sft: its initialisation "
                                                "(LaVi-Bridge's, default: fresh), reward: the SFT run's adapter/")

    g = p.add_argument_group("text")
    g.add_argument("--encoding", default="segment",
                   help="segment: LongAlign's segment-level encoding (§3); truncate: plain 77-token CLIP, the "
                        "baseline (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=240, help="context rows of the segment encoding (default: 240)")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="sft: share of captions replaced by '' "
                                                                      "(default: %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps; " + by_stage("steps"))
    g.add_argument("--batch-size", type=int, help="images or prompts per GPU per micro-batch; " + by_stage("batch_size"))
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step; " + by_stage("grad_accum"))
    g.add_argument("--lr", type=float, help=by_stage("lr"))
    g.add_argument("--warmup", type=int, help="linear warm-up steps, then constant; " + by_stage("warmup"))
    g.add_argument("--decay-from", type=int, help="from this step the learning rate falls linearly to zero at "
                                                  "--steps (default: no decay)")
    g.add_argument("--grad-clip", type=float, help=by_stage("grad_clip"))
    g.add_argument("--weight-decay", type=float, default=1e-2, help="default: %(default)s")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="default: 0.9 0.999")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="default: %(default)s")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trained weights; the outputs then "
                                                          "hold the EMA weights (default: 0, off)")
    g.add_argument("--precision", choices=["auto", *runtime.PRECISIONS], default="auto",
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU (bf16 works there too, fp16 needs CUDA); "
                        "trained weights always stay fp32")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute UNet (and, for reward, VAE) blocks in backward to save memory (default: on "
                        "for reward, whose 512² VAE decode with gradient needs it; off for sft)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (the reward rollout's too) and "
                   "the text encoders: a one-off compile of minutes on a CPU, worth it for long runs")
    g.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--device", help="default: the GPU of this rank, else cpu")

    g = p.add_argument_group("reward stage")
    g.add_argument("--scorer", type=Path, help="the preference scorer (any CLIP layout model/weights.py reads)")
    g.add_argument("--scorer-kind", choices=list(KINDS), help="default: inferred from the scorer path")
    g.add_argument("--direction", type=Path, help="the common direction V (score.py --fit-direction); default: "
                                                  "direction.safetensors beside the scorer as score.py finds it, "
                                                  "else the batch's mean text embedding, over all ranks")
    g.add_argument("--omega", type=float, default=0.3, help="weight ω of the text-irrelevant part (default: 0.3)")
    g.add_argument("--rollout-steps", type=int, default=50, help="DDIM steps per rollout, trailing (default: 50)")
    g.add_argument("--grad-stride", type=int, default=10,
                   help="gradient flows at steps[offset::stride], offset random per batch (default: 10, so 5 of 50)")
    g.add_argument("--cfg", type=float, default=7.5, help="guidance of rollouts and previews (default: 7.5)")
    g.add_argument("--scorer-crop", type=int, help="random crop side before the scorer's resize "
                                                   "(default: 504/512 of the resolution, as officially)")

    g = p.add_argument_group("output")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint and outputs every N steps (default: 500)")
    g.add_argument("--sample-every", type=int, default=500, help="preview grid every N steps, 0: never (default: 500)")
    g.add_argument("--val-prompts", type=Path, help="prompt file for the previews (default: from the data)")
    g.add_argument("--num-val", type=int, default=4, help="images per preview grid (default: 4)")
    g.add_argument("--val-steps", type=int, default=25, help="DDIM steps of the previews (default: 25)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when there is one")
    g.add_argument("--export", type=Path, metavar="DIR", help="write a diffusers pipeline with the UNet merged")
    args = p.parse_args(argv)
    if args.stage in ("clip", "vae"):
        p.error(f"the miniature's {args.stage} stage moved: run python -m mini.pretrain --stage {args.stage} ...")
    if args.stage not in STAGE_DEFAULTS:
        p.error(f"--stage must be sft or reward, got {args.stage!r}")
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.resolution = args.resolution or data.default_resolution(args.data)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.stage == "reward"
    return args


def check_args(args) -> None:
    """Refuse bad settings before anything is loaded, with a message that names the fix (ValueError)."""
    data.check_resolution(args.resolution)
    for name in ("steps", "batch_size", "grad_accum", "lora_rank", "rollout_steps", "grad_stride", "num_val",
                 "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name, smallest in (("lr", 0.0), ("grad_clip", 0.0), ("adam_eps", 0.0), ("weight_decay", None), ("cfg", None)):
        value = getattr(args, name)  # NaN fails both comparisons, so it is refused too
        if not (math.isfinite(value) and (value > smallest if smallest is not None else value >= 0)):
            bound = "positive" if smallest is not None else "at least 0"
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, {bound}; got {value}")
    if args.encoding not in ENCODINGS:
        raise ValueError(f"--encoding {args.encoding} is not known; use --encoding segment (LongAlign §3; "
                         "'concat' was its old name) or --encoding truncate")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ValueError(f"--caption-dropout must be in [0, 1], got {args.caption_dropout}")
    if not 0.0 <= args.ema < 1.0:
        raise ValueError(f"--ema must be a decay in [0, 1), got {args.ema}")
    if args.decay_from is not None and not 0 <= args.decay_from < args.steps:
        raise ValueError(f"--decay-from must be a step in [0, --steps={args.steps}), got {args.decay_from}")
    if args.weights is None:
        raise ValueError(f"--stage {args.stage} needs --weights: an SD-1.5 diffusers folder or single-file "
                         "checkpoint (or the miniature's weights/mini)")
    if args.stage == "reward" and args.scorer is None:
        raise ValueError("--stage reward needs --scorer: a CLIP preference scorer (PickScore_v1, HPSv2, "
                         "Denscore, CLIP-H, or the miniature's weights/mini/scorer)")
    if args.stage == "reward" and (args.full or args.from_scratch):
        raise ValueError("the reward stage always trains a fresh LoRA on the (merged) SFT UNet; drop --full "
                         "and --from-scratch")
    if args.from_scratch and not args.full:
        raise ValueError("--from-scratch trains a new UNet, which needs --full (a LoRA on random weights "
                         "would learn nothing useful)")
    if args.stage == "reward" and args.t5 and not args.adapter:
        raise ValueError("--stage reward with --t5 needs --adapter: the adapter/ folder the SFT run wrote")
    if args.adapter and not args.t5:
        raise ValueError("--adapter belongs to the T5 path; pass --t5 T5_FOLDER too, or drop --adapter")
    if not 0.0 <= args.omega <= 1.0:  # also refuses NaN
        raise ValueError(f"--omega must be in [0, 1] (0: text-relevant part only, 1: the original score), "
                         f"got {args.omega}")
    if args.scorer_crop is not None and not 0 < args.scorer_crop <= args.resolution:
        raise ValueError(f"--scorer-crop must be in 1..{args.resolution}, got {args.scorer_crop}")
    runtime.refuse_overwrite(args.out, args.resume)


def load_unet_to_train(args, env: runtime.Env, text_encoder, vae):
    """The UNet with what this stage trains, and for reward the SFT LoRA it was merged with (or None).

    - sft: a LoRA on --weights' UNet (the base frozen in the autocast dtype, the LoRA fp32), or with --full
      the whole UNet in fp32 (optionally fresh from --from-scratch, sized for this text encoder and VAE);
    - reward: the SFT LoRA merged in fp32 (so the merge is exact), then a fresh LoRA (LongAlign §4).
    """
    if args.from_scratch:
        cfg = dataclasses.replace(UNET_CONFIGS[args.from_scratch], cross_attention_dim=text_encoder.hidden_size,
                                  in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
                                  sample_size=args.resolution // vae.downsample_factor)
        unet = UNet2DConditionModel(cfg).to(env.device)
    else:
        unet = load_unet(args.unet or args.weights, device=env.device)
    sft_lora = None
    if args.sft_lora:
        sft_lora = read_lora_file(args.sft_lora, unet).state
        load_lora_state_dict(unet, sft_lora, source=str(args.sft_lora))
        merge_and_unload(unet)
    if args.full:
        unet.requires_grad_(True)  # fp32 master weights; autocast runs the forward in half precision
    else:
        unet.to(dtype=env.half)  # the base only: inject_lora's new weights stay fp32 (model/lora.py)
        inject_lora(unet, args.lora_rank, dropout=args.lora_dropout)  # freezes the base
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.stage == "reward":
            vae.enable_gradient_checkpointing()
    return prefer_channels_last(unet).train(), sft_lora  # after the LoRA's own convs exist


def load_text_side(args, env: runtime.Env, text_encoder):
    """The context encoder: LongAlign's segment encoding (§3), and with --t5 the release's 480-row
    [CLIP | adapter(T5)] context. Returns it and the adapter (None without --t5), trained in SFT only."""
    # Truncation is the point of the baseline, and a warning per long caption per step would bury the log.
    warnings.simplefilter("ignore", DroppedTokensWarning)
    encoder = LongPromptEncoder(load_tokenizer(args.weights), text_encoder, args.max_tokens, args.encoding)
    if not args.t5:
        return encoder, None
    if env.half == torch.float16:
        raise ValueError("--precision fp16 with --t5: T5 overflows in fp16; use --precision bf16 (the release's)")
    t5 = load_t5(args.t5, dtype=env.half, device=env.device).requires_grad_(False)
    if args.adapter:
        adapter = load_adapter(args.adapter, device=env.device)
    else:  # a fresh adapter from T5's width to the UNet's context width; the release's sizes at full size
        adapter = TextAdapter(dataclasses.replace(ADAPTER_CONFIGS["longsd"], in_dim=t5.config.d_model,
                                                  out_dim=text_encoder.hidden_size)).to(env.device)
    adapter.train(args.stage == "sft").requires_grad_(args.stage == "sft")  # SFT trains it, dropout active
    return CLIPT5Encoder(encoder, load_t5_tokenizer(args.t5), t5, adapter), adapter


def sft_loss(unet, vae, encoder, schedule: NoiseSchedule, batch: dict, generator, env: runtime.Env):
    """Stage 1: DDPM's ε-prediction MSE on z = scaling · (a VAE posterior sample) of each image, with c the
    segment-level context of its caption through the frozen text encoder (LongAlign §3).
    Every random draw is made for the global batch, so N ranks compute what one process would.
    """
    images = batch["image"].to(env.device)
    shape = vae.latent_shape(len(images), images.shape[-2], images.shape[-1])
    posterior_noise, noise = runtime.global_randn(generator, shape, env), runtime.global_randn(generator, shape, env)
    timesteps = runtime.global_randint(generator, schedule.num_train_timesteps, len(images), env)
    with torch.no_grad():
        mean, logvar = vae.encode(images.to(next(vae.parameters()).dtype))
        latents = posterior_sample(mean, logvar, posterior_noise) * vae.scaling_factor
    context = encoder(batch["caption"])  # with graph: the T5 path's adapter trains in SFT
    return denoising_loss(unet, schedule, latents, context, noise, timesteps), {}


def reward_loss(unet, vae, encoder, scorer: Scorer, direction, batch: dict, args, generator, env: runtime.Env):
    """Stage 2: 0.5 · (1 − score_ω) of the UNet's own DDIM rollouts (LongAlign §4).

    A 50-step trailing DDIM rollout with CFG from pure noise, gradient only at steps[offset::stride]; the last
    x0-prediction decoded with gradient; one random crop, resized for the scorer; the ω-reweighted
    segment-level score of each image against its prompt (the score-projection kernel on CUDA).
    """
    prompts = batch["caption"]
    offset = int(torch.randint(min(args.grad_stride, args.rollout_steps), (), generator=generator))
    noise = runtime.global_randn(generator, vae.latent_shape(len(prompts), args.resolution, args.resolution), env)
    with torch.no_grad():
        cond, uncond = encoder(prompts), encoder([""])
    sampler = DDIMSampler(NoiseSchedule(), args.rollout_steps, spacing="trailing")
    x0 = rollout(unet, sampler, noise, cond, uncond, args.cfg, gradient_steps(args.rollout_steps, args.grad_stride,
                                                                             offset))
    images = vae.decode((x0 / vae.scaling_factor).to(next(vae.parameters()).dtype))
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    crop = args.scorer_crop or round(args.resolution * SCORER_CROP)
    parts = scorer.score(images, prompts, direction, args.omega, random_crop=crop, generator=generator)
    logs = {name: getattr(parts, name).mean() for name in ("score", "original", "relevant", "irrelevant", "eta")}
    return 0.5 * (1.0 - parts.score.mean()), logs


@torch.no_grad()
def save_preview(trained, unet, vae, encoder, prompts: list[str], args, env: runtime.Env, path: Path) -> None:
    """Fixed prompts, a fixed seed and sample.py's DDIM, so grids from different steps compare; ``trained``
    (the UNet, or the UNet and the adapter) samples in eval mode, without dropout."""
    shape = vae.latent_shape(len(prompts), args.resolution, args.resolution)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(env.device)
    trained.eval()
    with env.autocast():
        latents = sample_loop(unet, DDIMSampler(NoiseSchedule(), args.val_steps), noise, encoder(prompts),
                              encoder([""]), args.cfg, progress=False)
        images = vae.decode((latents / vae.scaling_factor).to(next(vae.parameters()).dtype))
    trained.train()
    runtime.save_image_grid([images], path)


def trained_lora(unet, sft_lora: dict | None) -> dict:
    """The LoRA for the ORIGINAL base: for reward, the SFT and reward LoRAs stacked into one file."""
    state = lora_state_dict(unet)
    return stack_loras(sft_lora, state) if sft_lora is not None else state


def save_outputs(unet, adapter, args, sft_lora: dict | None) -> None:
    """lora.safetensors (and, for reward, lora_reward.safetensors alone), or unet/ with --full; with --t5 also
    adapter/ in the release's folder layout, so the run folder is what ``sample.py --longsd`` reads.

    The LoRA files use the kohya key names that A1111, ComfyUI and diffusers' load_lora_weights read, and
    record in their metadata how they were trained, so sample.py encodes prompts the same way.
    """
    if adapter is not None:
        save_adapter(adapter, args.out / "adapter")
    if args.full:
        save_unet_diffusers(unet, args.out / "unet")
        return
    metadata = lora_metadata(Path(args.weights).name, args.encoding, args.max_tokens, args.stage, t5=bool(args.t5))
    if sft_lora is not None:
        save_lora_file(lora_state_dict(unet), args.out / "lora_reward.safetensors", metadata)
    save_lora_file(trained_lora(unet, sft_lora), args.out / "lora.safetensors", metadata)


def export_pipeline(unet, adapter, args, sft_lora: dict | None, folder: Path) -> None:
    """A complete diffusers pipeline folder, with the trained UNet merged into a fresh fp32 copy of the base
    (not into the possibly bf16 training copy); with --t5 plus adapter/ (``sample.py --weights DIR --longsd
    DIR --t5 T5`` reads it)."""
    if adapter is not None:
        save_adapter(adapter, folder / "adapter")
    if args.full:
        save_unet_diffusers(unet, folder / "unet")
    else:
        merged = load_unet(args.unet or args.weights)
        load_lora_state_dict(merged, trained_lora(unet, sft_lora), source="the trained LoRA")
        save_unet_diffusers(merge_and_unload(merged), folder / "unet")
    save_vae_diffusers(load_vae(args.weights), folder / "vae")
    save_text_encoder(load_text_encoder(args.weights).text_model, folder / "text_encoder")
    load_tokenizer(args.weights).save_pretrained(folder / "tokenizer")
    write_pipeline_files(folder)
    write_json(folder / TRAINING_RECORD_FILE, {"encoding": args.encoding, "max_tokens": args.max_tokens,
                                          "t5": args.t5 is not None})


def main(argv=None) -> list[dict]:
    """Run one stage; returns this run's metric records (also in OUT/metrics.jsonl)."""
    args = parse_args(argv)
    try:
        check_args(args)
        env = runtime.setup_env(args.device, args.precision)
        # both losses assume SD-1.5's ε-prediction and noise schedule: refuse weights whose scheduler says otherwise
        scheduler_options("ddim", read_scheduler_config(args.weights))
        runtime.seed_everything(args.seed)  # the same initial weights on every rank
        if args.stage == "sft":
            dataset = data.image_dataset(args.data, args.resolution, args.caption_dropout, args.seed,
                                         image_root=args.image_root)
        else:
            dataset = data.prompt_dataset(args.data)
        runtime.check_dataset_size(dataset, args.batch_size, env)
        val_prompts = (data.PromptDataset(args.val_prompts).prompts[:args.num_val] if args.val_prompts
                       else data.validation_prompts(args.data, dataset, args.num_val))

        # The frozen parts: text encoder and VAE in the autocast dtype (and T5), the scorer for reward.
        text_encoder = load_text_encoder(args.weights, dtype=env.half, device=env.device).eval().requires_grad_(False)
        vae = prefer_channels_last(load_vae(args.weights, dtype=env.half, device=env.device)).requires_grad_(False)
        unet, sft_lora = load_unet_to_train(args, env, text_encoder, vae)
        encoder, adapter = load_text_side(args, env, text_encoder)
        if args.compile:  # after LoRA injection, checkpointing and .to(device): the graphs see the final models
            compile_for_training(unet, text_encoder_modules(encoder))
        scorer, direction = None, None
        if args.stage == "reward":
            scorer = Scorer.load(args.scorer, kind=args.scorer_kind, dtype=env.half, device=env.device)
            # the same rule as score.py: --direction, else direction.safetensors beside the scorer, else the batch
            direction_file = direction_path(args.direction, args.scorer)
            direction = load_direction(direction_file, scorer.embed_dim) if direction_file else None
            if env.main:
                print(f"common direction V: {direction_file or 'the mean of each batch of prompts, over all ranks'}")

        signature = {"stage": args.stage, "data": str(args.data), "seed": args.seed, "grad_accum": args.grad_accum,
                     "global_batch": args.batch_size * env.world, "full": args.full, "lora_rank": args.lora_rank,
                     "t5": args.t5 is not None}
        signature.update(data.data_order(dataset, args.batch_size, args.workers, env.world))  # shards: their split
        trained = nn.ModuleDict({"unet": unet, "adapter": adapter}) if args.stage == "sft" and adapter else unet
        state = runtime.start_training(trained, args, signature, env)
    except ValueError as err:  # bad input (WeightsError included): one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if env.main:
        print(f"{args.stage}: {sum(p.numel() for p in state.params):,} trained parameters, {len(dataset):,} "
              f"examples, {env.world} × {args.batch_size} × {args.grad_accum} per step, {env.device}, "
              f"{env.half or torch.float32}")
        if args.warmup > args.steps:  # the official 2000 warm-up steps would leave a short run at a tiny rate
            last = args.lr * runtime.learning_rate_factor(args.steps - 1, args.warmup, args.decay_from, args.steps)
            print(f"note: --warmup {args.warmup} is longer than --steps {args.steps}, so the learning rate ends at "
                  f"{last:.3g}, not --lr {args.lr:g}; pass a smaller --warmup to reach it", file=sys.stderr)

    schedule, records, stop = NoiseSchedule(), [], runtime.StopRequest()
    batches = runtime.endless_batches(dataset, state.position, args.batch_size, args.seed, args.workers, env)
    bar = tqdm(total=args.steps, initial=state.step, desc=args.stage, disable=not env.main)
    with runtime.guarded_loop(args.out, stop, bar, env):
        while state.step < args.steps:
            started, logged = time.time(), {}
            for _ in range(args.grad_accum):  # accumulate micro-batches
                batch = next(batches)
                with env.autocast():
                    if args.stage == "sft":
                        loss, logs = sft_loss(unet, vae, encoder, schedule, batch, state.generator, env)
                    else:
                        loss, logs = reward_loss(unet, vae, encoder, scorer, direction, batch, args,
                                                 state.generator, env)
                runtime.backward(state, loss, logs, logged, args.grad_accum, env)  # refuses a NaN loss
            # all-reduce over ranks, clip, step, schedule, EMA
            logged.update(runtime.optimizer_step(state, args.grad_clip, args.ema, env))
            records.append(runtime.log_step(state, logged, time.time() - started, args.out, bar, env))
            stop_now = stop.agreed(env)
            if env.main and args.sample_every and state.step % args.sample_every == 0:
                with runtime.ema_weights(state):
                    save_preview(trained, unet, vae, encoder, val_prompts, args, env,
                                 args.out / "samples" / f"step_{state.step:06d}.png")
            if env.main and (state.step % args.save_every == 0 or state.step == args.steps or stop_now):
                with runtime.ema_weights(state):
                    save_outputs(unet, adapter, args, sft_lora)
                runtime.save_checkpoint(state, args.out)
            stop.exit_if(stop_now, state.step, env)
        if args.export and env.main:
            with runtime.ema_weights(state):
                export_pipeline(unet, adapter, args, sft_lora, args.export)
            print(f"exported to {args.export}")
    return records


if __name__ == "__main__":
    main()
