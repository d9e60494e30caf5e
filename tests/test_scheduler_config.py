"""model/scheduler.py: scheduler_config.json read as diffusers' ``from_config`` reads it, against diffusers.

Each sampler is compared with ``<diffusers class>.from_config(<the same config>)``: timesteps exactly, and every
step of a loop, each following its own trajectory, to max|ours − diffusers| ≤ 1e-5 · max|diffusers| (our
schedule is float64, diffusers' float32).
"""
import inspect
import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

from model.diffusion import DDIMSampler, DPMSolverSampler, NoiseSchedule, UniPCSampler
from model.scheduler import (DIFFUSERS_DEFAULTS, SD15_DDIM_CONFIG, SD15_SCHEDULER_CONFIG, make_sampler,
                             read_scheduler_config)
from test_unipc import RTOL, model_eps, quiet_diffusers, relative_error, trajectories  # noqa: F401
# (quiet_diffusers: test_unipc's autouse fixture, which silences diffusers' warnings here too)

DIFFUSERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
STEP_COUNTS = [1, 2, 10, 20, 25, 50]


@pytest.fixture(scope="module")
def fresh_folder_config(tmp_path_factory):
    """scheduler_config.json as diffusers writes it today when it saves an SD-1.5 pipeline folder."""
    folder = tmp_path_factory.mktemp("pipeline")
    PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    return read_scheduler_config(folder)


def diffusers_scheduler(name, config, num_steps):
    scheduler = DIFFUSERS[name].from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def assert_loop_matches(sampler, reference):
    for seed in range(2):  # the second run checks that step 0 clears the first run's state
        reference.set_timesteps(len(reference.timesteps))
        ours, theirs = trajectories(sampler, reference, torch.randn(1, 4, 8, 8,
                                                                    generator=torch.Generator().manual_seed(seed)))
        errors = [relative_error(a, b) for a, b in zip(ours, theirs)]
        assert len(errors) == len(sampler.timesteps) and max(errors) <= RTOL, errors


@pytest.mark.parametrize("name", ["ddim", "dpm", "unipc"])
def test_defaults_are_those_of_the_installed_diffusers(name):
    parameters = inspect.signature(DIFFUSERS[name].__init__).parameters
    assert {key: parameters[key].default for key in DIFFUSERS_DEFAULTS[name]} == DIFFUSERS_DEFAULTS[name]


def test_a_freshly_saved_folder_asks_for_leading_spacing(fresh_folder_config):
    # SD-1.5's own file has no timestep_spacing; diffusers saves PNDM's default, "leading", and a
    # DPMSolverMultistepScheduler built from that file then uses it too.
    assert fresh_folder_config["timestep_spacing"] == "leading"
    assert fresh_folder_config["steps_offset"] == 1
    assert DPMSolverMultistepScheduler.from_config(fresh_folder_config).config.timestep_spacing == "leading"


@pytest.mark.parametrize("name", ["dpm", "unipc", "ddim"])
@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_fresh_folder_config_equals_diffusers(fresh_folder_config, name, num_steps):
    sampler = make_sampler(name, num_steps, fresh_folder_config)
    reference = diffusers_scheduler(name, fresh_folder_config, num_steps)
    assert sampler.timesteps.tolist() == reference.timesteps.tolist()
    assert_loop_matches(sampler, reference)


def test_dpm_timesteps_of_a_fresh_folder_are_not_sd15_defaults(fresh_folder_config):
    # 20 steps: leading, T // 21 = 47 apart, plus the offset 1; SD-1.5's own config gives linspace, 999 … 50.
    leading = make_sampler("dpm", 20, fresh_folder_config).timesteps.tolist()
    assert leading == [47 * k + 1 for k in range(20, 0, -1)]
    assert make_sampler("dpm", 20).timesteps.tolist()[:2] == [999, 949]


