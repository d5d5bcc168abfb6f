"""Samplers: short pure functions over a denoiser D(x, sigma) -> x0, in sigma (VE) space (after k-diffusion).

Every sampler has one signature, `sample_x(denoiser, x, sigmas, *, noise=None, callback=None, **options) -> x`:
it walks x from sigmas[0] to sigmas[-1], calling the denoiser only as often as its algorithm needs. Samplers that
add fresh noise draw it from the injected `noise(sigma, sigma_next) -> Tensor`, never from a hidden torch.randn,
so one image of a batch can be reproduced alone. Conditioning and guidance are bound into the denoiser.

Where a sampler has a diffusers counterpart it reproduces that scheduler's arithmetic (in sigma space), so a plan
built by `ldm.diffusers_schedulers` gives diffusers' numbers; `SAMPLER_NAMES` maps the names users know to the
diffusers scheduler (and flags) whose discretization they mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

NoiseSource = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees once per step, before x moves on to sigma_next."""

    i: int
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    x: torch.Tensor  # the VE sample at sigma
    denoised: torch.Tensor  # the denoiser's estimate of x0 at this step


Callback = Callable[[StepInfo], None]


class TorchNoise:
    """N(0, I) noise of a fixed shape drawn from torch generators the way diffusers' `randn_tensor` draws it.

    A list of generators draws image i from generator i, so an image keeps its noise whatever batch it is in;
    a single generator (or None: torch's global one) draws the whole batch at once.
    """

    def __init__(self, shape: Sequence[int], generator=None, device=None, dtype: torch.dtype = torch.float32):
        if isinstance(generator, list) and len(generator) not in (1, shape[0]):
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per image, or one.")
        self.shape = tuple(shape)
        self.generator = generator[0] if isinstance(generator, list) and len(generator) == 1 else generator
        self.device = torch.device(device or "cpu")
        self.dtype = dtype

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        if isinstance(self.generator, list):
            draws = [self._draw((1, *self.shape[1:]), g) for g in self.generator]
            return torch.cat(draws).to(self.device)
        return self._draw(self.shape, self.generator).to(self.device)

    def _draw(self, shape: tuple[int, ...], generator) -> torch.Tensor:
        # diffusers draws on the generator's device when that is the CPU, then moves the tensor
        draw_device = generator.device if generator is not None and generator.device.type == "cpu" else self.device
        return torch.randn(shape, generator=generator, device=draw_device, dtype=self.dtype)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split a step to sigma_next into a deterministic part to sigma_down and fresh noise of std sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 is DDPM's posterior variance, eta = 0 no noise."""
    if eta == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _require_noise(noise: NoiseSource | None, sampler: str) -> NoiseSource:
    if noise is None:
        raise ValueError(
            f"{sampler} adds fresh noise each step: pass noise=TorchNoise(x.shape, generator) "
            "(or any callable noise(sigma, sigma_next) -> Tensor shaped like x)."
        )
    return noise


def _report(callback: Callback | None, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor):
    if callback is not None:
        callback(StepInfo(i, sigmas[i], sigmas[i + 1], x, denoised))


