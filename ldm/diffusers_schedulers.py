"""diffusers scheduler interop: a scheduler config, a live scheduler or a sampler name -> a SamplingPlan.

Design choice: a diffusers scheduler (config dict or object, e.g. after
`pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`) is *mapped* to our sampler
function and sigma grid by its class and config; it is never run. The plan then reproduces that scheduler's
numbers: the sigmas, the timesteps the UNet sees, the init_noise_sigma scaling, the VP/VE convention of the
latents it returns. An unsupported class or flag raises a ValueError naming it.

Known differences from diffusers (documented rather than imitated):
- zero-terminal-SNR DDIM/DDPM/LCM: alphas_cumprod[-1] is 2^-48 here (sigma must stay finite), 0 in diffusers:
  equal to float32 precision for v-prediction (diffusers' epsilon-prediction gives inf there anyway);
- PNDM with a spacing where T // n is not the gap between timesteps (trailing/linspace, n not dividing T):
  diffusers steps to t - T//n and then relabels; our PLMS steps between its own timesteps;
- DPMSolverSDEScheduler draws Brownian-tree noise (torchsde); ours comes from the injected noise source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ldm.denoisers import DiscreteTimeDenoiser
from ldm.samplers import (
    SamplerName,
    resolve_sampler_name,
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_plms,
    sample_plms_restarted,
    sample_unipc,
)
from ldm.schedules import (
    ZERO_SNR_ALPHA_CUMPROD,
    NoiseSchedule,
    StepGrid,
    lcm_timesteps,
    sampling_sigmas,
    spaced_timesteps,
)

# Options that hold one entry per step: they are cut along with the sigmas when a plan starts mid-way (img2img).
PER_STEP_OPTIONS = ("landing_sigmas", "boundary_scalings")


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Everything a pipeline needs to sample: which sampler with which options over which sigmas, the timesteps
    the network must see there, and how latents in diffusers' convention map into and out of sigma space."""

    sampler: Callable[..., torch.Tensor]
    options: Mapping[str, Any]
    sigmas: torch.Tensor  # (n + 1,) float32 on the CPU
    timesteps: torch.Tensor  # (n,) float32: the network timestep at each of sigmas[:-1]
    input_scale: float  # x = initial noise latents * input_scale (diffusers' init_noise_sigma, or the VP -> VE factor)
    output_scale: float  # final latents = x * output_scale (1, or VE -> VP when the scheduler ends on a VP latent)
    schedule: NoiseSchedule
    prediction_type: str

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def denoiser(self, net: Callable[..., torch.Tensor], dtype: torch.dtype | None = None) -> DiscreteTimeDenoiser:
        """The denoiser of a network trained on this plan's schedule and prediction type."""
        return DiscreteTimeDenoiser(net, self.schedule, self.prediction_type, dtype)

    def with_timesteps(self, denoiser: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Wrap `denoiser` so that at each of the plan's sigmas it receives `timestep=` the exact timestep diffusers
        feeds there (other sigmas, e.g. DPM2 midpoints, get timestep=None: derived from sigma). A guidance wrapper
        in between must pass keyword arguments through."""
        sigmas, timesteps = self.sigmas[:-1], self.timesteps

        def pinned(x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
            sigma_cpu = torch.as_tensor(sigma, dtype=sigmas.dtype).detach().cpu()
            timestep = None
            if sigma_cpu.numel() == 1:
                matches = torch.isclose(sigmas, sigma_cpu.reshape(()), rtol=1e-6, atol=0.0).nonzero()
                timestep = timesteps[matches[0, 0]] if len(matches) else None
            return denoiser(x, sigma, timestep=timestep, **kwargs)

        return pinned

    def for_strength(self, strength: float) -> SamplingPlan:
        """The last int(n * strength) steps, as diffusers' img2img/inpaint pipelines keep them. PLMS (PNDMScheduler,
        SD's default) is cut in diffusers' timestep list [t0, t1, t1, t2, ...] with its step counter restarted,
        which `sample_plms_restarted` replays."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength={strength} must be in (0, 1].")
        kept = min(int(self.num_steps * strength), self.num_steps)
        if kept == 0:
            raise ValueError(
                f"strength={strength} keeps no step of {self.num_steps}: raise strength or num_inference_steps."
            )
        start = self.num_steps - kept
        if start > 0 and self.sampler is sample_plms:
            return self._plms_cut(start)
        options = {k: (v[start:] if k in PER_STEP_OPTIONS and v is not None else v) for k, v in self.options.items()}
        return replace(self, options=options, sigmas=self.sigmas[start:], timesteps=self.timesteps[start:])

    def _plms_cut(self, start: int) -> SamplingPlan:
        calls = [0, 1, *range(1, self.num_steps)][start:]  # diffusers' PNDM timesteps as plan indices: t1 twice
        steps = [(at, at - 1, at) if k == 1 else (at, at, at + 1) for k, at in enumerate(calls)]
        options = {"multistep_on": self.options["multistep_on"],
                   "steps": tuple((self.sigmas[a], self.sigmas[b], self.sigmas[c]) for a, b, c in steps)}
        return replace(self, sampler=sample_plms_restarted, options=options, sigmas=self.sigmas[calls[0]:],
                       timesteps=self.timesteps[calls[0]:])


