"""Train LongAlign's two stages on Stable Diffusion 1.5, and the models of the miniature (FACTS.md §1).

    # Stage 1, supervised fine-tuning: ε-prediction MSE under segment-level encoding, UNet LoRA rank 32
    python train.py --stage sft --weights stable-diffusion-v1-5 --data captions.jsonl --out runs/sft

    # Stage 2, reward fine-tuning: merge the SFT LoRA, add a fresh one, ascend the ω-reweighted score
    python train.py --stage reward --weights stable-diffusion-v1-5 --sft-lora runs/sft/lora.safetensors \\
        --scorer Denscore --data prompts.txt --out runs/reward

    # either stage on 8 GPUs (the batch size is per GPU)
    torchrun --nproc_per_node=8 train.py --stage sft ...

    # the miniature (issue 7) on a CPU: scorer + text encoder, VAE, UNet from scratch, then reward
    python train.py --stage clip --data shapes --out runs/mini-clip --export weights/mini
    python train.py --stage vae --data shapes --out runs/mini-vae --export weights/mini
    python train.py --stage sft --data shapes --weights weights/mini --from-scratch tiny --full \\
        --lr 1e-3 --warmup 200 --out runs/mini-sft --export weights/mini
    python train.py --stage reward --data shapes --weights weights/mini --scorer weights/mini/scorer \\
        --rollout-steps 20 --grad-stride 4 --out runs/mini-reward

Every run folder (--out) gets metrics.jsonl (one JSON line per step) and checkpoint.pt (written atomically;
--resume continues a run so that it gives the same losses as an uninterrupted one), plus per stage:
    sft, reward   lora.safetensors (for sample.py --weights BASE --lora ...), or unet/ with --full;
                  samples/step_NNNNNN.png; --export DIR writes a complete diffusers pipeline, LoRA merged
    clip          scorer/ (transformers CLIPModel + direction.safetensors), text_encoder/, tokenizer/
    vae           vae/ (diffusers AutoencoderKL, scaling_factor fitted to its latents), samples/
With --export DIR, clip and vae write those same folders into DIR, to assemble a pipeline folder.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from model.clip import CONFIGS as CLIP_CONFIGS, CLIPModel, preprocess_tensor
from model.diffusion import DDIMSampler, NoiseSchedule, guided_eps, sample_loop
from model.kernels import score_projection
from model.longtext import LongPromptEncoder, sentence_segments
from model.lora import inject_lora, load_lora_state_dict, lora_state_dict, merge_and_unload
from model.preference import KINDS, Scorer, batch_direction, fit_direction, load_direction, save_direction
from model.tokenizer import CLIPTokenizer, frame
from model.unet import CONFIGS as UNET_CONFIGS, UNet2DConditionModel
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL
from model.weights import (load_text_encoder, load_unet, load_vae, read_state_dict, save_clip_model,
                           save_state_dict, save_text_encoder, save_unet_diffusers, save_vae_diffusers,
                           write_json, write_pipeline_files)

STAGES = ("sft", "reward", "clip", "vae")
# Defaults that differ by stage. sft and reward follow the official run (FACTS.md §1: lr 3e-5, 2000 warm-up
# steps, clip 0.3, 16 × 2 accumulation per GPU for SFT, 8 per GPU and about 3750 steps for reward). clip and
# vae are the miniature's, sized for a CPU.
STAGE_DEFAULTS = {
    "sft": dict(steps=10_000, lr=3e-5, warmup=2000, grad_clip=0.3, batch_size=16, grad_accum=2),
    "reward": dict(steps=3750, lr=3e-5, warmup=2000, grad_clip=0.3, batch_size=8, grad_accum=1),
    "clip": dict(steps=3000, lr=5e-4, warmup=200, grad_clip=1.0, batch_size=64, grad_accum=1),
    "vae": dict(steps=3000, lr=1e-3, warmup=200, grad_clip=1.0, batch_size=32, grad_accum=1),
}
SCORER_CROP = 504 / 512  # the official reward preprocessing crops 504 of 512 pixels before resizing
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics, outputs, samples")
    p.add_argument("--data", required=True,
                   help="a JSONL manifest or an image folder with .txt captions (sft, clip, vae), a prompt file "
                        "(.txt one per line, or .jsonl; reward), or 'shapes': the miniature's world, made on the fly")
    p.add_argument("--shapes-count", type=int, default=100_000, help="training scenes of --data shapes")
    p.add_argument("--resolution", type=int, default=None, help="image side (default 512; 64 for shapes)")

    g = p.add_argument_group("models")
    g.add_argument("--weights", type=Path, help="SD-1.5 diffusers folder or single-file checkpoint (sft, reward)")
    g.add_argument("--unet", type=Path, help="take the UNet from here instead (e.g. a --full SFT run's unet/)")
    g.add_argument("--from-scratch", metavar="CONFIG",
                   help="create the trained model fresh from this config in model/unet.py, model/clip.py or "
                        "model/vae.py (clip and vae stages: default 'tiny'; sft: needs --full)")
    g.add_argument("--full", action="store_true", help="sft: train the whole UNet instead of a LoRA")
    g.add_argument("--lora-rank", type=int, default=32)
    g.add_argument("--sft-lora", type=Path, help="reward: the SFT LoRA to merge into the UNet first")

    g = p.add_argument_group("text")
    g.add_argument("--encoding", choices=["concat", "truncate"], default="concat",
                   help="concat: LongAlign's segment-level encoding; truncate: plain 77-token CLIP (baseline)")
    g.add_argument("--max-tokens", type=int, default=240, help="context length of the concat encoding")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="sft: share of captions replaced by ''")

    g = p.add_argument_group("optimisation (defaults depend on --stage, see STAGE_DEFAULTS)")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--batch-size", type=int, help="images or prompts per GPU per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int, help="linear warm-up steps, then a constant learning rate")
    g.add_argument("--decay-from", type=int, help="from this step the learning rate falls linearly to zero at "
                                                  "--steps (default: no decay, constant to the end)")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trained weights (0: off); the "
                                                          "outputs then hold the EMA weights")
    g.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU; trained weights always stay fp32")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute UNet (and, for reward, VAE) blocks in backward to save memory (default: on "
                        "for reward, whose 512² VAE decode with gradient needs it; off otherwise)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--device", help="default: the GPU of this rank, else cpu")

    g = p.add_argument_group("reward stage")
    g.add_argument("--scorer", type=Path, help="the preference scorer (any CLIP layout model/weights.py reads)")
    g.add_argument("--scorer-kind", choices=list(KINDS), help="default: inferred from the scorer path")
    g.add_argument("--direction", type=Path, help="the common direction V (score.py --fit-direction); "
                                                  "default: the batch's mean text embedding, over all ranks")
    g.add_argument("--omega", type=float, default=0.3, help="weight ω of the text-irrelevant score part")
    g.add_argument("--rollout-steps", type=int, default=50, help="DDIM steps of each rollout (trailing spacing)")
    g.add_argument("--grad-stride", type=int, default=10,
                   help="gradient flows at steps[offset::stride], offset random per batch (50/10: 5 steps)")
    g.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance of rollouts and previews")
    g.add_argument("--scorer-crop", type=int, help="random crop side before the scorer's resize "
                                                   "(default: 504/512 of the resolution, as officially)")

    g = p.add_argument_group("miniature stages")
    g.add_argument("--kl-weight", type=float, default=1e-6, help="vae: weight of the KL term (per-element means)")
    g.add_argument("--direction-prompts", type=int, default=1000, help="clip: captions to fit V on at the end")

    g = p.add_argument_group("output")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint and outputs every N steps")
    g.add_argument("--sample-every", type=int, default=500, help="preview grid every N steps (0: never)")
    g.add_argument("--val-prompts", type=Path, help="prompt file for the previews (default: from the data)")
    g.add_argument("--num-val", type=int, default=4, help="images per preview grid")
    g.add_argument("--val-steps", type=int, default=25, help="DDIM steps of the previews")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when there is one")
    g.add_argument("--export", type=Path, metavar="DIR",
                   help="sft/reward: write a complete diffusers pipeline with the trained UNet merged; "
                        "clip/vae: write this stage's model folders into DIR")
    args = p.parse_args(argv)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resolution is None:
        args.resolution = 64 if args.data == "shapes" else 512
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.stage == "reward"
    if args.stage in ("clip", "vae") and args.from_scratch is None:
        args.from_scratch = "tiny"
    return args


def check_args(args) -> None:
    """Refuse bad settings before anything is loaded, with a message that names the fix (ValueError)."""
    data.check_resolution(args.resolution)
    if args.data == "shapes" and args.resolution != data.CANVAS:
        raise ValueError(f"the shapes world is {data.CANVAS}×{data.CANVAS}; use --resolution {data.CANVAS}")
    for name in ("steps", "batch_size", "grad_accum", "lora_rank", "rollout_steps", "grad_stride", "num_val",
                 "save_every", "shapes_count"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ValueError(f"--caption-dropout must be in [0, 1], got {args.caption_dropout}")
    if not 0.0 <= args.ema < 1.0:
        raise ValueError(f"--ema must be a decay in [0, 1), got {args.ema}")
    if args.decay_from is not None and not 0 <= args.decay_from < args.steps:
        raise ValueError(f"--decay-from must be a step in [0, --steps={args.steps}), got {args.decay_from}")
    if args.stage in ("sft", "reward") and args.weights is None:
        raise ValueError(f"--stage {args.stage} needs --weights: an SD-1.5 diffusers folder or single-file "
                         "checkpoint (or the miniature's weights/mini)")
    if args.stage == "reward" and args.scorer is None:
        raise ValueError("--stage reward needs --scorer: a CLIP preference scorer (PickScore_v1, HPSv2, "
                         "Denscore, CLIP-H, or the miniature's weights/mini/scorer)")
    if args.stage == "reward" and (args.full or args.from_scratch):
        raise ValueError("the reward stage always trains a fresh LoRA on the (merged) SFT UNet; drop --full "
                         "and --from-scratch")
    if args.stage == "sft" and args.from_scratch and not args.full:
        raise ValueError("--from-scratch trains a new UNet, which needs --full (a LoRA on random weights "
                         "would learn nothing useful)")
    configs = {"sft": UNET_CONFIGS, "clip": CLIP_CONFIGS, "vae": VAE_CONFIGS}.get(args.stage, {})
    if args.from_scratch and args.from_scratch not in configs:
        raise ValueError(f"unknown --from-scratch config {args.from_scratch!r} for --stage {args.stage}; "
                         f"choose one of {', '.join(configs)}")
    if args.scorer_crop is not None and not 0 < args.scorer_crop <= args.resolution:
        raise ValueError(f"--scorer-crop must be in 1..{args.resolution}, got {args.scorer_crop}")
    checkpoint_file = args.out / "checkpoint.pt"
    if checkpoint_file.exists() and not args.resume:
        raise ValueError(f"{checkpoint_file} exists; pass --resume to continue that run, or choose another --out")


# ----------------------------------------------------------------------------------------------------------
# Devices, processes and randomness
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Env:
    """Where this process runs: its rank among ``world`` processes, its device, and the autocast dtype."""
    rank: int
    world: int
    device: torch.device
    half: torch.dtype | None  # bf16/fp16 autocast on CUDA; None runs everything in fp32

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.half, enabled=self.half is not None)


def setup_env(args) -> Env:
    """Join the process group that torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = args.precision if args.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs CUDA; on the CPU training runs in fp32")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Env(rank, world, device, PRECISIONS[precision])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def global_randn(generator: torch.Generator, shape: tuple, env: Env) -> torch.Tensor:
    """N(0, 1) noise for the GLOBAL batch, of which this rank keeps rows rank::world.

    DistributedSampler gives rank r the samples at positions r, r + world, ... of the global batch, so
    every sample meets the same noise whether one process or N run the step. All ranks share one seeded
    generator and draw in lockstep; the extra rows cost nothing next to a UNet call.
    """
    noise = torch.randn((shape[0] * env.world, *shape[1:]), generator=generator)
    return noise[env.rank::env.world].to(env.device)