def _log_ratio(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """h = log(sigma / sigma_next): the step length in log-SNR time t = -log(sigma) of the DPM-Solvers."""
    return sigma.log() - sigma_next.log()


def _reread(x: torch.Tensor, sigma: torch.Tensor, sigma_new: torch.Tensor) -> torch.Tensor:
    """Keep the VP latent x / sqrt(1 + sigma^2) and read it as being at sigma_new instead."""
    return x * ((1 + sigma_new**2) / (1 + sigma**2)) ** 0.5


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, noise=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        _report(callback, i, sigmas, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, noise=None, callback=None, eta: float = 1.0):
    """Euler ancestral: an Euler step to sigma_down, then fresh noise up to sigma_next (k-diffusion)."""
    if eta > 0:
        noise = _require_noise(noise, "sample_euler_ancestral")
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        _report(callback, i, sigmas, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, noise=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); a plain Euler step onto sigma = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next))
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, noise=None, callback=None):
    """DPM-Solver-2 as in k-diffusion: the slope at the log-midpoint sigma drives the whole step; Euler onto 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
        x_mid = x + d * (sigma_mid - sigma)
        x = x + to_d(x_mid, sigma_mid, denoiser(x_mid, sigma_mid)) * (sigma_next - sigma)
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral from sigmas[i] to sigmas[i+1] of the Lagrange basis polynomial that is 1 at sigmas[i-j] and 0 at
    the other nodes sigmas[i], sigmas[i-1], ..., sigmas[i-order+1] (linear multistep weight of the j-th past slope)."""
    nodes = [sigmas[i - k] for k in range(order)]
    others = [node for k, node in enumerate(nodes) if k != j]
    basis = np.poly1d(others, r=True) / np.prod([nodes[j] - node for node in others])
    antiderivative = np.polyint(basis)
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, noise=None, callback=None, order: int = 4):
    """Linear multistep (Adams-Bashforth on sigma with exact polynomial weights), up to `order` past slopes."""
    sigmas_np = sigmas.double().cpu().numpy()
    slopes: list[torch.Tensor] = []  # newest last
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        _report(callback, i, sigmas, x, denoised)
        slopes = (slopes + [to_d(x, sigmas[i], denoised)])[-order:]
        current = len(slopes)
        weights = [lms_coefficient(sigmas_np, i, j, current) for j in range(current)]
        x = x + sum(weight * slope for weight, slope in zip(weights, reversed(slopes)))
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, noise=None, callback=None, first_order_final: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in log-sigma; first order on the
    first step, on a step onto sigma = 0, and on the last step when first_order_final."""
    previous = None  # denoised at the previous sigma
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        h = _log_ratio(sigma, sigma_next)
        estimate = denoised
        last_step = i == len(sigmas) - 2
        if previous is not None and sigma_next > 0 and not (first_order_final and last_step):
            half_over_r = h / _log_ratio(sigmas[i - 1], sigma) / 2
            estimate = (1 + half_over_r) * denoised - half_over_r * previous
        x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
        previous = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser, x, sigmas, *, noise=None, callback=None, eta: float = 1.0, first_order_final: bool = False
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022), midpoint variant: the 2M update with noise injected each step."""
    noise = _require_noise(noise, "sample_dpmpp_2m_sde")
    previous = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = _log_ratio(sigma, sigma_next)
        decay = -torch.expm1(-h - eta * h)  # 1 - exp(-(1 + eta) h)
        x = (sigma_next / sigma) * torch.exp(-eta * h) * x + decay * denoised
        last_step = i == len(sigmas) - 2
        if previous is not None and not (first_order_final and last_step):
            r = _log_ratio(sigmas[i - 1], sigma) / h
            x = x + 0.5 * decay / r * (denoised - previous)
        x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta * h)) ** 0.5
        previous = denoised
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, noise=None, callback=None, eta: float = 1.0, r: float = 0.5):
    """DPM-Solver++ SDE (k-diffusion): a stochastic two-stage step through sigma^(1-r) sigma_next^r; Euler onto 0."""
    noise = _require_noise(noise, "sample_dpmpp_sde")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        sigma_mid = sigma.log().lerp(sigma_next.log(), r).exp()
        sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, eta)
        x_mid = denoised + (sigma_down / sigma) * (x - denoised) + noise(sigma, sigma_mid) * sigma_up
        denoised_mid = denoiser(x_mid, sigma_mid)
        estimate = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_mid
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = estimate + (sigma_down / sigma) * (x - estimate) + noise(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def sample_ddim(
    denoiser,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    eta: float = 0.0,
    clip_denoised: float | None = None,
    landing_sigmas: torch.Tensor | None = None,
):
    """DDIM (Song et al. 2021) in sigma space: eta = 0 is Euler on the probability-flow ODE, eta = 1 DDPM's
    ancestral step. clip_denoised clamps x0 but keeps the network's noise estimate, as diffusers' clip_sample does.
    landing_sigmas[i], when given, is where step i lands before its latent is read at sigmas[i+1]: diffusers'
    DDIM steps to t - T//n, which trailing/linspace spacing can make differ from the next timestep."""
    if eta > 0:
        noise = _require_noise(noise, "sample_ddim with eta > 0")
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        target = sigmas[i + 1] if landing_sigmas is None else landing_sigmas[i]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        eps = to_d(x, sigma, denoised)
        if clip_denoised is not None:
            denoised = denoised.clamp(-clip_denoised, clip_denoised)
        sigma_down, sigma_up = ancestral_step(sigma, target, eta)
        x = denoised + eps * sigma_down
        if sigma_up > 0:
            x = x + noise(sigma, target) * sigma_up
        if target != sigmas[i + 1]:
            x = _reread(x, target, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, noise=None, callback=None, clip_denoised: float | None = None):
    """DDPM ancestral sampling (Ho et al. 2020): draw from the posterior q(x_next | x, x0) with its own variance
    ("fixed_small"); clip_denoised clamps x0 before the posterior, as diffusers' clip_sample does."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        if clip_denoised is not None:
            denoised = denoised.clamp(-clip_denoised, clip_denoised)
        kept = (sigma_next / sigma) ** 2  # share of (x - x0) the posterior mean keeps
        x = denoised + kept * (x - denoised)
        if sigma_next > 0:
            x = x + _require_noise(noise, "sample_ddpm")(sigma, sigma_next) * sigma_next * (1 - kept) ** 0.5
    return x


# Adams-Bashforth weights on the newest-first noise estimates, by order (PNDM's linear multistep part).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _v_from_denoised(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The velocity v = alpha * eps - sigma_vp * x0 (Salimans & Ho 2022) of VE sample x at sigma."""
    return (x / (1 + sigma**2) - denoised) * (1 + sigma**2) ** 0.5 / sigma


def _eps_from_v(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The noise estimate that velocity v implies for VE sample x at sigma."""
    return (v + sigma * x / (1 + sigma**2) ** 0.5) / (1 + sigma**2) ** 0.5


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, noise=None, callback=None, multistep_on: str = "eps"):
    """PLMS (Liu et al. 2022, PNDM) as Stable Diffusion runs it (diffusers' skip_prk_steps): a pseudo improved-Euler
    first step, then Adams-Bashforth of order up to 4; each step is a DDIM step. multistep_on="v" combines
    velocities and converts the result at the current step, as diffusers' PNDM does for v-prediction models."""
    if multistep_on not in ("eps", "v"):
        raise ValueError(f"multistep_on={multistep_on!r} is not supported; choose 'eps' or 'v'.")
    on_v = multistep_on == "v"

    def estimate(x, sigma, denoised):  # what the multistep formula combines
        return _v_from_denoised(x, sigma, denoised) if on_v else to_d(x, sigma, denoised)

    def slope(x, sigma, combined):  # the noise estimate (= dx/dsigma) a combined estimate implies at x
        return _eps_from_v(x, sigma, combined) if on_v else combined

    history: list[torch.Tensor] = []  # newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        _report(callback, i, sigmas, x, denoised)
        current = estimate(x, sigma, denoised)
        if i == 0 and len(sigmas) > 2:  # the extra evaluation: average the estimates at both ends of the first step
            x_euler = x + slope(x, sigma, current) * (sigma_next - sigma)
            at_end = estimate(x_euler, sigma_next, denoiser(x_euler, sigma_next))
            x = x + slope(x, sigma, (current + at_end) / 2) * (sigma_next - sigma)
            history = [current]
            continue
        history = (history + [current])[-4:]
        weights = _ADAMS_BASHFORTH[len(history)]
        combined = sum(weight * e for weight, e in zip(weights, reversed(history)))
        x = x + slope(x, sigma, combined) * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_plms_restarted(denoiser, x, sigmas, *, steps, multistep_on: str = "eps", noise=None, callback=None):
    """PLMS exactly as diffusers' PNDMScheduler steps it over a cut of its timestep list (img2img at strength < 1).

    `steps` holds one (sigma called at, sigma stepped from, sigma stepped to) per network call. Call 0 stores its
    estimate and latent; call 1 averages its estimate with call 0's and steps from call 0's latent (the improved-
    Euler pair, even when the cut left call 1 at another timestep); later calls use Adams-Bashforth over the
    estimates of calls 0, 2, 3, .... Between calls the latent is kept as diffusers keeps it (VP), so each call reads
    it at its own sigma, as diffusers does when the cut shifts the labels."""
    on_v = multistep_on == "v"
    latent = first_latent = x / (1 + sigmas[0] ** 2) ** 0.5
    history: list[torch.Tensor] = []
    for i, (at, start, end) in enumerate(steps):
        x = latent * (1 + at**2) ** 0.5
        denoised = denoiser(x, at)
        if callback is not None:
            callback(StepInfo(i, at, end, x, denoised))
        current = _v_from_denoised(x, at, denoised) if on_v else to_d(x, at, denoised)
        if i == 1:
            combined, base = (current + history[0]) / 2, first_latent
        else:
            history = (history + [current])[-4:]
            combined = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(history)], reversed(history)))
            base = latent
        x = base * (1 + start**2) ** 0.5
        slope = _eps_from_v(x, start, combined) if on_v else combined
        latent = (x + slope * (end - start)) / (1 + end**2) ** 0.5
    return latent * (1 + sigmas[-1] ** 2) ** 0.5