def run(
    plan: SamplingPlan,
    denoiser: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    *,
    image_latents: torch.Tensor | None = None,
    noise: Callable | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Sample with `plan` and return the final latents in diffusers' convention (what its pipeline decodes).

    Text-to-image: `latents` is the initial N(0, I) draw (before init_noise_sigma). Image-to-image: `latents` is the
    noise and `image_latents` the clean latents it is added to at the plan's first sigma (use plan.for_strength).
    `noise` feeds the samplers that add fresh noise (see ldm.samplers.TorchNoise); `callback` gets a StepInfo.
    """
    start = latents.to(torch.float32)
    if image_latents is None:
        x = start * plan.input_scale
    else:
        x = image_latents.to(torch.float32) + start * plan.sigmas[0]
    x = plan.sampler(plan.with_timesteps(denoiser), x, plan.sigmas, noise=noise, callback=callback, **plan.options)
    return (x * plan.output_scale).to(latents.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Scheduler configs: the defaults of every key we read, equal to diffusers' __init__ defaults (a test checks).

_COMMON = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    prediction_type="epsilon", steps_offset=0,
)
_SIGMA_GRIDS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_ZERO_SNR = dict(rescale_betas_zero_snr=False)
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)
_CLIP = dict(clip_sample=True, clip_sample_range=1.0)

SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        **_COMMON, **_ZERO_SNR, **_CLIP, "timestep_spacing": "leading", "set_alpha_to_one": True, "thresholding": False,
    },
    "PNDMScheduler": {**_COMMON, "timestep_spacing": "leading", "skip_prk_steps": False, "set_alpha_to_one": False},
    "DDPMScheduler": {
        **_COMMON, **_ZERO_SNR, **_CLIP, "timestep_spacing": "leading", "variance_type": "fixed_small",
        "thresholding": False,
    },
    "LCMScheduler": {
        **_COMMON, **_ZERO_SNR, **_SD_BETAS, **_CLIP, "beta_schedule": "scaled_linear", "clip_sample": False,
        "original_inference_steps": 50, "timestep_scaling": 10.0, "thresholding": False,
    },
    "EulerDiscreteScheduler": {
        **_COMMON, **_ZERO_SNR, **_SIGMA_GRIDS, "timestep_spacing": "linspace", "sigma_min": None, "sigma_max": None,
        "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {**_COMMON, **_ZERO_SNR, "timestep_spacing": "linspace"},
    "LMSDiscreteScheduler": {**_COMMON, **_SIGMA_GRIDS, "timestep_spacing": "linspace"},
    "HeunDiscreteScheduler": {
        **_COMMON, **_SIGMA_GRIDS, **_SD_BETAS, **_CLIP, "clip_sample": False, "timestep_spacing": "linspace",
    },
    "KDPM2DiscreteScheduler": {**_COMMON, **_SIGMA_GRIDS, **_SD_BETAS, "timestep_spacing": "linspace"},
    "DPMSolverSDEScheduler": {
        **_COMMON, **_SIGMA_GRIDS, **_SD_BETAS, "timestep_spacing": "linspace", "noise_sampler_seed": None,
    },
    "DPMSolverMultistepScheduler": {
        **_COMMON, **_ZERO_SNR, **_SIGMA_GRIDS, "timestep_spacing": "linspace", "solver_order": 2,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
        "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "variance_type": None, "thresholding": False, "use_dynamic_shifting": False,
    },
    "UniPCMultistepScheduler": {
        **_COMMON, **_ZERO_SNR, **_SIGMA_GRIDS, "timestep_spacing": "linspace", "solver_order": 2, "predict_x0": True,
        "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [], "solver_p": None,
        "use_flow_sigmas": False, "final_sigmas_type": "zero", "thresholding": False, "sigma_min": None,
        "sigma_max": None, "use_dynamic_shifting": False,
    },
}

# Values our samplers reproduce, for every key where not all values are supported.
_SUPPORTED_VALUES: dict[str, tuple] = {
    "thresholding": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero", "sigma_min"),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None, "fixed_small"),
    "solver_p": (None,),
    "predict_x0": (True,),
    "skip_prk_steps": (True,),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
}

# SD 1.x's scheduler config: the base a sampler name is applied to when no model config is given.
STABLE_DIFFUSION_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon",
}


def _settings(scheduler: str, config: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """The effective settings of `scheduler` built from `config` the way diffusers' from_config does: keys the
    config only holds as someone else's defaults (`_use_default_values`) give way to this class's defaults."""
    if scheduler not in SCHEDULER_DEFAULTS:
        raise ValueError(
            f"scheduler class {scheduler!r} is not supported; supported: {', '.join(SCHEDULER_DEFAULTS)}."
        )
    defaults = SCHEDULER_DEFAULTS[scheduler]
    defaulted = set(config.get("_use_default_values", ()))
    settings = dict(defaults)
    settings.update({k: v for k, v in config.items() if k in defaults and k not in defaulted})
    settings.update({k: v for k, v in flags.items() if k in defaults})
    for key, supported in _SUPPORTED_VALUES.items():
        if key in settings and settings[key] not in supported:
            raise ValueError(
                f"{scheduler} with {key}={settings[key]!r} is not supported by ldm's samplers; "
                f"supported values: {', '.join(map(repr, supported))}."
            )
    return settings


# diffusers' DDIM, DDPM and LCM keep alphas_cumprod[-1] = 0 after a zero-SNR rescale (the others use 2^-24);
# 2^-48 stands for that 0: sigma = 2^24 stays finite and sqrt(alphas_cumprod) = 6e-8 is 0 to float32 precision.
_EXACT_ZERO_SNR = {"DDIMScheduler", "DDPMScheduler", "LCMScheduler"}
NEAR_ZERO_ALPHA_CUMPROD = 2.0**-48


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The training schedule a diffusers scheduler config describes."""
    exact_zero = config.get("_class_name") in _EXACT_ZERO_SNR
    return NoiseSchedule.from_config(
        beta_schedule=config.get("beta_schedule", "linear"),
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 0.0001),
        beta_end=config.get("beta_end", 0.02),
        trained_betas=config.get("trained_betas"),
        rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
        terminal_alpha_cumprod=NEAR_ZERO_ALPHA_CUMPROD if exact_zero else ZERO_SNR_ALPHA_CUMPROD,
    )


