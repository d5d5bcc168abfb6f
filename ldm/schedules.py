"""Noise schedules: the training schedule (betas -> alphas_cumprod) and the sigma grids samplers walk.

Samplers work in sigma (VE) space: x = x0 + sigma * eps, where sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod).
The network was trained on the VP latent x_t = x / sqrt(1 + sigma^2) at integer timesteps; this module maps
between the two and lays out inference steps the way diffusers' schedulers do, number for number, so a plan
built here feeds the UNet exactly the timesteps diffusers would.

Three layouts cover diffusers' scheduler families:
- "euler":     Euler, Euler ancestral, Heun, LMS, KDPM2, DPM++ SDE. Float timesteps (linspace keeps fractions);
               Karras/exponential grids span the spaced grid's ends; the network sees fractional timesteps.
- "ddim":      DDIM, PNDM, DDPM, LCM. Integer timesteps; the last step lands on the final alpha
               (1, or alphas_cumprod[0] with set_alpha_to_one=False).
- "multistep": DPM-Solver multistep, UniPC. n + 1 points with the one at t = 0 dropped (the solver lands on
               sigma 0 itself); Karras grids span the whole training table; integer timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
Spacing = Literal["linspace", "leading", "trailing"]
SigmaKind = Literal["discrete", "karras", "exponential"]
Layout = Literal["euler", "ddim", "multistep"]
Rounding = Literal["none", "round", "floor"]

SPACINGS = ("linspace", "leading", "trailing")
SIGMA_KINDS = ("discrete", "karras", "exponential")
LAYOUTS = ("euler", "ddim", "multistep")

# alphas_cumprod at the last step of a zero-terminal-SNR schedule: 0 would make sigma infinite, so it is nudged to
# 2^-24 (sigma = 4096), the value diffusers' Euler-family schedulers use for the same reason.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squared-cosine alpha_bar of Nichol & Dhariwal 2021 (improved DDPM), capped at max_beta."""

    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: BetaSchedule = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """Training betas in float32: "linear" (DDPM), "scaled_linear" (Stable Diffusion: linear in sqrt(beta)) or
    "squaredcos_cap_v2" (cosine; ignores beta_start/beta_end)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(
        f"beta_schedule={beta_schedule!r} is not supported; choose 'linear', 'scaled_linear' or 'squaredcos_cap_v2', "
        "or pass trained_betas."
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step is pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1): shift and scale sqrt(alphas_cumprod) so it ends at 0 and keeps its start."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete training schedule: alphas_cumprod[t] for t = 0 .. T-1, and its sigmas in VE space."""

    alphas_cumprod: torch.Tensor  # (T,) float32, decreasing in t

    @classmethod
    def from_betas(
        cls,
        betas: torch.Tensor,
        zero_terminal_snr: bool = False,
        terminal_alpha_cumprod: float = ZERO_SNR_ALPHA_CUMPROD,
    ) -> NoiseSchedule:
        """terminal_alpha_cumprod stands in for the exact 0 a zero-terminal-SNR rescale ends on."""
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float32), dim=0)
        if zero_terminal_snr:
            alphas_cumprod[-1] = terminal_alpha_cumprod
        return cls(alphas_cumprod)

    @classmethod
    def from_config(
        cls,
        beta_schedule: BetaSchedule = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        trained_betas=None,
        rescale_betas_zero_snr: bool = False,
        terminal_alpha_cumprod: float = ZERO_SNR_ALPHA_CUMPROD,
    ) -> NoiseSchedule:
        """The schedule a diffusers scheduler config describes (same argument names)."""
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
        else:
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        return cls.from_betas(betas, rescale_betas_zero_snr, terminal_alpha_cumprod)

    @classmethod
    def stable_diffusion(cls) -> NoiseSchedule:
        """SD 1.x / 2.x / XL: scaled_linear betas from 0.00085 to 0.012 over 1000 steps."""
        return cls.from_config("scaled_linear", 1000, 0.00085, 0.012)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """(T,) float32 VE sigma of every training timestep, increasing in t."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_at(self, timesteps) -> np.ndarray:
        """Sigma at (possibly fractional) timesteps, linear in t between table entries (as diffusers interpolates)."""
        table = self.sigmas.numpy()
        return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(table)), table)

    def timestep_of(self, sigmas) -> np.ndarray:
        """Fractional timestep of each sigma, interpolating log-sigma between table entries (k-diffusion's
        sigma_to_t; diffusers' `_sigma_to_t`). Clamped to [0, T-1]."""
        log_table = np.log(self.sigmas.numpy())  # float32, like diffusers' table: identical rounding
        log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
        low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
        weight = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
        return np.asarray((1 - weight) * low + weight * (low + 1))


def spaced_timesteps(
    num_steps: int,
    spacing: Spacing = "linspace",
    *,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    layout: Layout = "euler",
) -> np.ndarray:
    """Descending timesteps of the network evaluations, laid out as diffusers' `set_timesteps` does
    ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2, for the three spacings)."""
    _check_choice("timestep_spacing", spacing, SPACINGS)
    _check_choice("layout", layout, LAYOUTS)
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be between 1 and num_train_timesteps={num_train_timesteps}.")
    last = num_train_timesteps - 1
    # DPM-Solver/UniPC lay out one extra point and drop the one nearest t=0: the solver's last step lands on sigma 0.
    points = num_steps + 1 if layout == "multistep" else num_steps
    if spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        return np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
    if spacing == "linspace":
        if layout == "euler":  # fractional timesteps kept, computed in float32 as diffusers does
            ascending = np.linspace(0, last, points, dtype=np.float32).astype(np.float64)
        else:
            ascending = np.linspace(0, last, points).round()
    else:  # leading
        ascending = np.arange(points) * (num_train_timesteps // points) + float(steps_offset)
    descending = ascending[::-1]
    return descending[:num_steps].copy()


def lcm_timesteps(num_steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> np.ndarray:
    """Latent Consistency Model timesteps (Luo et al. 2023): num_steps picked evenly from the original_steps
    distillation grid t = k*T/original_steps - 1, as diffusers' LCMScheduler picks them."""
    if not 1 <= num_steps <= original_steps <= num_train_timesteps:
        raise ValueError(
            f"LCM needs 1 <= num_steps ({num_steps}) <= original_inference_steps ({original_steps}) "
            f"<= num_train_timesteps ({num_train_timesteps})."
        )
    grid = np.arange(1, original_steps + 1) * (num_train_timesteps // original_steps) - 1
    picks = np.floor(np.linspace(0, original_steps, num=num_steps, endpoint=False)).astype(np.int64)
    return grid[::-1][picks].astype(np.float64)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5: sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    max_root, min_root = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_root + ramp * (min_root - max_root)) ** rho


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Sigmas evenly spaced in log sigma, from sigma_max down to sigma_min (k-diffusion's get_sigmas_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


@dataclass(frozen=True, eq=False)
class StepGrid:
    """Where sampling goes: sigmas[i] -> sigmas[i+1], with the network fed timesteps[i] at sigmas[i]."""

    sigmas: torch.Tensor  # (n + 1,) float32, descending; the last is where sampling ends (0, or a final sigma)
    timesteps: torch.Tensor  # (n,) float32, the network timestep at each of sigmas[:-1]


def _round_timesteps(timesteps: np.ndarray, rounding: Rounding) -> np.ndarray:
    _check_choice("timestep_rounding", rounding, ("none", "round", "floor"))
    if rounding == "round":
        return np.round(timesteps)
    if rounding == "floor":
        return np.floor(timesteps)
    return timesteps


def sampling_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    spacing: Spacing = "linspace",
    sigma_kind: SigmaKind = "discrete",
    steps_offset: int = 0,
    layout: Layout = "euler",
    final_sigma: float = 0.0,
    timestep_rounding: Rounding | None = None,
    sigma_range: tuple[float | None, float | None] = (None, None),
) -> StepGrid:
    """The sampling sigmas and network timesteps of `num_steps` steps, equal to what the diffusers scheduler of
    `layout`'s family computes for the same spacing and sigma kind.

    sigma_kind "discrete" takes the schedule's sigmas at the spaced timesteps; "karras" and "exponential" lay a new
    grid between sigma_range (default: the spaced grid's ends for the "euler" layout, the whole table for
    "multistep") and give the network the matching fractional timesteps, rounded per `timestep_rounding` (default:
    none for "euler"; for "multistep" rounded on Karras grids and truncated otherwise, as diffusers' int64 cast does).
    """
    _check_choice("sigma_kind", sigma_kind, SIGMA_KINDS)
    timesteps = spaced_timesteps(
        num_steps, spacing, num_train_timesteps=schedule.num_train_timesteps, steps_offset=steps_offset, layout=layout
    )
    sigmas = schedule.sigma_at(timesteps)
    if sigma_kind != "discrete":
        if layout == "ddim":
            raise ValueError(f"sigma_kind={sigma_kind!r} needs the 'euler' or 'multistep' layout; DDIM-family "
                             "schedulers step on the training timesteps only.")
        ends = (sigmas[-1], sigmas[0]) if layout == "euler" else (schedule.sigma_min, schedule.sigma_max)
        sigma_min = sigma_range[0] if sigma_range[0] is not None else float(ends[0])
        sigma_max = sigma_range[1] if sigma_range[1] is not None else float(ends[1])
        grid = karras_sigmas if sigma_kind == "karras" else exponential_sigmas
        sigmas = grid(num_steps, sigma_min, sigma_max)
        if timestep_rounding is None:
            timestep_rounding = "none" if layout == "euler" else ("round" if sigma_kind == "karras" else "floor")
        timesteps = _round_timesteps(schedule.timestep_of(sigmas), timestep_rounding)
    return StepGrid(
        sigmas=torch.from_numpy(np.concatenate([sigmas, [final_sigma]]).astype(np.float32)),
        timesteps=torch.from_numpy(timesteps.astype(np.float32)),
    )