def _unipc_update(x, history, sigma_next, variant: str, corrector_target=None):
    """One UniPC update from history[0]'s sigma to sigma_next (Zhao et al. 2023, data prediction, B(h) = bh1/bh2).

    history is [(sigma, denoised), ...] newest first; its length is the order. With corrector_target (the denoised
    estimate at sigma_next) this is UniC, which refines x at sigma_next; without it, the predictor UniP."""
    (sigma, denoised), older = history[0], history[1:]
    log_sigma = sigma.double().log()
    h = log_sigma - sigma_next.double().log()  # step in t = -log(sigma)
    ratios = [(log_sigma - s.double().log()) / h for s, _ in older] + [torch.ones((), dtype=torch.float64)]
    ratios = torch.stack(ratios)
    phi_1 = torch.expm1(-h)
    b_h = phi_1 if variant == "bh2" else -h
    powers, rhs = [], []
    phi_k, factorial = phi_1 / -h - 1, 1
    for k in range(1, len(history) + 1):
        powers.append(ratios ** (k - 1))
        rhs.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / -h - 1 / factorial
    powers, rhs = torch.stack(powers), torch.stack(rhs)
    differences = [(d - denoised) / ratio for (_, d), ratio in zip(older, ratios)]
    x_next = (sigma_next / sigma) * x - phi_1.float() * denoised
    if corrector_target is not None:
        rhos = torch.linalg.solve(powers, rhs) if len(history) > 1 else torch.full((1,), 0.5, dtype=torch.float64)
        differences.append(corrector_target - denoised)
    elif len(history) == 1:
        return x_next
    else:
        rhos = torch.full((1,), 0.5, dtype=torch.float64) if len(history) == 2 else (
            torch.linalg.solve(powers[:-1, :-1], rhs[:-1])
        )
    correction = sum(rho.float() * difference for rho, difference in zip(rhos, differences))
    return x_next - b_h.float() * correction