def global_rand(generator: torch.Generator, n: int, env: Env) -> torch.Tensor:
    """U[0, 1) for the global batch, sliced like :func:`global_randn`."""
    return torch.rand(n * env.world, generator=generator)[env.rank::env.world].to(env.device)


def average_gradients(params: list[nn.Parameter], env: Env, bucket_numel: int = 2 ** 24) -> None:
    """Replace every gradient by its mean over the ranks, in flat buckets.

    This is what DistributedDataParallel does during backward. Its wrapper is not used here because it
    expects one forward per backward, and the reward rollout calls the UNet up to 50 times per step, with
    the K gradient steps recomputed inside backward by checkpointing. One explicit all-reduce per optimizer
    step serves every stage, with or without gradient accumulation.
    """
    if env.world == 1:
        return
    bucket, size = [], 0
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        bucket.append(param.grad)
        size += param.numel()
        if size >= bucket_numel or param is params[-1]:
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            dist.all_reduce(flat)
            flat /= env.world
            for grad, piece in zip(bucket, flat.split([grad.numel() for grad in bucket])):
                grad.copy_(piece.view_as(grad))
            bucket, size = [], 0


def mean_over_ranks(values: dict[str, float], env: Env) -> dict[str, float]:
    """The mean of each logged number over the ranks (the global batch's value)."""
    if env.world == 1:
        return values
    totals = torch.tensor(list(values.values()), dtype=torch.float64, device=env.device)
    dist.all_reduce(totals)
    return dict(zip(values, (totals / env.world).tolist()))


