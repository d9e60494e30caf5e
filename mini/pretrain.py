"""Train the miniature's own CLIP and VAE from scratch: the parts SD-1.5 brings ready-made.

    python -m mini.pretrain --stage clip --data shapes --out runs/mini/clip --export runs/mini/pipeline
    python -m mini.pretrain --stage vae --data shapes --out runs/mini/vae --export runs/mini/pipeline
    torchrun --nproc_per_node=2 -m mini.pretrain --stage vae ...   # the batch size is per process

- clip: a CLIP model trained contrastively on the captions' sentences, their segment-level mean and the
  77-token-truncated caption. It is the reward stage's preference scorer (LongAlign §4; ``scorer/``, with
  the common direction V fitted on the training captions at the end), and its text tower is the frozen
  text encoder the UNet reads (``text_encoder/``, ``tokenizer/``).
- vae: an AutoencoderKL (pixel MSE plus a small KL term); its scaling factor is fitted so that the latents
  the UNet denoises have unit variance (``vae/``; ``samples/`` shows held-out images over their
  reconstructions).

Like train.py, a run writes metrics.jsonl and an atomic checkpoint.pt into --out; --resume continues exactly
(the same losses as an uninterrupted run), --ema keeps an average of the weights for the outputs, and under
torchrun the gradients are averaged over the ranks (model/runtime.py). For vae that is exactly the step one
process takes with the global batch; clip's contrastive loss takes its negatives from each process's own
batch. --export DIR copies the stage's model folders into DIR, to assemble a pipeline folder for train.py.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import data
from mini.scorer import CONFIGS as SCORER_CONFIGS
from mini.scorer import heldout_check, scorer_loss
from model import runtime
from model.clip import CONFIGS as CLIP_CONFIGS, CLIPModel, preprocess_tensor
from model.longtext import sentence_segments
from model.preference import DIRECTION_FILE, KINDS, Scorer, fit_direction, save_direction
from model.tokenizer import CLIPTokenizer, frame
from model.vae import CONFIGS as VAE_CONFIGS, AutoencoderKL, posterior_sample
from model.weights import save_clip_model, save_text_encoder, save_vae_diffusers

# Sized for a CPU; the recipe (mini/recipe.sh) overrides most of them.
STAGE_DEFAULTS = {
    "clip": dict(steps=3000, lr=5e-4, warmup=200, grad_clip=1.0, batch_size=64, grad_accum=1),
    "vae": dict(steps=3000, lr=1e-3, warmup=200, grad_clip=1.0, batch_size=32, grad_accum=1),
    "scorer": dict(steps=3000, lr=5e-4, warmup=100, grad_clip=1.0, batch_size=64, grad_accum=1),
}
CONFIGS = {"clip": CLIP_CONFIGS, "vae": VAE_CONFIGS, "scorer": SCORER_CONFIGS}
OUTPUTS = {"clip": ("scorer", "text_encoder", "tokenizer"), "vae": ("vae",), "scorer": ("scorer",)}  # --export's
SCALING_IMAGES = 256  # training images the VAE's scaling factor is fitted on


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=list(STAGE_DEFAULTS), required=True)
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics, outputs, samples")
    p.add_argument("--data", required=True, help="'shapes' or 'shapes:N' (the shapes world, N training scenes, "
                                                 "default 100000), or a JSONL manifest or an image folder")
    p.add_argument("--resolution", type=int, help="image side (default: 64 for the shapes world, else 512)")
    p.add_argument("--from-scratch", metavar="CONFIG", default="mini",
                   help="the model/clip.py or model/vae.py config to train (default: mini; test for tests)")
    g = p.add_argument_group("optimisation (defaults depend on --stage, see STAGE_DEFAULTS)")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--batch-size", type=int, help="images per process per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int, help="linear warm-up steps, then a constant learning rate")
    g.add_argument("--decay-from", type=int, help="from this step the learning rate falls linearly to zero")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off); the outputs then "
                                                          "hold the EMA weights")
    g.add_argument("--precision", choices=["auto", *runtime.PRECISIONS], default="auto",
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU; the weights always stay fp32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--device", help="default: the GPU of this rank, else cpu")
    g = p.add_argument_group("the stages")
    g.add_argument("--kl-weight", type=float, default=1e-6, help="vae: weight of the KL term (per-element means)")
    g.add_argument("--direction-prompts", type=int, default=1000,
                   help="clip, scorer: captions to fit V on at the end")
    g.add_argument("--heldout", type=int, default=500, help="scorer: held-out val renders checked at each save "
                                                           "(R@1 and swapped colours; 0: off)")
    g = p.add_argument_group("output")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint and outputs every N steps")
    g.add_argument("--sample-every", type=int, default=500, help="vae: reconstruction grid every N steps (0: never)")
    g.add_argument("--num-val", type=int, default=4, help="vae: held-out images per grid")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when there is one")
    g.add_argument("--export", type=Path, metavar="DIR", help="copy this stage's model folders into DIR")
    args = p.parse_args(argv)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args) -> None:
    """Refuse bad settings before anything is built, with a message that names the fix (ValueError)."""
    args.resolution = args.resolution or data.default_resolution(args.data)
    data.check_resolution(args.resolution)
    for name in ("steps", "batch_size", "grad_accum", "num_val", "save_every", "direction_prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.ema < 1.0:
        raise ValueError(f"--ema must be a decay in [0, 1), got {args.ema}")
    if args.decay_from is not None and not 0 <= args.decay_from < args.steps:
        raise ValueError(f"--decay-from must be a step in [0, --steps={args.steps}), got {args.decay_from}")
    if args.from_scratch not in CONFIGS[args.stage]:
        raise ValueError(f"unknown --from-scratch config {args.from_scratch!r} for --stage {args.stage}; "
                         f"choose one of {', '.join(CONFIGS[args.stage])}")
    runtime.refuse_overwrite(args.out, args.resume)


# ----------------------------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------------------------

def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy for a [B, B] logit matrix whose diagonal holds the true pairs."""
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def clip_loss(model: CLIPModel, tokenizer, images, captions: list[str], pick: torch.Tensor):
    """The miniature's scorer objective: contrastive image↔text on three kinds of text.

    - the segment-level prompt embedding C_P (mean of the unit sentence embeddings, LongAlign §4), so the
      score the reward stage uses, C_X·C_P, is itself what is trained to rank images;
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
    recon = vae.decode(posterior_sample(mean, logvar, posterior_noise))
    mse = F.mse_loss(recon.float(), images.float())
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


@torch.no_grad()
def fit_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, env: runtime.Env) -> None:
    """Set the scale to 1 / std of the latents (posterior means of ``images``), as LDM chose 0.18215 for SD:
    it gives the diffusion model unit-variance latents. The scale lives in the config, so the config is
    replaced."""
    was_training = vae.training
    vae.eval()
    with env.autocast():
        std = torch.cat([vae.encode(chunk.to(env.device))[0].float() for chunk in images.split(64)]).std().item()
    vae.config = dataclasses.replace(vae.config, scaling_factor=1.0 / std)
    vae.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# The stages: the model, its loss on a batch, and what it writes
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    model: nn.Module  # every parameter is trained
    loss: Callable  # (batch, generator) -> (loss, {name: scalar tensor to log})
    save: Callable  # (step, final: bool) -> None, the stage's model folders in --out
    preview: Callable | None = None  # (png path) -> None


def clip_stage(args, env: runtime.Env, dataset) -> Stage:
    """The miniature's CLIP: the reward stage's scorer, and its text tower the UNet's text encoder."""
    model = CLIPModel(CLIP_CONFIGS[args.from_scratch]).to(env.device).train()
    tokenizer = CLIPTokenizer()

    def loss(batch, generator):
        pick = runtime.global_rand(generator, len(batch["caption"]), env)
        return clip_loss(model, tokenizer, batch["image"].to(env.device), batch["caption"], pick)

    def save(step: int, final: bool) -> None:
        save_clip_model(model, args.out / "scorer")
        save_text_encoder(model.text_model, args.out / "text_encoder")
        tokenizer.save_pretrained(args.out / "tokenizer")
        if final:
            write_direction(model, tokenizer, dataset, args)

    return Stage(model, loss, save)


