"""Process plumbing shared by every training loop: devices, DDP, signals, randomness, checkpoints, EMA.

None of this is LongAlign. It makes a long run on a shared machine safe and exact:
- under ``torchrun --nproc_per_node=N`` a step equals one process's with an N-times larger batch (random draws
  are made for the global batch; gradients are averaged over the ranks);
- a run stopped anywhere (Ctrl-C, SIGTERM, a crash) resumes from its last checkpoint (weights, optimizer,
  schedule, RNG states, data position; written atomically) with the losses of an uninterrupted run;
- a NaN or infinite loss stops the run before it can overwrite the last good checkpoint.

``train.py`` (LongAlign's two stages) and ``mini/pretrain.py`` (the miniature's CLIP and VAE) write their
loops out and call these pieces.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from model.vae import to_uint8
from model.weights import atomic_write

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


# ---- Devices and processes ----

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


def setup_env(device: str | None, precision: str) -> Env:
    """Join the process group that torchrun describes in the environment (NCCL on CUDA, gloo on CPU).

    ``precision`` is "auto" (bf16 on CUDA, fp32 on the CPU) or a key of PRECISIONS; bf16 runs on the CPU too,
    which exercises the mixed-precision paths of a GPU run (fp32 LoRA masters on a bf16 base).
    """
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if device:
        device = torch.device(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":  # CPU autocast has bf16; fp16 there is slow and lossy
        raise ValueError("--precision fp16 needs CUDA; on the CPU use --precision bf16 or fp32")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Env(rank, world, device, PRECISIONS[precision])


def end_processes(env: Env) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """The same initial weights on every rank (rank 0's are broadcast anyway, see start_training)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def global_randn(generator: torch.Generator, shape: tuple, env: Env) -> torch.Tensor:
    """N(0, 1) noise for the GLOBAL batch, of which this rank keeps rows rank::world: DistributedSampler gives
    rank r the samples r, r + world, ..., so every sample meets the same noise whether 1 or N processes run the
    step. All ranks draw in lockstep from one seeded generator; the extra rows cost nothing next to a UNet."""
    noise = torch.randn((shape[0] * env.world, *shape[1:]), generator=generator)
    return noise[env.rank::env.world].to(env.device)


def global_rand(generator: torch.Generator, n: int, env: Env) -> torch.Tensor:
    """U[0, 1) for the global batch, sliced like :func:`global_randn`."""
    return torch.rand(n * env.world, generator=generator)[env.rank::env.world].to(env.device)


def global_randint(generator: torch.Generator, high: int, n: int, env: Env) -> torch.Tensor:
    """Integers in [0, high) for the global batch, sliced like :func:`global_randn`."""
    return torch.randint(0, high, (n * env.world,), generator=generator)[env.rank::env.world].to(env.device)


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


def average_gradients(params: list[nn.Parameter], env: Env, bucket_numel: int = 2 ** 24) -> None:
    """Replace every gradient by its mean over the ranks, in flat buckets, as DistributedDataParallel would.
    Its wrapper expects one forward per backward; the reward rollout calls the UNet up to 50 times a step and
    recomputes K of them inside backward, so one explicit all-reduce per optimizer step serves every loop."""
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


class StopRequest:
    """SIGINT / SIGTERM ask the loop to save a checkpoint after the current step and exit; a second
    Ctrl-C stops at once. Under torchrun every rank gets the signal and they agree on the step (any_rank)."""

    def __init__(self):
        self.signum = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)

    def agreed(self, env: "Env") -> bool:
        """Whether any rank was asked to stop: all ranks then save and exit after the same step."""
        return any_rank(self.signum is not None, env)

    def exit_if(self, stop_now: bool, step: int, env: "Env") -> None:
        if not stop_now:
            return
        if env.main:
            print(f"stopped at step {step}; continue with the same command plus --resume", file=sys.stderr)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


def check_finite(loss: torch.Tensor, step: int, env: Env) -> None:
    """Stop (Diverged) when the global batch's loss is not finite, before it can reach the weights."""
    value = mean_over_ranks({"loss": float(loss.detach())}, env)["loss"]
    if not math.isfinite(value):
        raise Diverged(f"the loss is {value} at step {step}")