@torch.no_grad()
def sample_unipc(
    denoiser,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
):
    """UniPC (Zhao et al. 2023): a multistep predictor plus a corrector that reuses each new evaluation, so it
    costs one network call per step; orders drop near the end when lower_order_final (diffusers' defaults)."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant={variant!r} is not supported; choose 'bh1' or 'bh2'.")
    steps = len(sigmas) - 1
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sigma, denoised), newest first
    x_before, last_order = x, 0
    for i in range(steps):
        denoised = denoiser(x, sigmas[i])
        if history and (i - 1) not in disable_corrector:
            x = _unipc_update(x_before, history[:last_order], sigmas[i], variant, corrector_target=denoised)
        _report(callback, i, sigmas, x, denoised)
        history = ([(sigmas[i], denoised)] + history)[:order]
        last_order = min(order, len(history), steps - i if lower_order_final else order)
        x_before = x
        x = _unipc_update(x, history[:last_order], sigmas[i + 1], variant)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser, x, sigmas, *, noise=None, callback=None, boundary_scalings: Sequence[tuple[float, float]] | None = None
):
    """Latent Consistency Model multistep sampling (Luo et al. 2023): jump to the consistency estimate of x0, then
    re-noise it to the next sigma. boundary_scalings[i] = (c_skip, c_out) of the consistency parametrisation
    c_skip * x_t + c_out * x0 at step i (None: the plain x0 estimate)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if boundary_scalings is not None:
            c_skip, c_out = boundary_scalings[i]
            denoised = c_skip * x / (sigma**2 + 1) ** 0.5 + c_out * denoised
        _report(callback, i, sigmas, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + _require_noise(noise, "sample_lcm")(sigma, sigma_next) * sigma_next
    return x


# k-diffusion style names -> functions: use these directly with any sigmas (e.g. from ldm.schedules).
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    fn.__name__: fn
    for fn in (
        sample_euler, sample_euler_ancestral, sample_heun, sample_dpm_2, sample_lms, sample_dpmpp_2m,
        sample_dpmpp_2m_sde, sample_dpmpp_sde, sample_ddim, sample_ddpm, sample_plms, sample_unipc, sample_lcm,
    )
}


