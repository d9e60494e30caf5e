"""Noise schedule and samplers for Stable Diffusion 1.5, and the reward stage's rollout (LongAlign §4).

Notation, shared by the DDPM, DDIM and DPM-Solver papers:
    ᾱ_t   = alphas_cumprod[t], the fraction of signal power left at training step t
    α_t   = sqrt(ᾱ_t)        (signal scale)
    σ_t   = sqrt(1 − ᾱ_t)    (noise scale)
    λ_t   = log(α_t / σ_t)   (half the log signal-to-noise ratio; DPM-Solver works in λ)
    x_t   = α_t·x0 + σ_t·ε   (the forward process; SD-1.5 predicts ε)

Precision. The schedule is built in float64, once, on the CPU. Every sampler coefficient is a Python float
taken from those float64 tables, so the samplers run unchanged on any device and dtype, and a coefficient
never enters the autograd graph. The tensor arithmetic of each step runs in at least float32 and returns the
input's dtype: near t = 0, σ_t ≈ 0.03, and near t = 999, dividing by α_t ≈ 0.07 amplifies rounding, so doing
those steps in fp16/bf16 would add avoidable error. Steps are plain out-of-place tensor arithmetic, so the
reward stage can backpropagate through them.

Sampling with a UNet: `sample_loop(unet, sampler, latents, cond, uncond, scale)`, where `sampler` is a
`DDIMSampler`, a `DPMSolverSampler` or a `UniPCSampler` and `unet(x, t, context) -> eps`. model/scheduler.py
builds the sampler a pipeline folder's scheduler_config.json asks for.
"""
import math

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

SPACINGS = ("leading", "trailing", "linspace")


class NoiseSchedule:
    """SD-1.5's "scaled_linear" DDPM schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)**2.

    ᾱ_0 = 0.99915 and ᾱ_999 ≈ 0.0046601. The original LDM code also builds it in float64;
    diffusers builds it in float32, which differs by up to 1e-6 relative.
    """

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
        self.num_train_timesteps = num_train_timesteps
        self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # Kept as separate float64 tables: forming sqrt(1 − ᾱ_t) from a float32 ᾱ_t near t = 0 would lose
        # about four of float32's seven digits.
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self._device_tables = {}

    def scales(self, t, like):
        """(α_t, σ_t) for a timestep `t`, ready to multiply a tensor shaped like `like`.

        An int `t` gives two Python floats. A 0-d or [B] integer tensor gives two float32 tensors shaped
        [B, 1, ..., 1] on `like`'s device (one timestep per sample, as in training).
        """
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim > 1:
                raise ValueError(f"timesteps must be a 0-d or 1-d integer tensor, "
                                 f"got dtype {t.dtype}, shape {tuple(t.shape)}")
            alphas, sigmas = self._tables_on(like.device)
            index = t.reshape(-1).to(like.device)
            shape = (-1,) + (1,) * (like.ndim - 1)
            return alphas[index].reshape(shape), sigmas[index].reshape(shape)
        t = self._check_timestep(t)
        return self.sqrt_alphas_cumprod[t].item(), self.sqrt_one_minus_alphas_cumprod[t].item()

    def add_noise(self, x0, noise, t):
        """The forward process x_t = α_t·x0 + σ_t·ε (DDPM paper eq. 4), used by SFT training.

        Returns x0's dtype.
        """
        alpha, sigma = self.scales(t, x0)
        return (alpha * _upcast(x0) + sigma * _upcast(noise)).to(x0.dtype)

    def predict_x0(self, x_t, eps, t):
        """The model's estimate of the clean sample, x0 = (x_t − σ_t·ε) / α_t (DDIM paper eq. 12, first term).

        Returns x_t's dtype; computed in at least float32 because α_t is as small as 0.07.
        """
        alpha, sigma = self.scales(t, x_t)
        return ((_upcast(x_t) - sigma * _upcast(eps)) / alpha).to(x_t.dtype)

    def _tables_on(self, device):
        """float32 copies of the α and σ tables on `device`, made once per device: gathering a [B] timestep
        tensor where it lives avoids a host-device round trip per training step."""
        if device not in self._device_tables:
            self._device_tables[device] = (self.sqrt_alphas_cumprod.to(device, torch.float32),
                                           self.sqrt_one_minus_alphas_cumprod.to(device, torch.float32))
        return self._device_tables[device]

    def _check_timestep(self, t):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must be an int in [0, {self.num_train_timesteps}), got {t!r}")
        return t