def any_rank(flag: bool, env: Env) -> bool:
    if env.world == 1:
        return flag
    votes = torch.tensor(float(flag), device=env.device)
    dist.all_reduce(votes)
    return bool(votes > 0)


class StopRequest:
    """SIGINT / SIGTERM ask the loop to save a checkpoint after the current step and exit; a second
    Ctrl-C stops at once. Under torchrun every rank gets the signal and they agree on the step (any_rank)."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

class ShapesCaptions(torch.utils.data.Dataset):
    """The captions of the first ``n`` training scenes of the shapes world: the miniature's reward prompts."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> str:
        return data.shapes_example("train", index)[1]


def image_dataset(args, caption_dropout: float):
    if args.data == "shapes":
        return data.ShapesDataset("train", args.shapes_count, caption_dropout, args.seed)
    return data.CaptionImageDataset(args.data, args.resolution, caption_dropout, args.seed)


def prompt_dataset(args):
    return ShapesCaptions(args.shapes_count) if args.data == "shapes" else data.PromptDataset(args.data)


def dataset_captions(dataset, n: int) -> list[str]:
    """The first ``n`` captions of a dataset, without reading images or applying caption dropout."""
    n = min(n, len(dataset))
    if isinstance(dataset, data.CaptionImageDataset):
        return [record.caption for record in dataset.records[:n]]
    if isinstance(dataset, data.ShapesDataset):
        return [data.shapes_example(dataset.split, i)[1] for i in range(n)]
    return [dataset[i] for i in range(n)]


def validation_prompts(args, dataset) -> list[str]:
    """Fixed preview prompts: --val-prompts, else held-out shapes scenes, else the data's first captions."""
    if args.val_prompts:
        return data.PromptDataset(args.val_prompts).prompts[:args.num_val]
    if args.data == "shapes":
        return [data.shapes_example("val", i)[1] for i in range(args.num_val)]
    return dataset_captions(dataset, args.num_val)


def collate(items: list) -> dict:
    if isinstance(items[0], str):
        return {"caption": list(items)}
    return {"image": torch.stack([item["image"] for item in items]), "caption": [item["caption"] for item in items]}


@dataclass
class DataPosition:
    """How far the run has read: the epoch, and how many of its batches (per rank) are used up."""
    epoch: int = 0
    batches: int = 0


