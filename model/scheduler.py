"""A pipeline folder's ``scheduler/scheduler_config.json``, read as diffusers' ``from_config`` reads it, turned
into one of our samplers (model/diffusion.py): DDIM, DPM-Solver++(2M) or UniPC.

A diffusers folder names one scheduler class, but users swap it freely: diffusers builds any scheduler class
from any scheduler config, each key of the file overriding that class's own default and every key left out
taking it. So one file means different timesteps to different samplers. SD-1.5's own config (a PNDM config
without ``timestep_spacing``) gives DDIM "leading" steps but DPM-Solver++ and UniPC "linspace" steps; a folder
that diffusers saves today writes ``timestep_spacing: "leading"``, which DPM-Solver++ and UniPC then follow.

The samplers implement SD-1.5's noise schedule and ε-prediction only, and each solver in one variant. A config
that asks for anything else (v-prediction, another beta schedule, Karras sigmas, ...) is refused with the
field and its value, never sampled wrongly. The spacing, the offset and DDIM's final ᾱ and x0 clipping are
honoured.
"""
import json
import math
from pathlib import Path

from model.diffusion import DDIMSampler, DPMSolverSampler, NoiseSchedule, UniPCSampler

SAMPLER_NAMES = ("ddim", "dpm", "unipc")
DIFFUSERS_CLASSES = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler",
                     "unipc": "UniPCMultistepScheduler"}

# SD-1.5's scheduler/scheduler_config.json as the release ships it: what the samplers assume without a config.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None}

# The DDIM config train.py exports beside the models. It leaves timestep_spacing out, as SD-1.5's does, so
# DDIM keeps its "leading" default and the multistep solvers theirs ("linspace").
SD15_DDIM_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1}

# SD-1.5's noise schedule and ε-prediction, the only ones the samplers implement.
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "trained_betas": None, "prediction_type": "epsilon"}
# Each class's __init__ defaults (diffusers 0.42) for every option that changes the sampling maths. All three
# default to a "linear" schedule from 0.0001 to 0.02, which a config must therefore override.
SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                     "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                     "thresholding": False}
PLAIN_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "use_flow_sigmas": False, "use_dynamic_shifting": False, "final_sigmas_type": "zero"}
DIFFUSERS_DEFAULTS = {
    "ddim": {**SCHEDULE_DEFAULTS, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
             "clip_sample": True, "clip_sample_range": 1.0},
    "dpm": {**SCHEDULE_DEFAULTS, **PLAIN_SIGMAS, "timestep_spacing": "linspace", "steps_offset": 0,
            "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "use_lu_lambdas": False,
            "lambda_min_clipped": -math.inf, "variance_type": None},
    "unipc": {**SCHEDULE_DEFAULTS, **PLAIN_SIGMAS, "timestep_spacing": "linspace", "steps_offset": 0,
              "solver_order": 2, "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
              "disable_corrector": [], "solver_p": None, "sigma_min": None, "sigma_max": None,
              "shift_terminal": None},
}
# The options passed on to the sampler; every other option above must keep the one value implemented.
HONOURED = {"timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "clip_sample_range"}


def read_scheduler_config(folder: Path) -> dict | None:
    """``scheduler/scheduler_config.json`` of a pipeline folder, or None when there is none."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix it, or delete it to sample with SD-1.5's "
                         "scheduler settings") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of scheduler settings, got {type(config).__name__}")
    return config


def scheduler_options(name: str, scheduler_config: dict | None) -> dict:
    """Every option of ``DIFFUSERS_DEFAULTS[name]`` as diffusers' ``from_config`` would set it from this config
    (SD-1.5's own config when None), after refusing any value the samplers do not implement."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLER_NAMES)}")
    config = SD15_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config
    defaulted = set(config.get("_use_default_values", ()))  # a live diffusers config marks keys it never read
    given = {k: v for k, v in config.items() if k not in defaulted}
    defaults = DIFFUSERS_DEFAULTS[name]
    options = {option: given.get(option, default) for option, default in defaults.items()}
    required = {**{k: v for k, v in defaults.items() if k not in HONOURED}, **SD15_SCHEDULE}
    for option, value in required.items():
        if not _same(options[option], value):
            shown = _shown(options[option])
            source = (f"sets {option}={shown}" if option in given else
                      f"leaves out {option}, which diffusers' {DIFFUSERS_CLASSES[name]} then takes as {shown}")
            raise ValueError(f"scheduler_config.json {source}, but the {name} sampler here implements only "
                             f"{option}={value!r}: {_why(option)}")
    return options


def make_sampler(name: str, num_steps: int, scheduler_config: dict | None = None,
                 schedule: NoiseSchedule | None = None):
    """The sampler ``name`` ("ddim", "dpm" or "unipc") for ``num_steps`` steps, configured as diffusers'
    ``<its class>.from_config(scheduler_config)`` would be, on SD-1.5's schedule (built when not given)."""
    options = scheduler_options(name, scheduler_config)
    schedule = schedule or NoiseSchedule()
    spacing, offset = options["timestep_spacing"], options["steps_offset"]
    if name == "ddim":
        for flag in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(options[flag], bool):
                raise ValueError(f"scheduler_config.json: {flag} must be true or false, got {options[flag]!r}")
        clip = options["clip_sample_range"] if options["clip_sample"] else None
        if clip is not None and (type(clip) not in (int, float) or not clip > 0):
            raise ValueError(f"scheduler_config.json: clip_sample_range must be a positive number, got {clip!r}")
        return DDIMSampler(schedule, num_steps, spacing, offset, options["set_alpha_to_one"], clip)
    return (DPMSolverSampler if name == "dpm" else UniPCSampler)(schedule, num_steps, spacing, offset)


def _shown(value) -> str:
    """``repr(value)``, cut short (trained_betas is a list of 1000 numbers)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + " ..."


def _same(value, wanted) -> bool:
    """Whether a config value is the one implemented; floats up to a float32 round trip."""
    if isinstance(wanted, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == wanted or math.isclose(value, wanted, rel_tol=1e-6)
    return value == wanted and type(value) is type(wanted)


def _why(option: str) -> str:
    """The fix, by the kind of option."""
    if option == "prediction_type":
        return "SD-1.5 predicts the noise ε; models that predict v or x0 (such as SD-2 at 768 px) are not supported"
    if option in SD15_SCHEDULE:
        return "only SD-1.5's scaled_linear schedule from 0.00085 to 0.012 over 1000 steps is implemented"
    return f"set {option} to that value in scheduler_config.json, or pick another sampler"