@pytest.mark.parametrize("name", ["ddim", "dpm", "unipc"])
def test_without_a_config_the_samplers_are_sd15s(name):
    """No scheduler_config.json: exactly what the samplers assume (SD-1.5's original config)."""
    schedule = NoiseSchedule()
    today = {"ddim": DDIMSampler, "dpm": DPMSolverSampler, "unipc": UniPCSampler}[name]
    for num_steps in STEP_COUNTS:
        ours, explicit = make_sampler(name, num_steps), make_sampler(name, num_steps, SD15_SCHEDULER_CONFIG)
        expected = today(schedule, num_steps).timesteps.tolist()
        assert ours.timesteps.tolist() == explicit.timesteps.tolist() == expected
    # the DDIM config train.py exports means the same to all three samplers
    assert make_sampler(name, 20, SD15_DDIM_CONFIG).timesteps.tolist() == make_sampler(name, 20).timesteps.tolist()


@pytest.mark.parametrize("num_steps", [1, 4, 10, 25])
def test_sd15_pndm_config_with_unipc_equals_diffusers(num_steps):
    sampler = make_sampler("unipc", num_steps, SD15_SCHEDULER_CONFIG)
    reference = diffusers_scheduler("unipc", SD15_SCHEDULER_CONFIG, num_steps)
    assert sampler.timesteps.tolist() == UniPCSampler(NoiseSchedule(), num_steps).timesteps.tolist()
    assert_loop_matches(sampler, reference)


@pytest.mark.parametrize("name", ["ddim", "dpm", "unipc"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_spacing_and_offset_give_diffusers_timesteps(name, spacing, offset):
    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": spacing, "steps_offset": offset}
    for num_steps in [*range(1, 60), 100, 333, 499, 500, 999]:
        try:
            ours = make_sampler(name, num_steps, config).timesteps.tolist()
        except ValueError as err:  # only where diffusers would leave the schedule (a step at t >= 1000)
            assert "between 1 and" in str(err)
            assert max(diffusers_scheduler(name, config, num_steps).timesteps.tolist()) >= 1000
            continue
        reference = diffusers_scheduler(name, config, num_steps).timesteps.tolist()
        # diffusers' float np.arange for "trailing" appends a spurious step −1 for some n (as for DDIM alone)
        assert ours == reference or (spacing == "trailing" and reference == ours + [-1]), num_steps


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 10, 20, 25, 50])
def test_ddim_loop_equals_diffusers(spacing, num_steps):
    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": spacing}
    assert_loop_matches(make_sampler("ddim", num_steps, config), diffusers_scheduler("ddim", config, num_steps))


@pytest.mark.parametrize("num_steps", [4, 10, 50])
def test_ddim_linspace_loop_goes_to_the_next_listed_timestep(num_steps):
    """diffusers' DDIM steps back by T // n, which for "linspace" lands between the listed timesteps (its open
    GitHub thread 12633). Ours goes to the next listed one; checked here by the DDIM update written out on
    diffusers' own ᾱ table and timesteps."""
    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "linspace"}
    reference = diffusers_scheduler("ddim", config, num_steps)
    timesteps = reference.timesteps.tolist()
    assert any(b != a - 1000 // num_steps for a, b in zip(timesteps, timesteps[1:]))  # diffusers' step misses
    alphas = reference.alphas_cumprod.double()
    x = expected = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler("ddim", num_steps, config)
    for i, t in enumerate(timesteps):
        eps_ours, eps_expected = model_eps(x, t), model_eps(expected, t)
        x = sampler.step(eps_ours, i, x)
        a_t, a_next = alphas[t], alphas[timesteps[i + 1]] if i + 1 < num_steps else alphas[0]
        x0 = (expected - (1 - a_t).sqrt() * eps_expected) / a_t.sqrt()
        expected = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps_expected).float()
        assert relative_error(x, expected) <= RTOL, i


def test_ddim_defaults_apply_to_options_a_config_leaves_out():
    """A config with only the schedule: DDIMScheduler then clips x0 to [−1, 1] and ends at ᾱ = 1, and so do we."""
    config = {key: SD15_SCHEDULER_CONFIG[key] for key in ("beta_start", "beta_end", "beta_schedule")}
    reference = diffusers_scheduler("ddim", config, 10)
    assert reference.config.clip_sample and reference.config.set_alpha_to_one and reference.config.steps_offset == 0
    sampler = make_sampler("ddim", 10, config)
    assert sampler.timesteps.tolist() == list(range(900, -1, -100))
    assert_loop_matches(sampler, reference)
    unclipped = make_sampler("ddim", 10, {**config, "clip_sample": False, "set_alpha_to_one": False})
    x = torch.randn(1, 4, 8, 8)
    assert relative_error(unclipped.step(model_eps(x, 900), 0, x), sampler.step(model_eps(x, 900), 0, x)) > 1e-2