def endless_batches(dataset, position: DataPosition, args, env: Env):
    """Yield batches epoch after epoch from ``position`` on, advancing it.

    The order of an epoch is DistributedSampler's seeded shuffle, a function of (seed, epoch) only, so a
    resumed run skips exactly the batches it already used, and N ranks together read what one process
    with an N-times larger batch reads.
    """
    while True:
        if hasattr(dataset, "set_epoch"):  # caption dropout varies with the epoch
            dataset.set_epoch(position.epoch)
        sampler = DistributedSampler(dataset, num_replicas=env.world, rank=env.rank, shuffle=True,
                                     seed=args.seed, drop_last=True)
        sampler.set_epoch(position.epoch)
        remaining = list(sampler)[position.batches * args.batch_size:]
        loader = DataLoader(dataset, args.batch_size, sampler=remaining, collate_fn=collate, drop_last=True,
                            num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
        for batch in loader:
            position.batches += 1
            yield batch
        position.epoch, position.batches = position.epoch + 1, 0


def check_dataset_size(dataset, args, env: Env) -> None:
    if len(dataset) // env.world // args.batch_size == 0:
        raise ValueError(f"the data has {len(dataset)} usable items, fewer than one global batch "
                         f"({args.batch_size} per process × {env.world}); lower --batch-size or add data")


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

def load_frozen_parts(args, env: Env):
    """The tokenizer, text encoder and VAE of --weights, frozen, in the autocast dtype.

    The tokenizer comes from a ``tokenizer/`` folder when there is one, else the bundled CLIP vocabulary.
    """
    weights = Path(args.weights)
    tokenizer = CLIPTokenizer.from_pretrained(weights) if (weights / "tokenizer").is_dir() else CLIPTokenizer()
    text_encoder = load_text_encoder(weights, dtype=env.half, device=env.device).eval().requires_grad_(False)
    vae = load_vae(weights, dtype=env.half, device=env.device).eval().requires_grad_(False)
    return tokenizer, text_encoder, vae


def fresh_unet(name: str, text_encoder, vae: AutoencoderKL, resolution: int) -> UNet2DConditionModel:
    """A randomly initialised UNet of config ``name``, sized to read this text encoder and this VAE's latents."""
    channels = vae.config.latent_channels
    cfg = dataclasses.replace(UNET_CONFIGS[name], cross_attention_dim=text_encoder.hidden_size, in_channels=channels,
                              out_channels=channels, sample_size=resolution // vae.downsample_factor)
    return UNet2DConditionModel(cfg)


def segment_encoder(args, tokenizer, text_encoder) -> LongPromptEncoder:
    """LongAlign §3's segment-level encoder (or the truncate baseline), quiet about dropped tokens: truncation
    is the point of the baseline, and a warning per long caption per step would bury the log."""
    warnings.filterwarnings("ignore", message=r".*encoding into \d+ context rows dropped")
    return LongPromptEncoder(tokenizer, text_encoder, args.max_tokens, args.encoding)


def latent_shape(vae: AutoencoderKL, batch: int, resolution: int) -> tuple[int, int, int, int]:
    side = resolution // vae.downsample_factor
    return batch, vae.config.latent_channels, side, side


def dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# ----------------------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------------------

def sft_loss(unet, vae, encoder, schedule, images, captions, posterior_noise, noise, timesteps) -> torch.Tensor:
    """Stage 1 (FACTS.md §1): the ε-prediction MSE of DDPM ("L_simple") on VAE latents of the images.

        z = 0.18215 · (a VAE posterior sample),   x_t = α_t·z + σ_t·ε,   loss = mean |ε − unet(x_t, t, c)|²

    with c the segment-level context of the caption (frozen text encoder, LongAlign §3).
    """
    with torch.no_grad():
        mean, logvar = vae.encode(images.to(dtype_of(vae)))
        latents = (mean + (0.5 * logvar).exp() * posterior_noise) * vae.scaling_factor
        context = encoder(captions)
    noisy = schedule.add_noise(latents.float(), noise, timesteps)
    return F.mse_loss(unet(noisy, timesteps, context).float(), noise)


def gradient_steps(num_steps: int, stride: int, offset: int) -> set[int]:
    """The rollout steps that carry gradient: steps[offset::stride] (50 steps, stride 10: five of them)."""
    return set(range(num_steps)[offset::stride])


def rollout(unet, sampler: DDIMSampler, noise, cond, uncond, cfg: float, grad_steps: set[int]) -> torch.Tensor:
    """Deterministic DDIM with CFG from pure noise to the x0-prediction of the last step (FACTS.md §1 Stage 2).

    - At a step in ``grad_steps`` the guided UNet call is checkpointed (only its inputs are stored; it is
      recomputed during backward) and its input latent is DETACHED: no gradient runs back through the UNet
      into earlier steps.
    - Every other step runs under no_grad and records no UNet graph.
    - The DDIM update x_{i+1} = a_i·x_i + b_i·ε_i stays in the graph, so the ε of a gradient step still
      reaches the final image through the linear coefficients of all later steps.
    """
    x = noise.float()
    timesteps = sampler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        if i in grad_steps:
            eps = checkpoint(guided_eps, unet, x.detach(), t, cond, uncond, cfg, use_reentrant=False)
        else:
            with torch.no_grad():
                eps = guided_eps(unet, x, t, cond, uncond, cfg)
        if i < len(timesteps) - 1:
            x = sampler.step(eps, i, x)
    return sampler.schedule.predict_x0(x, eps, timesteps[-1])


def decode_to_unit(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] through the VAE decoder, keeping the graph."""
    images = vae.decode((latents / vae.scaling_factor).to(dtype_of(vae)))
    return (images.float() / 2 + 0.5).clamp(0, 1)


def score_images(scorer: Scorer, images, encoded, direction, omega: float, crop: int, generator):
    """LongAlign §4's reward for each image and its prompt: the ω-reweighted segment-level score.

    images [B, 3, H, W] in [0, 1] -> one random crop×crop window (504 of 512 officially) -> resize to 224 and
    CLIP normalization, all differentiable -> the scorer's image embedding -> the score projection (the
    Triton kernel on CUDA) against the prompt's sentence embeddings ``encoded``. V is ``direction``, or
    the batch's normalized mean prompt embedding over every rank when it is None.
    Returns the ScoreParts and the raw image embeddings [B, P].
    """
    embeddings = scorer.encode_images(images, random_crop=crop, generator=generator)
    if direction is None:
        direction = batch_direction(encoded.prompt_embedding())
    parts = score_projection(embeddings, encoded.segments, encoded.mask(), direction.to(embeddings.device), omega)
    return parts, embeddings


def reward_loss(parts) -> torch.Tensor:
    """0.5 · (1 − mean score_ω): the official reward loss, in [0, 1] for cosines."""
    return 0.5 * (1.0 - parts.score.mean())


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy for a [B, B] logit matrix whose diagonal holds the true pairs."""
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def clip_loss(model: CLIPModel, tokenizer, images, captions: list[str], pick: torch.Tensor):
    """The miniature's scorer objective: contrastive image↔text on three kinds of text (issue 7).

    - the segment-level prompt embedding C_P (mean of the unit sentence embeddings), so the score the
      reward stage uses, C_X·C_P, is itself what is trained to rank images;
    - one random sentence per caption (``pick`` in [0, 1) chooses it), so single facts mean something;
    - the whole caption truncated to 77 tokens, so the truncate baseline is in distribution.
    Returns the loss and the in-batch retrieval accuracy of C_P.
    """
    pixels = preprocess_tensor((images.float() + 1) / 2, size=model.config.vision.image_size)
    image = F.normalize(model.encode_image(pixels), dim=-1)  # [B, P]

    segments = [sentence_segments(tokenizer, caption) for caption in captions]
    counts = torch.tensor([len(s) for s in segments], device=image.device)
    # Under the causal mask the pooled <eot> state never sees what follows it, so the rows can be cut to the
    # longest segment instead of 77: the embeddings are exactly the scorer's, for a fraction of the work.
    length = max(len(ids) for s in segments for ids in s) + 2
    ids = torch.tensor([frame(ids)[:length] for s in segments for ids in s], device=image.device)  # [S, length]
    sentence = F.normalize(model.encode_text(ids), dim=-1)  # [S, P]
    owner = torch.repeat_interleave(torch.arange(len(captions), device=image.device), counts)
    prompt = torch.zeros_like(image).index_add_(0, owner, sentence) / counts[:, None]  # C_P, not renormalized
    first = torch.cumsum(counts, 0) - counts
    one = sentence[first + (pick * counts).long()]
    whole = F.normalize(model.encode_text(tokenizer(captions).to(image.device)), dim=-1)

    scale = model.logit_scale.exp().clamp(max=100.0)  # CLIP caps the temperature at 100
    logits = scale * prompt @ image.T
    loss = (info_nce(logits) + info_nce(scale * one @ image.T) + info_nce(scale * whole @ image.T)) / 3
    accuracy = (logits.argmax(dim=1) == torch.arange(len(image), device=image.device)).float().mean()
    return loss, {"retrieval_acc": accuracy.detach()}


def vae_loss(vae: AutoencoderKL, images, posterior_noise, kl_weight: float):
    """The miniature's autoencoder objective: pixel MSE of a posterior sample's reconstruction plus a small
    KL(q(z|x) ‖ N(0, I)) that keeps the latent space smooth (both as per-element means)."""
    mean, logvar = vae.encode(images)
    recon = vae.decode(mean + (0.5 * logvar).exp() * posterior_noise)
    mse = F.mse_loss(recon.float(), images.float())
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------

def stack_loras(first: dict, second: dict) -> dict:
    """One LoRA file that applies ``first`` and then ``second`` (its rank is the sum of theirs).

        ΔW = s1·U1·D1 + s2·U2·D2 = [s1·U1, s2·U2] · [D1; D2],   s = alpha / rank,

    with the scales folded into the up weights and alpha set to the new rank (scale 1). The reward LoRA,
    trained on top of the merged SFT LoRA, so ships as one file for the ORIGINAL SD-1.5 weights, and the
    official release's hand renaming between the stages is gone.
    """
    suffix = ".lora_down.weight"
    modules = sorted(key[:-len(suffix)] for key in first if key.endswith(suffix))
    if modules != sorted(key[:-len(suffix)] for key in second if key.endswith(suffix)):
        raise ValueError("the two LoRAs wrap different modules, so they cannot be stacked into one file")
    stacked = {}
    for name in modules:
        downs, ups = [], []
        for state in (first, second):
            down, up = state[name + suffix].float().cpu(), state[f"{name}.lora_up.weight"].float().cpu()
            alpha = float(state.get(f"{name}.alpha", down.shape[0]))
            downs.append(down)  # [r, in] or [r, in, kh, kw]
            ups.append(up * (alpha / down.shape[0]))  # [out, r] or [out, r, 1, 1]
        stacked[name + suffix] = torch.cat(downs, dim=0)
        stacked[f"{name}.lora_up.weight"] = torch.cat(ups, dim=1)
        stacked[f"{name}.alpha"] = torch.tensor(float(stacked[name + suffix].shape[0]))
    return stacked


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of images [N, 3, H, W] in [-1, 1] as one PNG."""
    images = torch.stack(rows)  # [R, N, 3, H, W]
    n_rows, n_cols, _, height, width = images.shape
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = pixels.permute(0, 3, 1, 4, 2).reshape(n_rows * height, n_cols * width, 3)  # rows, cols side by side
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


# ----------------------------------------------------------------------------------------------------------
# The stages: what each one trains, on what data, with what loss, and what it writes
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    """What the shared training loop needs from a stage."""
    model: nn.Module  # holds every trained parameter (the ones with requires_grad)
    dataset: torch.utils.data.Dataset
    loss: Callable  # (batch, generator) -> (loss, {name: scalar tensor to log})
    save: Callable  # (folder, final) -> None: the stage's outputs
    export: Callable  # (folder) -> None: --export, after the final save
    preview: Callable | None = None  # (png path) -> None

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}


def unet_preview(unet, vae, encoder, prompts, args, env: Env) -> Callable:
    """Previews: fixed prompts, a fixed seed and sample.py's DDIM, so grids from different steps compare."""

    @torch.no_grad()
    def preview(path: Path) -> None:
        noise = torch.randn(latent_shape(vae, len(prompts), args.resolution),
                            generator=torch.Generator().manual_seed(args.seed)).to(env.device)
        unet.eval()
        with env.autocast():
            latents = sample_loop(unet, DDIMSampler(NoiseSchedule(), args.val_steps), noise, encoder(prompts),
                                  encoder([""]), args.cfg, progress=False)
            images = vae.decode((latents / vae.scaling_factor).to(dtype_of(vae)))
        unet.train()
        save_grid([images], path)

    return preview


def unet_outputs(unet, args, base_lora: dict | None) -> tuple[Callable, Callable]:
    """save and export for the sft and reward stages.

    A LoRA run writes ``lora.safetensors``, which applies to the UNet of ``--unet``/``--weights``: for a
    reward run on top of an SFT LoRA it is the two stacked (``lora_reward.safetensors`` holds the reward
    part alone). A --full run writes ``unet/``. The export is a complete diffusers pipeline folder.
    """

    def final_lora() -> dict:
        state = lora_state_dict(unet)
        return stack_loras(base_lora, state) if base_lora is not None else state

    def save(folder: Path, final: bool) -> None:
        if args.full:
            save_unet_diffusers(unet, folder / "unet")
            return
        if base_lora is not None:
            save_state_dict(lora_state_dict(unet), folder / "lora_reward.safetensors")
        save_state_dict(final_lora(), folder / "lora.safetensors")

    def export(folder: Path) -> None:
        if args.full:
            save_unet_diffusers(unet, folder / "unet")
        else:  # merge into a fresh fp32 copy of the base, not into the (possibly bf16) training copy
            merged = load_unet(args.unet or args.weights)
            load_lora_state_dict(merged, final_lora(), source="the trained LoRA")
            save_unet_diffusers(merge_and_unload(merged), folder / "unet")
        save_vae_diffusers(load_vae(args.weights), folder / "vae")
        save_text_encoder(load_text_encoder(args.weights).text_model, folder / "text_encoder")
        weights = Path(args.weights)
        tokenizer = CLIPTokenizer.from_pretrained(weights) if (weights / "tokenizer").is_dir() else CLIPTokenizer()
        tokenizer.save_pretrained(folder / "tokenizer")
        write_pipeline_files(folder)
        # sample.py's --encoding auto reads this, so the UNet is sampled with the encoding it learned
        write_json(folder / "longalign.json", {"encoding": args.encoding, "max_tokens": args.max_tokens})

    return save, export


def setup_sft(args, env: Env) -> Stage:
    """Stage 1: the UNet (LoRA, or all of it with --full) learns ε-prediction on long-caption images."""
    dataset = image_dataset(args, args.caption_dropout)
    tokenizer, text_encoder, vae = load_frozen_parts(args, env)
    if args.from_scratch:
        unet = fresh_unet(args.from_scratch, text_encoder, vae, args.resolution).to(env.device)
    else:
        unet = load_unet(args.unet or args.weights, device=env.device)
    if args.full:
        unet.requires_grad_(True)  # fp32 master weights; autocast runs the forward in half precision
    else:
        inject_lora(unet, args.lora_rank)  # freezes the base
        unet.to(dtype=env.half)  # the base only: LoRA weights stay fp32 (model/lora.py)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    encoder = segment_encoder(args, tokenizer, text_encoder)
    schedule = NoiseSchedule()

    def loss(batch, generator):
        images = batch["image"].to(env.device)
        shape = latent_shape(vae, len(images), args.resolution)
        posterior_noise = global_randn(generator, shape, env)
        noise = global_randn(generator, shape, env)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (shape[0] * env.world,),
                                  generator=generator)[env.rank::env.world].to(env.device)
        return sft_loss(unet, vae, encoder, schedule, images, batch["caption"], posterior_noise, noise,
                        timesteps), {}

    save, export = unet_outputs(unet, args, base_lora=None)
    preview = unet_preview(unet, vae, encoder, validation_prompts(args, dataset), args, env)
    return Stage(unet, dataset, loss, save, export, preview)