def _sigma_kind(settings: Mapping[str, Any]) -> str:
    if settings.get("use_karras_sigmas") and settings.get("use_exponential_sigmas"):
        raise ValueError("use_karras_sigmas and use_exponential_sigmas cannot both be set.")
    if settings.get("use_karras_sigmas"):
        return "karras"
    return "exponential" if settings.get("use_exponential_sigmas") else "discrete"


def _plan(sampler, options, grid: StepGrid, schedule, settings, input_scale, output_scale) -> SamplingPlan:
    return SamplingPlan(
        sampler=sampler, options=options, sigmas=grid.sigmas, timesteps=grid.timesteps,
        input_scale=float(input_scale), output_scale=float(output_scale), schedule=schedule,
        prediction_type=settings["prediction_type"],
    )


def _vp_plan(sampler, options, grid: StepGrid, schedule, settings) -> SamplingPlan:
    """Schedulers that keep VP latents: x = latents * sqrt(1 + sigma_0^2) in, latents = x / sqrt(1 + sigma_n^2) out."""
    sigmas = grid.sigmas
    return _plan(
        sampler, options, grid, schedule, settings, (sigmas[0] ** 2 + 1) ** 0.5, 1 / (sigmas[-1] ** 2 + 1) ** 0.5
    )


def _grid_at(schedule: NoiseSchedule, timesteps: np.ndarray, final_sigma: float) -> StepGrid:
    sigmas = np.concatenate([schedule.sigma_at(timesteps), [final_sigma]])
    return StepGrid(torch.from_numpy(sigmas.astype(np.float32)), torch.from_numpy(timesteps.astype(np.float32)))


