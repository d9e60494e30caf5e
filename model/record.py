"""longalign.json: what training recorded beside a pipeline, and the sampling settings a model recommends.

``train.py --export`` writes ``{"encoding": ..., "max_tokens": ..., "t5": ...}`` so that ``sample.py`` encodes
prompts the way the UNet was fine-tuned (LongAlign §3's segment encoding, or the truncate baseline). A shipped
model may add the settings it was measured with, ``{"sampling": {"sampler": "dpm", "steps": 10, "cfg": 3.0,
"dtype": "fp32"}}``, which fill the flags a user leaves out.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from model.longtext import check_strategy
from model.scheduler import SAMPLER_NAMES
from model.weights import WeightsError

TRAINING_RECORD_FILE = "longalign.json"
SD15_SAMPLING = {"sampler": "ddim", "steps": 50, "cfg": 7.5}  # the defaults for weights that recommend none
LONGSD_SAMPLING = {"sampler": "unipc", "steps": 25, "cfg": 7.5}  # the authors' released LongSD samples so
RECOMMENDABLE = sorted([*SD15_SAMPLING, "dtype"])
PORTABLE_DTYPES = ("bf16", "fp32")  # what a record may recommend: both run on the CPU and on CUDA
MAX_STEPS = 999  # one step per training timestep at most


def training_record(weights: Path) -> dict:
    """What ``train.py --export`` (and the recipe that ships a model) recorded beside the weights; {} if nothing."""
    record_file = Path(weights) / TRAINING_RECORD_FILE
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
                           "--sampler, --steps, --cfg and --dtype yourself.") from None
    return record


def check_recommended_sampling(sampling) -> None:
    """The record's sampling settings must be ones the flags could have given."""
    if not isinstance(sampling, dict) or set(sampling) - set(RECOMMENDABLE):
        raise ValueError(f"'sampling' may hold only {RECOMMENDABLE}")
    steps, cfg = sampling.get("steps", 1), sampling.get("cfg", 1.0)
    if (sampling.get("sampler", "ddim") not in SAMPLER_NAMES or type(steps) is not int
            or not 1 <= steps <= MAX_STEPS or type(cfg) not in (int, float) or not math.isfinite(cfg)
            or sampling.get("dtype", "fp32") not in PORTABLE_DTYPES):
        raise ValueError(f"'sampling' needs a sampler in {list(SAMPLER_NAMES)}, integer steps in 1..{MAX_STEPS}, "
                         f"a finite cfg and a dtype in {list(PORTABLE_DTYPES)}, got {sampling}")


def fill_sampling_defaults(args, record: dict, release: bool = False) -> None:
    """Flags left out take the weights' recommended sampling (the settings the shipped miniature was measured
    with); else, for the authors' release, its UniPC, 25 steps, CFG 7.5; else SD-1.5's DDIM, 50 steps, CFG 7.5."""
    recommended = {**(LONGSD_SAMPLING if release else SD15_SAMPLING), **record.get("sampling", {})}
    for name, value in recommended.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