def setup_reward(args, env: Env) -> Stage:
    """Stage 2: a fresh LoRA on the SFT UNet ascends the ω-reweighted score of its own DDIM rollouts."""
    dataset = prompt_dataset(args)
    tokenizer, text_encoder, vae = load_frozen_parts(args, env)
    unet = load_unet(args.unet or args.weights, device=env.device)  # fp32, so the SFT merge is exact
    base_lora = None
    if args.sft_lora:
        base_lora = read_state_dict(args.sft_lora)
        load_lora_state_dict(unet, base_lora, source=str(args.sft_lora))
        merge_and_unload(unet)
    unet.to(dtype=env.half)
    inject_lora(unet, args.lora_rank)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    unet.train()
    scorer = Scorer.load(args.scorer, kind=args.scorer_kind, dtype=env.half, device=env.device)
    direction = load_direction(args.direction, scorer.embed_dim) if args.direction else None
    encoder = segment_encoder(args, tokenizer, text_encoder)
    with torch.no_grad():
        uncond = encoder([""])
    sampler = DDIMSampler(NoiseSchedule(), args.rollout_steps, spacing="trailing")
    crop = args.scorer_crop or round(args.resolution * SCORER_CROP)

    def loss(batch, generator):
        prompts = batch["caption"]
        offset = int(torch.randint(min(args.grad_stride, args.rollout_steps), (), generator=generator))
        noise = global_randn(generator, latent_shape(vae, len(prompts), args.resolution), env)
        with torch.no_grad():
            cond = encoder(prompts)
            encoded = scorer.encode_prompts(prompts)
        x0 = rollout(unet, sampler, noise, cond, uncond, args.cfg,
                     gradient_steps(args.rollout_steps, args.grad_stride, offset))
        parts, _ = score_images(scorer, decode_to_unit(vae, x0), encoded, direction, args.omega, crop, generator)
        logs = {name: getattr(parts, name).mean() for name in ("score", "original", "relevant", "irrelevant", "eta")}
        return reward_loss(parts), logs

    save, export = unet_outputs(unet, args, base_lora)
    preview = unet_preview(unet, vae, encoder, validation_prompts(args, dataset), args, env)
    return Stage(unet, dataset, loss, save, export, preview)


