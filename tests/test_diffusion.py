"""model/diffusion.py against diffusers' DDIMScheduler and DPMSolverMultistepScheduler (SD-1.5 config), plus
properties that need no oracle: SD-1.5's published schedule values, x0 recovery, and bad input.

Tolerance for the sampler parity tests: max|ours − diffusers| ≤ 1e-5 · max|diffusers|, in float32. Our schedule
is built in float64 and diffusers' in float32 (they differ by ≤ 1e-6 relative), so bit equality is not expected.
"""
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from model.diffusion import (
    DDIMSampler,
    DPMSolverSampler,
    NoiseSchedule,
    ddim_timesteps,
    dpm_solver_timesteps,
    guided_eps,
    sample_loop,
)

RTOL = 1e-5
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
STEP_COUNTS = [1, 10, 20, 25, 50]


def diffusers_ddim(spacing, num_steps=None):
    scheduler = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing)
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    return scheduler


def diffusers_dpm(num_steps=None):
    scheduler = DPMSolverMultistepScheduler(**SD15)  # algorithm "dpmsolver++", order 2, spacing "linspace"
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    return scheduler


def relative_error(ours, reference):
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def fake_eps(x, t):
    """A deterministic, nonlinear stand-in for the UNet's ε that depends on both x and t (int, 0-d or [B])."""
    t = torch.as_tensor(t).reshape(-1, 1, 1, 1)
    return torch.tanh(x) * (0.5 + t / 2000) + 0.1 * torch.cos(3 * x)


def fake_unet(x, t, context):
    """A stand-in UNet whose output depends on the context, so CFG has something to combine."""
    return fake_eps(x, t) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


@pytest.fixture(autouse=True)
def quiet_diffusers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_schedule_values_from_the_sd15_release(schedule):
    # An independent source, the values of SD-1.5's scaled_linear schedule: ᾱ_0 = 0.99915 and ᾱ_999 ≈ 0.0046601
    # (5 significant digits).
    assert schedule.alphas_cumprod[0].item() == pytest.approx(0.99915, rel=1e-12)
    assert schedule.alphas_cumprod[999].item() == pytest.approx(0.0046601, rel=2e-5)
    reference = diffusers_ddim("leading").alphas_cumprod
    assert relative_error(schedule.alphas_cumprod, reference) < 2e-6


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_timesteps_equal_diffusers(num_steps):
    for spacing in ("leading", "trailing"):
        assert ddim_timesteps(num_steps, spacing).tolist() == diffusers_ddim(spacing, num_steps).timesteps.tolist()
    assert dpm_solver_timesteps(num_steps).tolist() == diffusers_dpm(num_steps).timesteps.tolist()


def test_timesteps_named_in_facts():
    assert ddim_timesteps(50, "leading").tolist() == list(range(981, 0, -20))
    assert ddim_timesteps(50, "trailing").tolist() == list(range(999, 0, -20))