@dataclass(frozen=True)
class SamplerName:
    """What a user-facing sampler name means: the diffusers scheduler class whose discretization it reproduces
    (spacing, sigma grid, order rules) and the config flags that select the variant."""

    scheduler: str
    flags: Mapping[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# Names users know (A1111 web UI, k-diffusion, diffusers classes, our function names) -> scheduler + flags.
SAMPLER_NAMES: dict[str, SamplerName] = {
    # A1111 web UI
    "Euler": SamplerName("EulerDiscreteScheduler"),
    "Euler Karras": SamplerName("EulerDiscreteScheduler", _KARRAS),
    "Euler a": SamplerName("EulerAncestralDiscreteScheduler"),
    "LMS": SamplerName("LMSDiscreteScheduler"),
    "LMS Karras": SamplerName("LMSDiscreteScheduler", _KARRAS),
    "Heun": SamplerName("HeunDiscreteScheduler"),
    "Heun Karras": SamplerName("HeunDiscreteScheduler", _KARRAS),
    "DPM2": SamplerName("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SamplerName("KDPM2DiscreteScheduler", _KARRAS),
    "DPM++ 2M": SamplerName("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SamplerName("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M Exponential": SamplerName("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
    "DPM++ 2M SDE": SamplerName("DPMSolverMultistepScheduler", _SDE),
    "DPM++ 2M SDE Karras": SamplerName("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    "DPM++ SDE": SamplerName("DPMSolverSDEScheduler"),
    "DPM++ SDE Karras": SamplerName("DPMSolverSDEScheduler", _KARRAS),
    "DDIM": SamplerName("DDIMScheduler"),
    "PLMS": SamplerName("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": SamplerName("UniPCMultistepScheduler"),
    "LCM": SamplerName("LCMScheduler"),
    "DDPM": SamplerName("DDPMScheduler"),
    # k-diffusion function names (discrete sigmas; add " Karras" names above for Karras grids)
    "sample_euler": SamplerName("EulerDiscreteScheduler"),
    "sample_euler_ancestral": SamplerName("EulerAncestralDiscreteScheduler"),
    "sample_heun": SamplerName("HeunDiscreteScheduler"),
    "sample_dpm_2": SamplerName("KDPM2DiscreteScheduler"),
    "sample_lms": SamplerName("LMSDiscreteScheduler"),
    "sample_dpmpp_2m": SamplerName("DPMSolverMultistepScheduler"),
    "sample_dpmpp_2m_sde": SamplerName("DPMSolverMultistepScheduler", _SDE),
    "sample_dpmpp_sde": SamplerName("DPMSolverSDEScheduler"),
    "sample_ddim": SamplerName("DDIMScheduler"),
    "sample_ddpm": SamplerName("DDPMScheduler"),
    "sample_plms": SamplerName("PNDMScheduler", {"skip_prk_steps": True}),
    "sample_unipc": SamplerName("UniPCMultistepScheduler"),
    "sample_lcm": SamplerName("LCMScheduler"),
}
# diffusers class names stand for themselves; their flags come from the config they are used with.
SAMPLER_NAMES.update(
    {
        scheduler: SamplerName(scheduler)
        for scheduler in sorted({name.scheduler for name in SAMPLER_NAMES.values()})
    }
)


def resolve_sampler_name(name: str) -> SamplerName:
    """The scheduler and flags a sampler name stands for; case and surrounding spaces do not matter."""
    if name in SAMPLER_NAMES:
        return SAMPLER_NAMES[name]
    by_folded_name = {known.strip().casefold(): meaning for known, meaning in SAMPLER_NAMES.items()}
    folded = name.strip().casefold()
    if folded in by_folded_name:
        return by_folded_name[folded]
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}.")