def copy_outputs(run: Path, names: list[str]) -> Callable:
    """--export for the miniature's clip and vae stages: copy their final model folders into a pipeline folder."""

    def export(folder: Path) -> None:
        for name in names:
            shutil.copytree(run / name, folder / name, dirs_exist_ok=True)

    return export


def setup_clip(args, env: Env) -> Stage:
    """The miniature's CLIP: the scorer of the reward stage, and its text tower the UNet's text encoder."""
    dataset = image_dataset(args, caption_dropout=0.0)
    model = CLIPModel(CLIP_CONFIGS[args.from_scratch]).to(env.device).train()
    tokenizer = CLIPTokenizer()

    def loss(batch, generator):
        pick = global_rand(generator, len(batch["caption"]), env)
        return clip_loss(model, tokenizer, batch["image"].to(env.device), batch["caption"], pick)

    def save(folder: Path, final: bool) -> None:
        save_clip_model(model, folder / "scorer")
        save_text_encoder(model.text_model, folder / "text_encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
        if final:  # the corpus direction V (LongAlign §4), fitted once the scorer is done (on a copy: Scorer
            # freezes the model it gets, and the checkpoint saved next needs the trainable one)
            scorer = Scorer(copy.deepcopy(model), KINDS["clip"], tokenizer, name="the miniature's scorer")
            prompts = dataset_captions(dataset, args.direction_prompts)
            save_direction(folder / "scorer" / "direction.safetensors",
                           fit_direction(scorer, prompts, progress=False), scorer, len(prompts))

    return Stage(model, dataset, loss, save, copy_outputs(args.out, ["scorer", "text_encoder", "tokenizer"]))


def setup_vae(args, env: Env) -> Stage:
    """The miniature's autoencoder; its latents are what the miniature's UNet denoises."""
    dataset = image_dataset(args, caption_dropout=0.0)
    vae = AutoencoderKL(VAE_CONFIGS[args.from_scratch]).to(env.device).train()
    held_out = (torch.stack([data.to_tensor(data.render(data.shapes_example("val", i)[0]))
                             for i in range(args.num_val)]) if args.data == "shapes"
                else torch.stack([dataset[i]["image"] for i in range(min(args.num_val, len(dataset)))]))

    def loss(batch, generator):
        images = batch["image"].to(env.device)
        posterior_noise = global_randn(generator, latent_shape(vae, len(images), args.resolution), env)
        return vae_loss(vae, images, posterior_noise, args.kl_weight)

    @torch.no_grad()
    def fit_scaling_factor(n: int = 256) -> None:
        """1 / std of the latents, as LDM chose 0.18215 for SD: it gives the diffusion model unit-variance
        latents. Read off the first ``n`` training images (posterior means)."""
        vae.eval()
        images = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))]).to(env.device)
        with env.autocast():
            std = torch.cat([vae.encode(chunk)[0].float() for chunk in images.split(64)]).std().item()
        vae.config = dataclasses.replace(vae.config, scaling_factor=1.0 / std)
        vae.scaling_factor = vae.config.scaling_factor
        vae.train()

    def save(folder: Path, final: bool) -> None:
        fit_scaling_factor()
        save_vae_diffusers(vae, folder / "vae")

    @torch.no_grad()
    def preview(path: Path) -> None:
        vae.eval()
        images = held_out.to(env.device)
        with env.autocast():
            recon = vae.decode(vae.encode(images)[0])
        vae.train()
        save_grid([images, recon], path)

    return Stage(vae, dataset, loss, save, copy_outputs(args.out, ["vae"]), preview)