def _final_alpha_sigma(schedule: NoiseSchedule, settings) -> float:
    """Where DDIM/PNDM's last step lands: alpha = 1 (sigma 0), or alphas_cumprod[0] when set_alpha_to_one=False."""
    return 0.0 if settings["set_alpha_to_one"] else schedule.sigma_min


def _euler_family(sampler, options=None, rounding=None):
    """Euler, Euler ancestral, Heun, LMS, KDPM2, DPM++ SDE: VE latents scaled by init_noise_sigma."""

    def build(settings, schedule, num_steps, overrides) -> SamplingPlan:
        final = schedule.sigma_min if settings.get("final_sigmas_type") == "sigma_min" else 0.0
        kind = _sigma_kind(settings)
        grid = sampling_sigmas(
            schedule, num_steps, spacing=settings["timestep_spacing"], sigma_kind=kind,
            steps_offset=settings["steps_offset"], layout="euler", final_sigma=final,
            timestep_rounding=rounding if kind == "karras" else None,
            sigma_range=(settings.get("sigma_min"), settings.get("sigma_max")),
        )
        if settings.get("clip_sample"):
            raise ValueError(f"clip_sample=True is not supported with {sampler.__name__}; set clip_sample=False.")
        sigma_max = grid.sigmas.max()
        linear_start = settings["timestep_spacing"] in ("linspace", "trailing")
        init_noise_sigma = sigma_max if linear_start else (sigma_max**2 + 1) ** 0.5  # diffusers' own rule
        return _plan(sampler, {**(options or {}), **overrides}, grid, schedule, settings, init_noise_sigma, 1.0)

    return build


def _ddim(settings, schedule, num_steps, overrides) -> SamplingPlan:
    train_steps = schedule.num_train_timesteps
    timesteps = spaced_timesteps(
        num_steps, settings["timestep_spacing"], num_train_timesteps=train_steps,
        steps_offset=settings["steps_offset"], layout="ddim",
    )
    final = _final_alpha_sigma(schedule, settings)
    grid = _grid_at(schedule, timesteps, final)
    targets = timesteps - train_steps // num_steps  # diffusers' DDIM steps to t - T//n, not to the next timestep
    landing = np.where(targets >= 0, schedule.sigma_at(np.maximum(targets, 0)), final)
    landing = torch.from_numpy(landing.astype(np.float32))
    options = {
        "clip_denoised": settings["clip_sample_range"] if settings["clip_sample"] else None,
        "landing_sigmas": None if torch.equal(landing, grid.sigmas[1:]) else landing,
        **overrides,
    }
    return _vp_plan(sample_ddim, options, grid, schedule, settings)