def test_timesteps_equal_diffusers_for_every_step_count():
    for n in range(1, 1000):
        assert ddim_timesteps(n, "leading").tolist() == diffusers_ddim("leading", n).timesteps.tolist(), n
        assert dpm_solver_timesteps(n).tolist() == diffusers_dpm(n).timesteps.tolist(), n
    for n in range(1, 1001):
        ours = ddim_timesteps(n, "trailing").tolist()
        reference = diffusers_ddim("trailing", n).timesteps.tolist()
        # diffusers' float np.arange overshoots for some n (61, 103, ...) and appends a step −1; the rest agrees.
        assert len(ours) == n and (reference == ours or reference == ours + [-1]), n
        assert len(set(ours)) == n and min(ours) >= 0, n


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_ddim_single_steps_match_diffusers(schedule, spacing, num_steps):
    sampler = DDIMSampler(schedule, num_steps, spacing)
    reference = diffusers_ddim(spacing, num_steps)
    generator = torch.Generator().manual_seed(num_steps)
    for i in sorted({0, num_steps // 2, num_steps - 1}):  # first, a middle one, and the last (to ᾱ_0)
        x = torch.randn(2, 4, 8, 8, generator=generator)
        eps = torch.randn(2, 4, 8, 8, generator=generator)
        expected = reference.step(eps, reference.timesteps[i], x).prev_sample
        assert relative_error(sampler.step(eps, i, x), expected) <= RTOL


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_ddim_loop_matches_diffusers(schedule, spacing, num_steps):
    sampler = DDIMSampler(schedule, num_steps, spacing)
    reference = diffusers_ddim(spacing, num_steps)
    x = expected = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(reference.timesteps):
        expected = reference.step(fake_eps(expected, int(t)), t, expected).prev_sample
        x = sampler.step(fake_eps(x, int(t)), i, x)
        assert relative_error(x, expected) <= RTOL, (i, int(t))


@pytest.mark.parametrize("num_steps", [1, 2, 3] + STEP_COUNTS[1:])
def test_dpm_solver_loop_matches_diffusers_at_every_step(schedule, num_steps):
    sampler = DPMSolverSampler(schedule, num_steps)
    reference = diffusers_dpm(num_steps)
    x = expected = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for run in range(2):  # the second run checks that step 0 clears the previous run's state
        x = expected = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(run))
        reference.set_timesteps(num_steps)
        for i, t in enumerate(reference.timesteps):
            expected = reference.step(fake_eps(expected, int(t)), t, expected).prev_sample
            x = sampler.step(fake_eps(x, int(t)), i, x)
            assert relative_error(x, expected) <= RTOL, (run, i, int(t))


def test_dpm_solver_final_step_returns_x0_prediction(schedule):
    sampler = DPMSolverSampler(schedule, 1)
    x = torch.randn(1, 4, 8, 8)
    eps = fake_eps(x, 999)
    assert torch.equal(sampler.step(eps, 0, x), schedule.predict_x0(x, eps, 999))


def test_add_noise_matches_diffusers_and_predict_x0_inverts_it(schedule):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=generator)
    noise = torch.randn(5, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 500, 998, 999])
    noisy = schedule.add_noise(x0, noise, t)
    assert relative_error(noisy, diffusers_ddim("leading").add_noise(x0, noise, t)) <= RTOL
    assert relative_error(schedule.predict_x0(noisy, noise, t), x0) <= 1e-5
    assert relative_error(schedule.add_noise(x0[2:3], noise[2:3], 500), noisy[2:3]) <= 1e-6  # int t, same result


def test_ddim_with_the_true_noise_lands_on_the_next_listed_timestep(schedule):
    # With the true ε, a DDIM step is exact: from x_t it must reach add_noise(x0, ε, t_next) at the NEXT listed
    # timestep. With 3 trailing steps (999, 666, 332) diffusers would go from 666 to 333 instead.
    sampler = DDIMSampler(schedule, 3, "trailing")
    assert sampler.timesteps.tolist() == [999, 666, 332]
    x0, noise = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64).unbind(0)
    targets = sampler.timesteps.tolist()[1:] + [0]
    for i, t in enumerate(sampler.timesteps.tolist()):
        stepped = sampler.step(noise, i, schedule.add_noise(x0, noise, t))
        assert torch.allclose(stepped, schedule.add_noise(x0, noise, targets[i]), rtol=0, atol=1e-12)


def test_guided_eps_is_one_batched_call_with_uncond_first():
    calls = []

    def recording_unet(x, t, context):
        calls.append((x.clone(), t, context.clone()))
        return fake_unet(x, t, context)

    x = torch.randn(2, 4, 8, 8)
    cond = torch.randn(2, 240, 16)
    uncond = torch.randn(1, 240, 16)  # one empty-prompt embedding shared by the batch
    eps = guided_eps(recording_unet, x, 500, cond, uncond, 7.5)
    assert len(calls) == 1
    x_in, t_in, context_in = calls[0]
    assert t_in == 500 and torch.equal(x_in, torch.cat([x, x]))
    assert torch.equal(context_in, torch.cat([uncond, uncond, cond]))
    eps_u, eps_c = fake_unet(x, 500, uncond.expand(2, -1, -1)), fake_unet(x, 500, cond)
    assert torch.allclose(eps, eps_u + 7.5 * (eps_c - eps_u), rtol=0, atol=1e-6)
    per_sample_t = torch.tensor([10, 900])
    guided_eps(recording_unet, x, per_sample_t, cond, uncond, 7.5)
    assert calls[1][1].tolist() == [10, 900, 10, 900]