SETUPS = {"sft": setup_sft, "reward": setup_reward, "clip": setup_clip, "vae": setup_vae}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: everything a resumed run needs to continue exactly
# ----------------------------------------------------------------------------------------------------------

def rng_states(generator: torch.Generator) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)  # torch.load-safe
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "train": generator.get_state()}


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    generator.set_state(states["train"])


def run_signature(args, env: Env) -> dict:
    """What must not change across a resume, or the data order and the noise would change."""
    return {"stage": args.stage, "data": str(args.data), "seed": args.seed, "grad_accum": args.grad_accum,
            "global_batch": args.batch_size * env.world, "full": args.full, "lora_rank": args.lora_rank}


@dataclass
class Training:
    """The mutable state of the loop, saved whole in every checkpoint."""
    stage: Stage
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # every random draw of training: noise, timesteps, offsets, crops
    ema: dict[str, torch.Tensor] | None
    step: int = 0
    position: DataPosition = dataclasses.field(default_factory=DataPosition)

    def state_dict(self, signature: dict) -> dict:
        return {"step": self.step, "epoch": self.position.epoch, "batches": self.position.batches,
                "trainable": {name: p.detach().cpu() for name, p in self.stage.trainable().items()},
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema, "rng": rng_states(self.generator),
                "signature": signature}

    def load_state_dict(self, state: dict, signature: dict) -> None:
        changed = {k: (state["signature"].get(k), v) for k, v in signature.items() if state["signature"].get(k) != v}
        if changed:
            raise ValueError("the checkpoint was made with other settings: " + ", ".join(
                f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items()) + "; use the same ones to resume")
        trainable = self.stage.trainable()
        if set(trainable) != set(state["trainable"]):
            raise ValueError("the checkpoint's trained weights do not match this model; resume with the same "
                             "--weights, --from-scratch and LoRA settings")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # a run that turns EMA on at a resume starts it from the loaded weights
            self.ema = {name: (state["ema"] or state["trainable"])[name].to(param.device).clone()
                        for name, param in trainable.items()}
        set_rng_states(state["rng"], self.generator)
        self.step, self.position = state["step"], DataPosition(state["epoch"], state["batches"])