def _pndm(settings, schedule, num_steps, overrides) -> SamplingPlan:
    if settings["prediction_type"] == "sample":
        raise ValueError("PNDMScheduler supports prediction_type 'epsilon' or 'v_prediction', not 'sample'.")
    timesteps = spaced_timesteps(
        num_steps, settings["timestep_spacing"], num_train_timesteps=schedule.num_train_timesteps,
        steps_offset=settings["steps_offset"], layout="ddim",
    )
    grid = _grid_at(schedule, timesteps, _final_alpha_sigma(schedule, settings))
    # diffusers' PNDM runs its multistep formula on the raw network output, so on v for v-prediction models
    options = {"multistep_on": "v" if settings["prediction_type"] == "v_prediction" else "eps", **overrides}
    return _vp_plan(sample_plms, options, grid, schedule, settings)


def _ddpm(settings, schedule, num_steps, overrides) -> SamplingPlan:
    timesteps = spaced_timesteps(
        num_steps, settings["timestep_spacing"], num_train_timesteps=schedule.num_train_timesteps,
        steps_offset=settings["steps_offset"], layout="ddim",
    )
    options = {"clip_denoised": settings["clip_sample_range"] if settings["clip_sample"] else None, **overrides}
    return _vp_plan(sample_ddpm, options, _grid_at(schedule, timesteps, 0.0), schedule, settings)


def _lcm(settings, schedule, num_steps, overrides) -> SamplingPlan:
    if settings["clip_sample"]:
        raise ValueError("LCMScheduler with clip_sample=True is not supported; set clip_sample=False.")
    timesteps = lcm_timesteps(num_steps, settings["original_inference_steps"], schedule.num_train_timesteps)
    sigma_data = 0.5  # the consistency-model boundary condition of Song et al. 2023, on scaled timesteps

    def scalings(t: float) -> tuple[float, float]:
        scaled = t * settings["timestep_scaling"]
        return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5

    options = {"boundary_scalings": [scalings(float(t)) for t in timesteps], **overrides}
    return _vp_plan(sample_lcm, options, _grid_at(schedule, timesteps, 0.0), schedule, settings)


def _multistep_grid(settings, schedule, num_steps, rounding=None) -> StepGrid:
    kind = _sigma_kind(settings)
    final = schedule.sigma_min if settings["final_sigmas_type"] == "sigma_min" else 0.0
    return sampling_sigmas(
        schedule, num_steps, spacing=settings["timestep_spacing"], sigma_kind=kind,
        steps_offset=settings["steps_offset"], layout="multistep", final_sigma=final, timestep_rounding=rounding,
        sigma_range=(settings.get("sigma_min"), settings.get("sigma_max")),
    )


def _dpm_solver(settings, schedule, num_steps, overrides) -> SamplingPlan:
    order, sde = settings["solver_order"], settings["algorithm_type"] == "sde-dpmsolver++"
    if settings["solver_type"] != "midpoint" or order not in ((2,) if sde else (1, 2)):
        raise ValueError(
            f"DPMSolverMultistepScheduler with solver_order={order}, solver_type={settings['solver_type']!r} and "
            f"algorithm_type={settings['algorithm_type']!r} is not supported; use solver_type='midpoint' and "
            "solver_order=2 (or 1 for 'dpmsolver++')."
        )
    # diffusers rounds Karras timesteps except for the cosine schedule, where its int64 cast truncates them
    cosine_karras = settings["beta_schedule"] == "squaredcos_cap_v2" and _sigma_kind(settings) == "karras"
    grid = _multistep_grid(settings, schedule, num_steps, rounding="floor" if cosine_karras else None)
    if order == 1:
        return _vp_plan(sample_euler, dict(overrides), grid, schedule, settings)
    first_order_final = settings["euler_at_final"] or (settings["lower_order_final"] and num_steps < 15)
    options = {"first_order_final": first_order_final, **overrides}
    return _vp_plan(sample_dpmpp_2m_sde if sde else sample_dpmpp_2m, options, grid, schedule, settings)