@pytest.mark.parametrize("sampler_kind", ["ddim", "dpm"])
def test_sample_loop_matches_diffusers_with_cfg(schedule, sampler_kind):
    num_steps = 10
    if sampler_kind == "ddim":
        sampler, reference = DDIMSampler(schedule, num_steps), diffusers_ddim("leading", num_steps)
    else:
        sampler, reference = DPMSolverSampler(schedule, num_steps), diffusers_dpm(num_steps)
    cond, uncond = torch.randn(1, 77, 8) * 0.1, torch.randn(1, 77, 8) * 0.1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = latents
    for t in reference.timesteps:  # diffusers' pipeline loop, written out with its CFG formula
        eps_u, eps_c = fake_unet(torch.cat([expected] * 2), t, torch.cat([uncond, cond])).chunk(2)
        expected = reference.step(eps_u + 7.5 * (eps_c - eps_u), t, expected).prev_sample
    ours = sample_loop(fake_unet, sampler, latents, cond, uncond, 7.5, progress=False)
    assert ours.dtype == latents.dtype
    assert relative_error(ours, expected) <= RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_steps_keep_low_precision_dtypes_and_stay_close_to_fp32(schedule, dtype):
    x = torch.randn(1, 4, 8, 8)
    eps = fake_eps(x, 981)
    for sampler in (DDIMSampler(schedule, 50), DPMSolverSampler(schedule, 20)):
        exact = sampler.step(eps, 0, x)
        low = sampler.step(eps.to(dtype), 0, x.to(dtype))
        assert low.dtype == dtype
        assert relative_error(low, exact) < 2e-2  # the inputs' own rounding (bf16: 8 bits of mantissa)


def test_ddim_step_is_differentiable_and_out_of_place(schedule):
    sampler = DDIMSampler(schedule, 50, "trailing")
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    eps = torch.randn(1, 4, 8, 8, requires_grad=True)
    x_before, eps_before = x.detach().clone(), eps.detach().clone()
    x_next = sampler.step(eps, 0, x)
    x_next.sum().backward()
    assert torch.equal(x.detach(), x_before) and torch.equal(eps.detach(), eps_before)
    # x_next = α_next/α_t · x + (σ_next − α_next·σ_t/α_t) · ε, so the gradients are those two constants.
    a_t, s_t = schedule.scales(999, x)
    a_n, s_n = schedule.scales(979, x)
    assert torch.allclose(x.grad, torch.full_like(x, a_n / a_t))
    assert torch.allclose(eps.grad, torch.full_like(eps, s_n - a_n * s_t / a_t))


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True, None])
def test_bad_step_counts_are_clear_errors(schedule, bad):
    with pytest.raises(ValueError, match="sampling steps"):
        ddim_timesteps(bad, "trailing")
    with pytest.raises(ValueError, match="sampling steps"):
        DDIMSampler(schedule, bad)
    with pytest.raises(ValueError, match="sampling steps"):
        DPMSolverSampler(schedule, bad)


def test_step_counts_that_would_leave_the_schedule_are_rejected(schedule):
    # 1000 leading steps would start at t = 1000 (a known diffusers pitfall: GitHub thread 10003); 1000 DPM steps would repeat timesteps.
    with pytest.raises(ValueError, match="between 1 and 999"):
        DDIMSampler(schedule, 1000, "leading")
    with pytest.raises(ValueError, match="between 1 and 999"):
        DPMSolverSampler(schedule, 1000)
    assert ddim_timesteps(1000, "trailing").tolist() == list(range(999, -1, -1))


def test_other_bad_input_is_a_clear_error(schedule):
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        ddim_timesteps(50, "cosine")
    with pytest.raises(ValueError, match="step index"):
        DDIMSampler(schedule, 10).step(x, 10, x)
    with pytest.raises(ValueError, match="timestep must be an int"):
        schedule.add_noise(x, x, 1000)
    with pytest.raises(ValueError, match="integer tensor"):
        schedule.add_noise(x, x, torch.tensor([0.5]))
    dpm = DPMSolverSampler(schedule, 10)
    dpm.step(x, 0, x)
    with pytest.raises(ValueError, match="expected step 1, got 2"):
        dpm.step(x, 2, x)
    with pytest.raises(ValueError, match="same L and D"):
        guided_eps(fake_unet, x, 500, torch.randn(1, 240, 8), torch.randn(1, 77, 8), 7.5)
    with pytest.raises(ValueError, match="batch"):
        guided_eps(fake_unet, x, 500, torch.randn(2, 77, 8), torch.randn(1, 77, 8), 7.5)