def save_checkpoint(training: Training, path: Path, signature: dict) -> None:
    """torch.save to a temporary file, then an atomic rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(training.state_dict(signature), tmp)
    os.replace(tmp, path)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a run resumes from)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


@contextlib.contextmanager
def ema_weights(training: Training):
    """Swap the EMA weights in (for outputs and previews), and the training weights back afterwards."""
    if training.ema is None:
        yield
        return
    trainable = training.stage.trainable()
    backup = {name: p.detach().clone() for name, p in trainable.items()}
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(training.ema[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(backup[name])


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------

def train_step(training: Training, batches, args, env: Env) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the global batch's logged numbers."""
    stage, params = training.stage, list(training.stage.trainable().values())
    logged = {}
    for _ in range(args.grad_accum):
        batch = next(batches)
        with env.autocast():
            loss, extra = stage.loss(batch, training.generator)
        global_loss = mean_over_ranks({"loss": loss.item()}, env)["loss"]
        if not math.isfinite(global_loss):
            raise Diverged(f"the loss is {global_loss} at step {training.step + 1}")
        training.scaler.scale(loss / args.grad_accum).backward()
        for name, value in {"loss": loss, **extra}.items():
            logged[name] = logged.get(name, 0.0) + float(value.detach()) / args.grad_accum
    average_gradients(params, env)
    training.scaler.unscale_(training.optimizer)
    logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
    logged["lr"] = training.lr_schedule.get_last_lr()[0]
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.optimizer.zero_grad(set_to_none=True)
    training.lr_schedule.step()
    if training.ema is not None:
        with torch.no_grad():
            for name, param in stage.trainable().items():
                training.ema[name].lerp_(param.detach(), 1.0 - args.ema)
    training.step += 1
    return mean_over_ranks(logged, env)


def learning_rate_factor(step: int, warmup: int, decay_from: int | None, steps: int) -> float:
    """The schedule, as a factor on --lr for optimizer step `step` (0-based): a linear warm-up over `warmup`
    steps, then constant, as in the paper's runs (FACTS.md §1); with `decay_from`, a linear fall from 1 at that
    step to 0 at `steps` (the miniature's SFT uses it, see README). It depends on the step alone, so a resumed
    run continues the same curve; raising --steps on resume changes it only after `decay_from`."""
    factor = min(1.0, (step + 1) / max(1, warmup))
    if decay_from is not None and step >= decay_from:
        factor *= max(0.0, (steps - step) / max(1, steps - decay_from))
    return factor


def start_training(stage: Stage, args, env: Env) -> Training:
    """The optimizer (AdamW), the schedule (learning_rate_factor), the fp16 loss scaler, the EMA and the
    training generator; resumed from OUT/checkpoint.pt with --resume when there is one."""
    params = list(stage.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, args.warmup, args.decay_from, args.steps))
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.half == torch.float16)
    ema = {name: p.detach().clone() for name, p in stage.trainable().items()} if args.ema else None
    training = Training(stage, optimizer, lr_schedule, scaler, torch.Generator().manual_seed(args.seed), ema)

    checkpoint_path, metrics_path = args.out / "checkpoint.pt", args.out / "metrics.jsonl"
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        training.load_state_dict(state, run_signature(args, env))
        if env.main:
            keep_metrics_until(metrics_path, training.step)
            print(f"resumed {checkpoint_path} at step {training.step}")
    elif env.main:
        args.out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    if env.world > 1:  # what DDP does at start: every rank begins from rank 0's weights
        for param in params:
            dist.broadcast(param.data, src=0)
    if env.main:
        print(f"{args.stage}: {sum(p.numel() for p in params):,} trained parameters, {len(stage.dataset):,} "
              f"examples, {env.world} × {args.batch_size} × {args.grad_accum} per step, {env.device}, "
              f"{env.half or torch.float32}")
    return training


def main(argv=None) -> list[dict]:
    """Run one stage; returns this run's metric records (also in OUT/metrics.jsonl)."""
    args = parse_args(argv)
    try:
        check_args(args)
        env = setup_env(args)
        seed_everything(args.seed)  # the same initial weights on every rank
        stage = SETUPS[args.stage](args, env)
        check_dataset_size(stage.dataset, args, env)
        training = start_training(stage, args, env)
    except ValueError as err:  # bad input (WeightsError included): one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    checkpoint_path, metrics_path = args.out / "checkpoint.pt", args.out / "metrics.jsonl"
    signature = run_signature(args, env)

    def save_all(final: bool) -> None:
        with ema_weights(training):
            stage.save(args.out, final)
        save_checkpoint(training, checkpoint_path, signature)

    records, stop = [], StopRequest()
    batches = endless_batches(stage.dataset, training.position, args, env)
    bar = tqdm(total=args.steps, initial=training.step, desc=args.stage, disable=not env.main)
    try:
        while training.step < args.steps:
            started = time.time()
            logged = train_step(training, batches, args, env)
            step, stop_now = training.step, any_rank(stop.signum is not None, env)
            record = {"step": step, **logged, "seconds": round(time.time() - started, 4)}
            if env.main:
                records.append(record)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if stage.preview and args.sample_every and step % args.sample_every == 0:
                    with ema_weights(training):
                        stage.preview(args.out / "samples" / f"step_{step:06d}.png")
                if step % args.save_every == 0 or step == args.steps or stop_now:
                    save_all(final=step == args.steps)
            if stop_now:
                if env.main:
                    print(f"stopped at step {step}; continue with the same command plus --resume", file=sys.stderr)
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        if args.export and env.main:
            with ema_weights(training):
                stage.export(args.export)
            print(f"exported to {args.export}")
    except Diverged as err:
        print(f"error: {err}; stopping. The last good checkpoint, if any, is kept at {checkpoint_path}",
              file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        bar.close()
        stop.restore()
        if env.world > 1:
            dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