def write_direction(model: CLIPModel, tokenizer, dataset, args) -> None:
    """The corpus direction V (LongAlign §4) beside a finished scorer. It is fitted on a copy, because Scorer
    freezes the model it gets and the checkpoint saved next needs the trainable one."""
    scorer = Scorer(copy.deepcopy(model), KINDS["clip"], tokenizer, name="the miniature's scorer")
    prompts = data.first_captions(dataset, args.direction_prompts)
    save_direction(args.out / "scorer" / DIRECTION_FILE, fit_direction(scorer, prompts, progress=False),
                   scorer, len(prompts))


def scorer_stage(args, env: runtime.Env, dataset) -> Stage:
    """The miniature's separate judge (mini/scorer.py): the reward's scorer and Table 1's, and nothing else.
    Each save also checks it on held-out real renders and appends the numbers to OUT/heldout.jsonl."""
    model = CLIPModel(SCORER_CONFIGS[args.from_scratch]).to(env.device).train()
    tokenizer = CLIPTokenizer()

    def loss(batch, generator):  # the hard negatives are drawn from the run's generator: a resume is exact
        seed = int(runtime.global_randint(generator, 2**31, 1, env)[0])
        return scorer_loss(model, tokenizer, batch["image"].to(env.device), batch["caption"], random.Random(seed))

    def save(step: int, final: bool) -> None:
        save_clip_model(model, args.out / "scorer")
        if args.heldout:
            record = {"step": step, **heldout_check(model, tokenizer, args.heldout)}
            with open(args.out / "heldout.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            print(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in record.items() if k != "step"))
        if final:
            write_direction(model, tokenizer, dataset, args)

    return Stage(model, loss, save)


def vae_stage(args, env: runtime.Env, dataset) -> Stage:
    """The miniature's autoencoder; its latents are what the miniature's UNet denoises."""
    vae = AutoencoderKL(VAE_CONFIGS[args.from_scratch]).to(env.device).train()
    held_out = data.validation_images(args.data, dataset, args.num_val)

    def loss(batch, generator):
        images = batch["image"].to(env.device)
        noise = runtime.global_randn(generator, vae.latent_shape(len(images), args.resolution, args.resolution), env)
        return vae_loss(vae, images, noise, args.kl_weight)

    def save(step: int, final: bool) -> None:
        fit_scaling_factor(vae, torch.stack([dataset[i]["image"] for i in range(min(SCALING_IMAGES, len(dataset)))]),
                           env)
        save_vae_diffusers(vae, args.out / "vae")

    @torch.no_grad()
    def preview(path: Path) -> None:
        vae.eval()
        images = held_out.to(env.device)
        with env.autocast():
            recon = vae.decode(vae.encode(images)[0])
        vae.train()
        runtime.save_image_grid([images, recon], path)

    return Stage(vae, loss, save, preview)


STAGES = {"clip": clip_stage, "vae": vae_stage, "scorer": scorer_stage}


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------

def train_step(state: runtime.TrainState, batches, stage: Stage, args, env: runtime.Env) -> dict[str, float]:
    """One optimizer step over --grad-accum micro-batches; returns the logged numbers of this process."""
    logged = {}
    for _ in range(args.grad_accum):
        with env.autocast():
            loss, logs = stage.loss(next(batches), state.generator)
        runtime.backward(state, loss, logs, logged, args.grad_accum, env)  # refuses a NaN loss
    logged.update(runtime.optimizer_step(state, args.grad_clip, args.ema, env))
    return logged


def start(args) -> tuple[runtime.Env, Stage, torch.utils.data.Dataset, runtime.TrainState]:
    """Everything the loop needs, or a ValueError that names the problem."""
    check_args(args)
    env = runtime.setup_env(args.device, args.precision)
    dataset = data.image_dataset(args.data, args.resolution, caption_dropout=0.0, seed=args.seed)
    runtime.check_dataset_size(dataset, args.batch_size, env)
    runtime.seed_everything(args.seed)  # the same initial weights on every rank
    stage = STAGES[args.stage](args, env, dataset)
    signature = {"stage": args.stage, "data": str(args.data), "seed": args.seed, "grad_accum": args.grad_accum,
                 "global_batch": args.batch_size * env.world}
    state = runtime.start_training(stage.model, args, signature, env)
    if env.main:
        print(f"{args.stage}: {sum(p.numel() for p in state.params):,} trained parameters, {len(dataset):,} "
              f"examples, {env.world} × {args.batch_size} × {args.grad_accum} per step, {env.device}")
    return env, stage, dataset, state


def main(argv=None) -> list[dict]:
    """Run one stage; returns this run's metric records (also in OUT/metrics.jsonl)."""
    args = parse_args(argv)
    try:
        env, stage, dataset, state = start(args)
    except ValueError as err:  # bad input (WeightsError included): one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    records, stop = [], runtime.StopRequest()
    batches = runtime.endless_batches(dataset, state.position, args.batch_size, args.seed, args.workers, env)
    bar = tqdm(total=args.steps, initial=state.step, desc=args.stage, disable=not env.main)
    with runtime.guarded_loop(args.out, stop, bar, env):
        while state.step < args.steps:
            started = time.time()
            logged = train_step(state, batches, stage, args, env)
            records.append(runtime.log_step(state, logged, time.time() - started, args.out, bar, env))
            stop_now = stop.agreed(env)
            if env.main:
                write_outputs(state, stage, args, stop_now)
            stop.exit_if(stop_now, state.step, env)
        if args.export and env.main:
            for name in OUTPUTS[args.stage]:
                shutil.copytree(args.out / name, args.export / name, dirs_exist_ok=True)
            print(f"exported to {args.export}")
    return records


def write_outputs(state: runtime.TrainState, stage: Stage, args, stop_now: bool) -> None:
    """After a step, on the main process: the preview grid and, when due, the outputs (with the EMA weights
    when there are any) and then the checkpoint (with the training weights)."""
    step = state.step
    save_now = step % args.save_every == 0 or step == args.steps or stop_now
    with runtime.ema_weights(state):
        if stage.preview and args.sample_every and step % args.sample_every == 0:
            stage.preview(args.out / "samples" / f"step_{step:06d}.png")
        if save_now:
            stage.save(step, final=step == args.steps)
    if save_now:
        runtime.save_checkpoint(state, args.out)


if __name__ == "__main__":
    main()