def _upcast(x):
    """x in float32, or in float64 if it already is; see the module docstring on precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def ddim_timesteps(num_steps, spacing="leading", num_train_timesteps=1000, steps_offset=1):
    """DDIMScheduler's timesteps, from noisiest to cleanest, as a CPU LongTensor [num_steps].

    "leading" (diffusers' SD-1.5 default): k·(T // n) + steps_offset, reversed; 50 steps give 981, 961, …, 1.
    "trailing" (LongAlign's reward rollout): round(T − k·T/n) − 1; 50 steps give 999, 979, …, 19.
    "linspace": n points evenly spaced from T − 1 down to 0, rounded; 50 steps give 999, 979, 958, …, 0.
    All match diffusers' DDIMScheduler for every n, except that "trailing" always gives exactly n steps:
    diffusers builds it with a float np.arange that, for some n (61, 103, ...), appends a spurious step −1.
    """
    return _spaced_timesteps(num_steps, spacing, num_train_timesteps, steps_offset, extra_point=0)


def dpm_solver_timesteps(num_steps, spacing="linspace", num_train_timesteps=1000, steps_offset=0):
    """The timesteps of diffusers' multistep solvers (DPMSolverMultistepScheduler and UniPCMultistepScheduler)
    as a CPU LongTensor [num_steps]; their default is "linspace".

    They lay out n + 1 points and drop the last one, because the last step goes to σ = 0 instead:
    "linspace": n + 1 points from T − 1 down to 0, rounded, 0 dropped; 20 steps give 999, 949, …, 50.
    "leading": k·(T // (n + 1)) + steps_offset for k = n, …, 1; 20 steps with offset 1 give 941, 894, …, 48.
    "trailing": as for DDIM.
    """
    return _spaced_timesteps(num_steps, spacing, num_train_timesteps, steps_offset, extra_point=1)


def _spaced_timesteps(num_steps, spacing, num_train_timesteps, steps_offset, extra_point):
    """The first ``num_steps`` of a grid of num_steps + extra_point timesteps, noisiest first, after checking
    that they are distinct and inside the schedule (too many steps would repeat or leave it)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {SPACINGS}")
    if type(steps_offset) is not int or not 0 <= steps_offset < num_train_timesteps:
        raise ValueError(f"steps_offset must be an int in [0, {num_train_timesteps}), got {steps_offset!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(f"the number of sampling steps must be an int, got {num_steps!r}")

    def grid(n):
        return _grid(n, n + extra_point, spacing, num_train_timesteps, steps_offset)

    if not (1 <= num_steps <= num_train_timesteps and _fits(grid(num_steps), num_train_timesteps)):
        most = next(n for n in range(num_train_timesteps, 0, -1) if _fits(grid(n), num_train_timesteps))
        raise ValueError(f"the number of sampling steps must be between 1 and {most}, got {num_steps}; "
                         "pick a value in that range")
    return torch.tensor(grid(num_steps), dtype=torch.long)


def _grid(num_steps, points, spacing, total, offset):
    """The top ``num_steps`` of ``points`` timesteps spaced over [0, total) by ``spacing``, as diffusers lays
    them out. Every value is formed as numpy forms it (arange, linspace), so halves round the same way; Python's
    round() is numpy's, half to even."""
    if spacing == "trailing":
        # T − k·T/n, written as numpy's arange forms it, T + k·((T − T/n) − T): when the exact value is a half
        # (n a multiple of 16), the last bit of that stride decides the rounding.
        stride = (total - total / num_steps) - total
        return [round(total + k * stride) - 1 for k in range(num_steps)]
    top = range(points - 1, points - 1 - num_steps, -1)
    if spacing == "leading":
        return [k * (total // points) + offset for k in top]
    step = (total - 1) / (points - 1) if points > 1 else 0.0  # numpy's linspace: k·((T − 1)/(points − 1))
    return [round(k * step) for k in top]


def _fits(timesteps, total):
    """Distinct (strictly decreasing) training timesteps inside [0, total)."""
    return all(0 <= t < total for t in timesteps) and all(a > b for a, b in zip(timesteps, timesteps[1:]))


class DDIMSampler:
    """Deterministic DDIM (eta = 0): step i moves x from timesteps[i] to timesteps[i + 1].

    The last step goes to t = 0, i.e. ᾱ_0 = 0.99915 (SD-1.5's set_alpha_to_one = False), or to ᾱ = 1 with
    ``set_alpha_to_one``. ``clip_x0`` clamps the x0 prediction to [−clip_x0, clip_x0] (diffusers' clip_sample
    with its clip_sample_range); SD-1.5's config turns that off. Each step goes to the NEXT LISTED timestep.
    diffusers instead always steps back by T // n (diffusers GitHub threads 9261 and 12633); the two agree
    for "leading", and for "trailing" whenever n divides 1000 (LongAlign's 50 steps included), but never for
    "linspace", where diffusers' step lands between the listed timesteps.
    """

    def __init__(self, schedule, num_steps, spacing="leading", steps_offset=1, set_alpha_to_one=False,
                 clip_x0=None):
        self.schedule = schedule
        self.timesteps = ddim_timesteps(num_steps, spacing, schedule.num_train_timesteps, steps_offset)
        final = (1.0, 0.0) if set_alpha_to_one else schedule.scales(0, None)
        self._targets = [schedule.scales(t, None) for t in self.timesteps.tolist()[1:]] + [final]
        self.clip_x0 = clip_x0

    def step(self, eps, i, x):
        """x_{t_i} -> x_{t_{i+1}} given the model's ε at step index i (DDIM paper eq. 12 with σ_t = 0):

            x_prev = α_prev · x0 + σ_prev · ε,   with x0 = (x − σ_t·ε) / α_t.

        Returns x's dtype. Out of place, and differentiable with respect to both `eps` and `x`.
        """
        t = _check_step_index(i, self.timesteps)
        x0 = self.schedule.predict_x0(_upcast(x), eps, t)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        alpha_prev, sigma_prev = self._targets[i]
        return (alpha_prev * x0 + sigma_prev * _upcast(eps)).to(x.dtype)


def _check_step_index(i, timesteps):
    """The timestep (an int) of step index i, after checking that i is a valid index."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(timesteps):
        raise ValueError(f"step index must be an int in [0, {len(timesteps)}), got {i!r}")
    return int(timesteps[i])


class DPMSolverSampler:
    """DPM-Solver++(2M): multistep, second order, on the data (x0) prediction (Lu et al. 2022, Algorithm 2).

    This matches diffusers' DPMSolverMultistepScheduler defaults for SD-1.5: "linspace" timesteps (or the
    ``spacing`` and ``steps_offset`` given, see :func:`dpm_solver_timesteps`), the first step first order
    (there is no previous x0 yet), the last step first order and to σ = 0 (final_sigmas_type "zero"), which
    makes the final sample the last x0 prediction. Steps must be taken in order 0, 1, …, n − 1; step 0 starts
    a fresh run. The only state is the previous x0 and the index of the next step.
    """

    def __init__(self, schedule, num_steps, spacing="linspace", steps_offset=0):
        self.schedule = schedule
        self.timesteps = dpm_solver_timesteps(num_steps, spacing, schedule.num_train_timesteps, steps_offset)
        alphas = [schedule.sqrt_alphas_cumprod[t].item() for t in self.timesteps]
        sigmas = [schedule.sqrt_one_minus_alphas_cumprod[t].item() for t in self.timesteps]
        lambdas = [math.log(a / s) for a, s in zip(alphas, sigmas)]
        # Step i goes from λ_i to λ_{i+1}; the last step goes to σ = 0, where λ = +∞.
        self._coefficients = []
        for i in range(num_steps - 1):
            h = lambdas[i + 1] - lambdas[i]
            h_before = lambdas[i] - lambdas[i - 1] if i > 0 else None
            # x_next = (σ_next/σ)·x − α_next·(e^{−h} − 1)·D; expm1 keeps e^{−h} − 1 accurate for small h.
            self._coefficients.append((sigmas[i + 1] / sigmas[i], -alphas[i + 1] * math.expm1(-h), h_before, h))
        # The last step: σ_next = 0, α_next = 1 and e^{−∞} = 0, so x_next = D = x0.
        self._coefficients.append((0.0, 1.0, None, math.inf))
        self._previous_x0 = None
        self._next_index = 0

    def step(self, eps, i, x):
        """x_{t_i} -> x_{t_{i+1}} (DPM-Solver++ paper, Algorithm 2):

            x_next = (σ_next/σ_i) · x − α_next·(e^{−h} − 1) · D,     h = λ_next − λ_i,
            D = x0_i                                  (first order, = DDIM), or
            D = x0_i + (x0_i − x0_{i−1}) / (2·r),     r = h_{i−1} / h  (second order).

        Returns x's dtype; computed in at least float32, as diffusers also does for this solver.
        """
        t = _check_step_index(i, self.timesteps)
        if i == 0:
            self._previous_x0 = None
        elif i != self._next_index:
            raise ValueError(f"DPM-Solver steps must be taken in order: expected step {self._next_index}, got {i}; "
                             "restart from step 0 for a new sample")
        x0 = self.schedule.predict_x0(_upcast(x), eps, t)
        x_scale, d_scale, h_before, h = self._coefficients[i]
        first_order = self._previous_x0 is None or i == len(self.timesteps) - 1
        d = x0 if first_order else x0 + (x0 - self._previous_x0) * (h / (2.0 * h_before))
        self._previous_x0 = x0
        self._next_index = i + 1
        return (x_scale * _upcast(x) + d_scale * d).to(x.dtype)


class UniPCSampler:
    """UniPC-2, "bh2", on the data (x0) prediction (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
    Framework for Fast Sampling of Diffusion Models", §3, in the data-prediction form of its appendix).

    This matches diffusers' ``UniPCMultistepScheduler.from_config(<SD-1.5 scheduler config>)``: solver order
    2, B(h) = e^{−h} − 1 ("bh2"), "linspace" timesteps (25 steps give 999, 959, …, 40; ``spacing`` and
    ``steps_offset`` as in :func:`dpm_solver_timesteps`), first order on the first step and on the last one, which goes to σ = 0
    (final_sigmas_type "zero"). Each step re-uses the UNet call it is given twice: to correct the point it is
    at (UniC), then to predict the next one (UniP); so UniPC costs no more UNet calls than DDIM.

    Every update has the form x_target = a·x_source + c·D, with h = λ_target − λ_source,
    a = σ_target/σ_source and c = −α_target·(e^{−h} − 1) (the DDIM / DPM-Solver++ first-order step when D is
    the source's x0), and D a weighted sum of recent x0 predictions, written for order p ≤ 2 below:

        UniP at step i (from t_i to t_{i+1}):
            p = 1:  D = x0_i
            p = 2:  D = x0_i + ½·(x0_{i−1} − x0_i)/r,   r = (λ_{i−1} − λ_i)/h          (= DPM-Solver++(2M))
        UniC at step i (redo the step t_{i−1} -> t_i from the corrected x_{i−1}, with x0_i as one more point;
        p is the order UniP used for that step):
            p = 1:  D = x0_{i−1} + ½·(x0_i − x0_{i−1})
            p = 2:  D = x0_{i−1} + ρ1·(x0_{i−2} − x0_{i−1})/r + ρ2·(x0_i − x0_{i−1}),  r = (λ_{i−2} − λ_{i−1})/h
                    where [[1, 1], [r, 1]]·(ρ1, ρ2) = (b1, b2),  b_k = k!·(−h)·φ_{k+1}(−h)/B(h),
                    φ_1(z) = (e^z − 1)/z,  φ_{k+1}(z) = (φ_k(z) − 1/k!)/z

    x0_i comes from the UNet's ε at the uncorrected x_i, as in the paper and diffusers. Steps must be taken in
    order 0, 1, …, n − 1; step 0 starts a fresh run. The coefficients are Python floats from the float64
    schedule; the tensor maths runs in at least float32.
    """

    def __init__(self, schedule, num_steps, spacing="linspace", steps_offset=0):
        self.schedule = schedule
        self.timesteps = dpm_solver_timesteps(num_steps, spacing, schedule.num_train_timesteps, steps_offset)
        n = num_steps
        alphas = [schedule.sqrt_alphas_cumprod[t].item() for t in self.timesteps] + [1.0]
        sigmas = [schedule.sqrt_one_minus_alphas_cumprod[t].item() for t in self.timesteps] + [0.0]
        lambdas = [math.log(a / s) for a, s in zip(alphas[:-1], sigmas[:-1])] + [math.inf]
        h = [lambdas[j + 1] - lambdas[j] for j in range(n)]  # step j goes t_j -> t_{j+1}; the last h is +∞
        # (a, c) of each step; the last has σ_target = 0 and e^{−∞} = 0, so it lands on D itself.
        self._moves = [(sigmas[j + 1] / sigmas[j], -alphas[j + 1] * math.expm1(-h[j])) for j in range(n)]
        # warm-up (no older x0 on step 0) and lower_order_final (first order on the last step)
        self._orders = [min(2, j + 1, n - j) for j in range(n)]
        self._predictor_weights = [(1.0,) if self._orders[j] == 1 else _unip2_weights(-h[j - 1] / h[j])
                                   for j in range(n)]
        self._corrector_weights = [None] + [(0.5, 0.5) if self._orders[j - 1] == 1
                                            else _unic2_weights(-h[j - 2] / h[j - 1], h[j - 1])
                                            for j in range(1, n)]
        self._x0s, self._last_x, self._next_index = [], None, 0

    def step(self, eps, i, x):
        """x_{t_i} -> x_{t_{i+1}}: correct x with the new x0_i (UniC, from step 1 on), then predict (UniP).

        Returns x's dtype.
        """
        t = _check_step_index(i, self.timesteps)
        dtype = x.dtype
        if i == 0:
            self._x0s, self._last_x = [], None
        elif i != self._next_index:
            raise ValueError(f"UniPC steps must be taken in order: expected step {self._next_index}, got {i}; "
                             "restart from step 0 for a new sample")
        x0 = self.schedule.predict_x0(_upcast(x), eps, t)
        self._x0s = (self._x0s + [x0])[-3:]  # UniC-2 needs x0_{i−2}, x0_{i−1} and x0_i
        x = _upcast(x)
        if i > 0:
            x = self._move(i - 1, self._last_x, self._corrector_weights[i])
        self._last_x = x
        self._next_index = i + 1
        return self._move(i, x, self._predictor_weights[i]).to(dtype)

    def _move(self, j, x, weights):
        """a_j·x + c_j·D with D = Σ weights·(the last len(weights) x0 predictions, oldest first)."""
        a, c = self._moves[j]
        d = sum(w * x0 for w, x0 in zip(weights, self._x0s[-len(weights):]))
        return a * x + c * d


def _unip2_weights(r):
    """UniP-2's D = x0_i + ½·(x0_{i−1} − x0_i)/r as weights on (x0_{i−1}, x0_i)."""
    return 0.5 / r, 1.0 - 0.5 / r


def _unic2_weights(r, h):
    """UniC-2's D as weights on (x0_{i−2}, x0_{i−1}, x0_i); see UniPCSampler for the formula."""
    z = -h
    b_h = math.expm1(z)  # B(h) of "bh2"
    z_phi2 = math.expm1(z) / z - 1.0  # z·φ_2(z)
    z_phi3 = z_phi2 / z - 0.5  # z·φ_3(z)
    b1, b2 = z_phi2 / b_h, 2.0 * z_phi3 / b_h
    rho1 = (b1 - b2) / (1.0 - r)
    rho2 = b1 - rho1
    return rho1 / r, 1.0 - rho1 / r - rho2, rho2


def guided_eps(unet, x, t, cond, uncond, scale):
    """Classifier-free guidance: ε = ε_u + s·(ε_c − ε_u) (Ho & Salimans 2022, eq. 6).

    One batched UNet call on cat([uncond, cond]). x: [B, 4, h, w]; cond: [B, L, D]; uncond: [B or 1, L, D]
    (a single empty-prompt embedding is shared by the batch), or None for no guidance (ε_c alone, one
    UNet call, as diffusers does for scale <= 1). t: an int, a 0-d tensor, or a [B] tensor.
    x is cast to the context's dtype (the UNet's working dtype); the guided ε comes back in at least float32,
    because s = 7.5 amplifies rounding in ε_c − ε_u.
    """
    if uncond is None:  # guidance off (diffusers' scale <= 1): the conditional ε alone, one UNet call
        return _upcast(unet(x.to(cond.dtype), t, cond))
    same_tokens = cond.ndim == uncond.ndim == 3 and uncond.shape[1:] == cond.shape[1:]
    if not same_tokens or uncond.shape[0] not in (1, cond.shape[0]):
        raise ValueError(f"cond must be [B, L, D] and uncond [B or 1, L, D] with the same L and D; got "
                         f"{tuple(cond.shape)} and {tuple(uncond.shape)} (encode both prompts the same way)")
    if x.shape[0] != cond.shape[0]:
        raise ValueError(f"latents have batch {x.shape[0]} but cond has batch {cond.shape[0]}")
    batch = x.shape[0]
    context = torch.cat([uncond.expand(batch, -1, -1), cond]).to(cond.dtype)  # [2B, L, D]
    x_in = torch.cat([x, x]).to(cond.dtype)  # [2B, 4, h, w]
    t_in = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
    eps_uncond, eps_cond = _upcast(unet(x_in, t_in, context)).chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)


@torch.no_grad()
def sample_loop(unet, sampler, latents, cond, uncond, scale, progress=True):
    """Run every step of `sampler` from `latents` (pure noise at timesteps[0]) with classifier-free guidance.

    The latent trajectory is kept in at least float32 and only the UNet input is cast to the context's dtype,
    so 50 steps of fp16 rounding do not accumulate. Returns the final latents in `latents`' dtype.
    """
    x = _upcast(latents)
    # Each step's t as a 0-d tensor on the latents' device, not a Python int: a compiled UNet then traces one
    # graph for every step (an int is a new constant to dynamo), and CUDA graphs record it once.
    for i, t in enumerate(tqdm(sampler.timesteps.to(x.device), desc="sampling", disable=not progress)):
        x = sampler.step(guided_eps(unet, x, t, cond, uncond, scale), i, x)
    return x.to(latents.dtype)


def denoising_loss(unet, schedule: NoiseSchedule, latents, context, noise, timesteps) -> torch.Tensor:
    """DDPM's ε-prediction objective ("L_simple"): x_t = α_t·x0 + σ_t·ε, loss = mean |ε − unet(x_t, t, c)|².

    LongAlign's first stage trains on it unchanged; only the context c (segment-level, §3) is new.
    """
    noisy = schedule.add_noise(latents.float(), noise, timesteps)
    return torch.nn.functional.mse_loss(unet(noisy, timesteps, context).float(), noise)


def gradient_steps(num_steps: int, stride: int, offset: int) -> set[int]:
    """The rollout steps that carry gradient: steps[offset::stride] (50 steps, stride 10: five of them)."""
    return set(range(num_steps)[offset::stride])


def rollout(unet, sampler: DDIMSampler, noise, cond, uncond, scale: float, grad_steps: set[int]) -> torch.Tensor:
    """Deterministic DDIM with CFG from pure noise to the x0-prediction of the last step (LongAlign §4).

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
            eps = checkpoint(guided_eps, unet, x.detach(), t, cond, uncond, scale, use_reentrant=False)
        else:
            with torch.no_grad():
                eps = guided_eps(unet, x, t, cond, uncond, scale)
        if i < len(timesteps) - 1:
            x = sampler.step(eps, i, x)
    return sampler.schedule.predict_x0(x, eps, timesteps[-1])
