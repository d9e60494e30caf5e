"""model/diffusion.py's UniPCSampler against diffusers' UniPCMultistepScheduler, built as the LongSD release
builds it: ``UniPCMultistepScheduler.from_config(<SD-1.5's PNDM scheduler_config.json>)``, so UniPC's own
defaults (order 2, bh2, predict_x0, lower_order_final, final sigma zero, "linspace") fill the rest.

Tolerance: max|ours − diffusers| ≤ 1e-5 · max|diffusers| in float32 (our schedule is float64, diffusers' float32).
"""
import warnings

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from model.diffusion import DPMSolverSampler, NoiseSchedule, UniPCSampler, sample_loop

RTOL = 1e-5
SD15_SCHEDULER_CONFIG = {  # SD-1.5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None}
STEP_COUNTS = [1, 2, 3, 4, 10, 25, 50]


@pytest.fixture(autouse=True)
def quiet_diffusers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


def diffusers_unipc(num_steps):
    scheduler = UniPCMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler


def relative_error(ours, reference):
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def model_eps(x, t):
    """A nonlinear stand-in for the UNet's ε, depending on x and on t."""
    return torch.sin(2 * x) * (0.3 + t / 1500) + 0.2 * torch.tanh(x)


def test_release_timesteps_for_25_steps(schedule):
    # round(k·999/25) for k = 25..1: 999/25 = 39.96, so the steps are 40 apart except 519 -> 480
    assert UniPCSampler(schedule, 25).timesteps.tolist() == [
        999, 959, 919, 879, 839, 799, 759, 719, 679, 639, 599, 559, 519, 480, 440, 400, 360, 320, 280, 240, 200,
        160, 120, 80, 40]


def test_timesteps_equal_diffusers_for_every_step_count(schedule):
    for n in range(1, 300):
        assert UniPCSampler(schedule, n).timesteps.tolist() == diffusers_unipc(n).timesteps.tolist(), n


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_single_steps_match_diffusers(schedule, num_steps):
    """Each step from the same input as diffusers (the history being diffusers' own trajectory)."""
    sampler, reference = UniPCSampler(schedule, num_steps), diffusers_unipc(num_steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(reference.timesteps):
        eps = model_eps(x, int(t))
        expected = reference.step(eps, t, x).prev_sample
        assert relative_error(sampler.step(eps, i, x), expected) <= RTOL, (i, int(t))
        x = expected


def trajectories(sampler, reference, x):
    """The latents after every step of ours and of diffusers, each following its own trajectory from x."""
    ours, theirs = [x], [x]
    for i, t in enumerate(reference.timesteps):
        theirs.append(reference.step(model_eps(theirs[-1], int(t)), t, theirs[-1]).prev_sample)
        ours.append(sampler.step(model_eps(ours[-1], int(t)), i, ours[-1]))
    return ours[1:], theirs[1:]


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_loop_matches_diffusers_at_every_step(schedule, num_steps):
    sampler, reference = UniPCSampler(schedule, num_steps), diffusers_unipc(num_steps)
    for seed in range(2):  # the second run checks that step 0 clears the first run's state
        reference.set_timesteps(num_steps)
        ours, theirs = trajectories(sampler, reference, torch.randn(1, 4, 8, 8,
                                                                    generator=torch.Generator().manual_seed(seed)))
        errors = [relative_error(a, b) for a, b in zip(ours, theirs)]
        assert len(errors) == num_steps and max(errors) <= RTOL, errors


def test_sample_loop_with_cfg_matches_diffusers_pipeline_loop(schedule):
    """The release's sampling: 25 UniPC steps at CFG 7.5, the pipeline's loop written out."""
    def unet(x, t, context):
        return model_eps(x, t) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    reference = diffusers_unipc(25)
    cond, uncond = torch.randn(1, 480, 8) * 0.1, torch.randn(1, 480, 8) * 0.1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = latents
    for t in reference.timesteps:
        eps_u, eps_c = unet(torch.cat([expected] * 2), int(t), torch.cat([uncond, cond])).chunk(2)
        expected = reference.step(eps_u + 7.5 * (eps_c - eps_u), t, expected).prev_sample
    ours = sample_loop(unet, UniPCSampler(schedule, 25), latents, cond, uncond, 7.5, progress=False)
    assert relative_error(ours, expected) <= RTOL


def test_unipc_is_not_dpm_solver(schedule):
    """The corrector changes every step after the first, so UniPC must differ from DPM-Solver++(2M)."""
    unipc, dpm = UniPCSampler(schedule, 10), DPMSolverSampler(schedule, 10)
    x = torch.randn(1, 4, 8, 8)
    dpm_out = dpm.step(model_eps(x, 999), 0, x)
    assert torch.allclose(unipc.step(model_eps(x, 999), 0, x), dpm_out, rtol=0, atol=1e-6)  # step 0 is DDIM
    eps = model_eps(dpm_out, int(unipc.timesteps[1]))
    assert relative_error(unipc.step(eps, 1, dpm_out), dpm.step(eps, 1, dpm_out)) > 1e-3


def test_one_step_returns_the_x0_prediction(schedule):
    x = torch.randn(1, 4, 8, 8)
    eps = model_eps(x, 999)
    assert torch.equal(UniPCSampler(schedule, 1).step(eps, 0, x), schedule.predict_x0(x, eps, 999))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(schedule, dtype):
    exact_sampler, low_sampler = UniPCSampler(schedule, 25), UniPCSampler(schedule, 25)
    x = torch.randn(1, 4, 8, 8)
    exact, low = x, x.to(dtype)
    for i, t in enumerate(exact_sampler.timesteps.tolist()[:3]):
        exact = exact_sampler.step(model_eps(exact, t), i, exact)
        low = low_sampler.step(model_eps(low.float(), t).to(dtype), i, low)
        assert low.dtype == dtype
    assert relative_error(low, exact) < 3e-2  # the inputs' own rounding (bf16: 8 bits of mantissa)


def test_steps_out_of_order_and_bad_counts_are_clear_errors(schedule):
    sampler = UniPCSampler(schedule, 10)
    x = torch.randn(1, 4, 8, 8)
    sampler.step(model_eps(x, 999), 0, x)
    with pytest.raises(ValueError, match="in order: expected step 1, got 2"):
        sampler.step(model_eps(x, 799), 2, x)
    with pytest.raises(ValueError, match="step index"):
        sampler.step(model_eps(x, 799), 10, x)
    for bad in (0, 1000, 2.5, True):
        with pytest.raises(ValueError, match="sampling steps"):
            UniPCSampler(schedule, bad)