def _unipc(settings, schedule, num_steps, overrides) -> SamplingPlan:
    grid = _multistep_grid(settings, schedule, num_steps)
    if settings["final_sigmas_type"] == "sigma_min" and _sigma_kind(settings) != "discrete":
        grid = StepGrid(torch.cat([grid.sigmas[:-1], grid.sigmas[-2:-1]]), grid.timesteps)  # diffusers repeats it
    options = {
        "order": settings["solver_order"], "variant": settings["solver_type"],
        "lower_order_final": settings["lower_order_final"], "disable_corrector": tuple(settings["disable_corrector"]),
        **overrides,
    }
    return _vp_plan(sample_unipc, options, grid, schedule, settings)


_BUILDERS: dict[str, Callable[..., SamplingPlan]] = {
    "EulerDiscreteScheduler": _euler_family(sample_euler),
    "EulerAncestralDiscreteScheduler": _euler_family(sample_euler_ancestral),
    "HeunDiscreteScheduler": _euler_family(sample_heun),
    "LMSDiscreteScheduler": _euler_family(sample_lms),
    "KDPM2DiscreteScheduler": _euler_family(sample_dpm_2, rounding="round"),
    "DPMSolverSDEScheduler": _euler_family(sample_dpmpp_sde),
    "DDIMScheduler": _ddim,
    "PNDMScheduler": _pndm,
    "DDPMScheduler": _ddpm,
    "LCMScheduler": _lcm,
    "DPMSolverMultistepScheduler": _dpm_solver,
    "UniPCMultistepScheduler": _unipc,
}


def _build(scheduler: str, config: Mapping[str, Any], flags: Mapping[str, Any], num_steps: int, overrides):
    settings = _settings(scheduler, config, flags)
    schedule = schedule_from_config({**settings, "_class_name": scheduler})
    return _BUILDERS[scheduler](settings, schedule, num_steps, overrides)


def plan_from_config(config: Mapping[str, Any], num_steps: int, **sampler_options) -> SamplingPlan:
    """The plan of the scheduler a diffusers config describes (`_class_name` names the class). sampler_options
    override the sampler's options, e.g. eta=0.5 for DDIM (a pipeline argument in diffusers, not a config key)."""
    if "_class_name" not in config:
        raise ValueError("the scheduler config has no '_class_name': say which diffusers scheduler it configures.")
    return _build(config["_class_name"], config, {}, num_steps, sampler_options)


def plan_from_scheduler(scheduler, num_steps: int, **sampler_options) -> SamplingPlan:
    """The plan of a live diffusers scheduler object (its class and config; the object itself is not run)."""
    return _build(type(scheduler).__name__, scheduler.config, {}, num_steps, sampler_options)


def plan_for(sampler, num_steps: int, base_config: Mapping[str, Any] | None = None, **sampler_options) -> SamplingPlan:
    """A plan from what a user passes as the sampler: a name ("DPM++ 2M Karras", "Euler a", "sample_dpmpp_2m",
    "DDIMScheduler"), a diffusers scheduler config dict, or a live diffusers scheduler.

    A name is applied to `base_config` (the model's scheduler config: betas, prediction type, steps_offset, ...;
    Stable Diffusion 1.x's by default) as `<Class>.from_config(base_config, **flags)` would be."""
    if isinstance(sampler, str):
        meaning: SamplerName = resolve_sampler_name(sampler)
        base = STABLE_DIFFUSION_CONFIG if base_config is None else base_config
        return _build(meaning.scheduler, base, meaning.flags, num_steps, sampler_options)
    if isinstance(sampler, Mapping):
        return plan_from_config(sampler, num_steps, **sampler_options)
    if hasattr(sampler, "config") and hasattr(sampler, "set_timesteps"):
        return plan_from_scheduler(sampler, num_steps, **sampler_options)
    raise ValueError(
        f"cannot make a sampling plan from {type(sampler).__name__}: pass a sampler name, a diffusers scheduler "
        "config dict or a diffusers scheduler."
    )