@pytest.mark.parametrize("change, message", [
    ({"prediction_type": "v_prediction"}, "sets prediction_type='v_prediction'.*only prediction_type='epsilon'"),
    ({"prediction_type": "sample"}, "prediction_type='sample'"),
    ({"beta_schedule": "linear"}, "sets beta_schedule='linear'"),
    ({"beta_schedule": None}, "leaves out beta_schedule, which diffusers' DPMSolverMultistepScheduler then takes as "
                              "'linear'"),
    ({"beta_end": 0.02}, "beta_end=0.02"),
    ({"beta_start": None}, "leaves out beta_start.*0.0001"),
    ({"num_train_timesteps": 2000}, "num_train_timesteps=2000"),
    ({"trained_betas": [0.001] * 1000}, "trained_betas="),
    ({"use_karras_sigmas": True}, "use_karras_sigmas=True.*or pick another sampler"),
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+'"),
    ({"solver_order": 3}, "solver_order=3"),
    ({"thresholding": True}, "thresholding=True"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
])
def test_configs_the_samplers_do_not_implement_are_refused(fresh_folder_config, change, message):
    config = {key: value for key, value in {**fresh_folder_config, **change}.items() if value is not None}
    with pytest.raises(ValueError, match=f"^scheduler_config.json ((sets|leaves out) )?{message}") as error:
        make_sampler("dpm", 20, config)
    assert "\n" not in str(error.value)


def test_each_sampler_refuses_only_what_it_reads(fresh_folder_config):
    karras = {**fresh_folder_config, "use_karras_sigmas": True}  # not an option of DDIM's
    assert make_sampler("ddim", 20, karras).timesteps.tolist() == make_sampler("ddim", 20).timesteps.tolist()
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        make_sampler("unipc", 20, karras)
    with pytest.raises(ValueError, match="solver_type='bh1'"):
        make_sampler("unipc", 20, {**fresh_folder_config, "solver_type": "bh1"})
    with pytest.raises(ValueError, match="v_prediction"):  # the schedule is refused by every sampler
        make_sampler("ddim", 20, {**fresh_folder_config, "prediction_type": "v_prediction"})


def test_a_live_diffusers_config_drops_the_keys_it_defaulted():
    """scheduler.config of a live diffusers object marks what it never read; from_config ignores those keys."""
    live = dict(PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).config)
    assert "timestep_spacing" in live["_use_default_values"]
    expected = DPMSolverMultistepScheduler.from_config(live)
    expected.set_timesteps(20)
    assert make_sampler("dpm", 20, live).timesteps.tolist() == expected.timesteps.tolist()


def test_bad_values_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown timestep spacing 'cosine'"):
        make_sampler("ddim", 20, {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "cosine"})
    with pytest.raises(ValueError, match="steps_offset must be an int"):
        make_sampler("dpm", 20, {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading", "steps_offset": 1.5})
    with pytest.raises(ValueError, match="clip_sample must be true or false"):
        make_sampler("ddim", 20, {**SD15_SCHEDULER_CONFIG, "clip_sample": "no"})
    with pytest.raises(ValueError, match="clip_sample_range must be a positive number"):
        make_sampler("ddim", 20, {**SD15_SCHEDULER_CONFIG, "clip_sample": True, "clip_sample_range": 0})
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", 20)
    with pytest.raises(ValueError, match="between 1 and 998"):  # 999 leading steps + offset 1 would reach t = 1000
        make_sampler("dpm", 999, {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading"})
    assert read_scheduler_config(tmp_path) is None
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"beta_start": 0.0')
    with pytest.raises(ValueError, match="scheduler_config.json is not valid JSON"):
        read_scheduler_config(tmp_path)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        read_scheduler_config(tmp_path)
    config = json.loads(json.dumps({**SD15_SCHEDULER_CONFIG, "lambda_min_clipped": -math.inf}))
    assert make_sampler("dpm", 20, config).timesteps.tolist() == make_sampler("dpm", 20).timesteps.tolist()