@contextlib.contextmanager
def guarded_loop(out: Path, stop: StopRequest, bar, env: Env):
    """Around a training loop: a diverged run exits with one line (its last good checkpoint kept), and
    whatever happens the progress bar, the signal handlers and the process group are put away."""
    try:
        yield
    except Diverged as err:
        print(f"error: {err}; stopping. The last good checkpoint, if any, is kept in {out}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        bar.close()
        stop.restore()
        end_processes(env)


# ---- Data order ----

@dataclass
class DataPosition:
    """How far the run has read: the epoch, and how many of its batches (per rank) are used up."""
    epoch: int = 0
    batches: int = 0


def collate(items: list) -> dict:
    if isinstance(items[0], str):
        return {"caption": list(items)}
    return {"image": torch.stack([item["image"] for item in items]), "caption": [item["caption"] for item in items]}


def endless_batches(dataset, position: DataPosition, batch_size: int, seed: int, workers: int, env: Env):
    """Yield batches epoch after epoch from ``position`` on, advancing it. An epoch's order is
    DistributedSampler's seeded shuffle, a function of (seed, epoch) only, so a resumed run skips exactly the
    batches it used, and N ranks together read what one process with an N-times larger batch reads."""
    while True:
        if hasattr(dataset, "set_epoch"):  # caption dropout varies with the epoch
            dataset.set_epoch(position.epoch)
        if hasattr(dataset, "epoch_order"):  # tar shards: split over ranks and loader workers, as exactly
            order = dataset.epoch_order(position.epoch, seed, batch_size, workers, env.rank, env.world)
        else:
            sampler = DistributedSampler(dataset, num_replicas=env.world, rank=env.rank, seed=seed, drop_last=True)
            sampler.set_epoch(position.epoch)
            order = list(sampler)
        remaining = order[position.batches * batch_size:]
        loader = DataLoader(dataset, batch_size, sampler=remaining, collate_fn=collate, drop_last=True,
                            num_workers=workers, generator=torch.Generator().manual_seed(seed))
        for batch in loader:
            position.batches += 1
            yield batch
        position.epoch, position.batches = position.epoch + 1, 0


def check_dataset_size(dataset, batch_size: int, env: Env) -> None:
    if len(dataset) // env.world // batch_size == 0:
        raise ValueError(f"the data has {len(dataset)} usable items, fewer than one global batch "
                         f"({batch_size} per process × {env.world}); lower --batch-size or add data")


# ---- Randomness and the learning rate ----

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


def learning_rate_factor(step: int, warmup: int, decay_from: int | None, steps: int) -> float:
    """The factor on the base learning rate at optimizer step ``step`` (0-based): a linear warm-up over
    ``warmup`` steps, then constant, as in the authors' released training scripts; with ``decay_from``, a
    linear fall from 1 there to 0 at ``steps``. It depends on the step alone, so a resume continues the curve."""
    factor = min(1.0, (step + 1) / max(1, warmup))
    if decay_from is not None and step >= decay_from:
        factor *= max(0.0, (steps - step) / max(1, steps - decay_from))
    return factor


# ---- The training state: what a checkpoint holds ----

@dataclass
class TrainState:
    """The mutable state of a loop, saved whole in every checkpoint. ``trainable`` names every trained
    parameter; ``generator`` makes every random draw of training (noise, timesteps, offsets, crops)."""
    trainable: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    ema: dict[str, torch.Tensor] | None
    signature: dict  # the settings a resume must not change (data order, noise, batch)
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.trainable.values())

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.position.epoch, "batches": self.position.batches,
                "trainable": {name: p.detach().cpu() for name, p in self.trainable.items()},
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema, "rng": rng_states(self.generator),
                "signature": self.signature}

    def load_state_dict(self, state: dict) -> None:
        saved = state["signature"]
        changed = {k: (saved.get(k), v) for k, v in self.signature.items() if saved.get(k) != v}
        if changed:
            raise ValueError("the checkpoint was made with other settings: " + ", ".join(
                f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items()) + "; use the same ones to resume")
        if set(self.trainable) != set(state["trainable"]):
            raise ValueError("the checkpoint's trained weights do not match this model; resume with the same "
                             "weights, config and LoRA settings")
        copy_into(self.trainable, state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # a run that turns EMA on at a resume starts it from the loaded weights
            self.ema = {name: (state["ema"] or state["trainable"])[name].to(param.device).clone()
                        for name, param in self.trainable.items()}
        set_rng_states(state["rng"], self.generator)
        self.step, self.position = state["step"], DataPosition(state["epoch"], state["batches"])


def start_training(model: nn.Module, args, signature: dict, env: Env) -> TrainState:
    """AdamW over the model's trainable parameters, the schedule, the fp16 loss scaler, the EMA and the
    generator, resumed from OUT/checkpoint.pt with ``--resume``. ``args`` holds the flags both training
    scripts share: lr, adam_betas, adam_eps, weight_decay, warmup, decay_from, steps, ema, seed, out, resume."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, args.warmup, args.decay_from, args.steps))
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.half == torch.float16)
    ema = {name: p.detach().clone() for name, p in trainable.items()} if args.ema else None
    state = TrainState(trainable, optimizer, lr_schedule, scaler, torch.Generator().manual_seed(args.seed), ema,
                       signature)
    checkpoint, metrics = args.out / CHECKPOINT_FILE, args.out / METRICS_FILE
    if args.resume and checkpoint.exists():
        state.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        if env.main:
            keep_metrics_until(metrics, state.step)
            print(f"resumed {checkpoint} at step {state.step}")
    elif env.main:
        args.out.mkdir(parents=True, exist_ok=True)
        metrics.write_text("")
    if env.world > 1:  # what DDP does at start: every rank begins from rank 0's weights
        for param in state.params:
            dist.broadcast(param.data, src=0)
    return state


def refuse_overwrite(out: Path, resume: bool) -> None:
    if (out / CHECKPOINT_FILE).exists() and not resume:
        raise ValueError(f"{out / CHECKPOINT_FILE} exists; pass --resume to continue that run, or choose another --out")


def optimizer_step(state: TrainState, grad_clip: float, ema_decay: float, env: Env) -> dict[str, float]:
    """After the micro-batches' backward passes: average over ranks, clip, step, schedule, EMA.

    Returns the gradient norm (before clipping) and the learning rate this step used.
    """
    average_gradients(state.params, env)
    state.scaler.unscale_(state.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.params, grad_clip))
    lr = state.lr_schedule.get_last_lr()[0]
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.lr_schedule.step()
    if state.ema is not None:
        with torch.no_grad():
            for name, param in state.trainable.items():
                state.ema[name].lerp_(param.detach(), 1.0 - ema_decay)
    state.step += 1
    return {"grad_norm": grad_norm, "lr": lr}


@contextlib.contextmanager
def ema_weights(state: TrainState):
    """Swap the EMA weights in (for outputs and previews), and the training weights back afterwards."""
    if state.ema is None:
        yield
        return
    backup = {name: p.detach().clone() for name, p in state.trainable.items()}
    copy_into(state.trainable, state.ema)
    try:
        yield
    finally:
        copy_into(state.trainable, backup)


@torch.no_grad()
def copy_into(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, param in params.items():
        param.copy_(values[name])


def save_checkpoint(state: TrainState, out: Path) -> None:
    """Written atomically: a crash never leaves half a checkpoint."""
    atomic_write(out / CHECKPOINT_FILE, lambda tmp: torch.save(state.state_dict(), tmp))


# ---- Logs and previews ----

def backward(state: "TrainState", loss: torch.Tensor, logs: dict, logged: dict, grad_accum: int, env: Env) -> None:
    """One micro-batch: refuse a non-finite loss, backpropagate its share of the step (fp16-scaled when the
    scaler is on), and add its logged numbers into ``logged`` as means over the micro-batches."""
    check_finite(loss, state.step + 1, env)
    state.scaler.scale(loss / grad_accum).backward()
    for name, value in {"loss": loss, **logs}.items():
        logged[name] = logged.get(name, 0.0) + float(value.detach()) / grad_accum


def log_step(state: "TrainState", logged: dict, seconds: float, out: Path, bar, env: Env) -> dict:
    """The step's record, {step, logged numbers averaged over the ranks, seconds}, in OUT/metrics.jsonl and on
    the progress bar (main process)."""
    record = {"step": state.step, **mean_over_ranks(logged, env), "seconds": round(seconds, 4)}
    if env.main:
        append_metrics(out, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    return record


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a run resumes from)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def save_image_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of images [N, 3, H, W] in [-1, 1] as one PNG, the rows stacked top to bottom."""
    pixels = to_uint8(torch.stack(rows))  # [R, N, H, W, 3]
    n_rows, n_cols, height, width, _ = pixels.shape
    grid = pixels.permute(0, 2, 1, 3, 4).reshape(n_rows * height, n_cols * width, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
