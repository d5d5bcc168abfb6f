"""Schedules: betas, zero-SNR rescale, sigma <-> timestep maps and step grids, checked against diffusers'
schedulers on the same settings and against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.schedules import (
    ZERO_SNR_ALPHA_CUMPROD,
    NoiseSchedule,
    exponential_sigmas,
    karras_sigmas,
    lcm_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    sampling_sigmas,
    spaced_timesteps,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(beta_schedule):
    reference = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    ours = make_betas(beta_schedule, 1000, 0.00085, 0.012)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference.betas)


def test_unknown_beta_schedule_names_the_choices():
    with pytest.raises(ValueError, match="scaled_linear"):
        make_betas("sigmoid")


def test_zero_terminal_snr_rescale():
    betas = make_betas("scaled_linear")
    rescaled = rescale_zero_terminal_snr(betas)
    sqrt_alpha_bar = torch.cumprod(1 - rescaled.double(), 0).sqrt()
    original = torch.cumprod(1 - betas.double(), 0).sqrt()
    # closed form: ends at exactly zero SNR, keeps the first value, stays an affine map of the original curve
    assert sqrt_alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert sqrt_alpha_bar[0].item() == pytest.approx(original[0].item(), rel=1e-6)
    affine = (original - original[-1]) / (original[0] - original[-1]) * original[0]
    torch.testing.assert_close(sqrt_alpha_bar, affine, atol=1e-6, rtol=0)
    reference = diffusers.EulerDiscreteScheduler(**SD_BETAS, rescale_betas_zero_snr=True)
    schedule = NoiseSchedule.from_betas(betas, zero_terminal_snr=True)
    assert schedule.alphas_cumprod[-1].item() == ZERO_SNR_ALPHA_CUMPROD
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-7, rtol=1e-6)


def test_sigma_timestep_maps():
    schedule = NoiseSchedule.stable_diffusion()
    table = schedule.sigmas.numpy()
    integers = np.arange(1000)
    np.testing.assert_allclose(schedule.timestep_of(table), integers, atol=1e-4)
    np.testing.assert_array_equal(schedule.sigma_at(integers), table.astype(np.float64))
    # log-sigma interpolation: halfway in log sigma between two entries is halfway in t
    midpoint = np.exp((np.log(table[10].astype(np.float64)) + np.log(table[11].astype(np.float64))) / 2)
    assert schedule.timestep_of(midpoint) == pytest.approx(10.5, abs=1e-4)
    # out of range clamps to the ends, as diffusers' _sigma_to_t does
    assert schedule.timestep_of([1e-6, 1e6]).tolist() == [0.0, 999.0]
    reference = diffusers.EulerDiscreteScheduler(**SD_BETAS)
    probes = np.geomspace(0.02, 14.0, 37)
    expected = [reference._sigma_to_t(s, np.log(table)) for s in probes]
    np.testing.assert_allclose(schedule.timestep_of(probes), expected, rtol=0, atol=1e-9)


FAMILIES = {  # layout -> a diffusers scheduler that lays out its timesteps that way
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "multistep": "DPMSolverMultistepScheduler",
}


@pytest.mark.parametrize("layout", sorted(FAMILIES))
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 4, 7, 10, 30])
def test_spaced_timesteps_match_diffusers(layout, spacing, num_steps):
    reference = getattr(diffusers, FAMILIES[layout])(**SD_BETAS, timestep_spacing=spacing, steps_offset=1)
    reference.set_timesteps(num_steps)
    ours = spaced_timesteps(num_steps, spacing, steps_offset=1, layout=layout)
    np.testing.assert_array_equal(ours, reference.timesteps.numpy().astype(np.float64))


def test_spacing_and_step_count_errors():
    with pytest.raises(ValueError, match="'linspace', 'leading', 'trailing'"):
        spaced_timesteps(10, "uniform")
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        spaced_timesteps(1001)


SIGMA_CASES = [  # (diffusers class, its flags, our layout, our sigma kind, timestep rounding); KDPM2's in test_samplers
    ("EulerDiscreteScheduler", {}, "euler", "discrete", None),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler", "karras", None),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, "euler", "exponential", None),
    ("DPMSolverMultistepScheduler", {}, "multistep", "discrete", None),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "multistep", "karras", None),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, "multistep", "exponential", None),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "multistep", "karras", None),
]


@pytest.mark.parametrize("scheduler, flags, layout, kind, rounding", SIGMA_CASES)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [4, 25])
def test_sampling_sigmas_match_diffusers(scheduler, flags, layout, kind, rounding, spacing, num_steps):
    reference = getattr(diffusers, scheduler)(**SD_BETAS, timestep_spacing=spacing, steps_offset=1, **flags)
    reference.set_timesteps(num_steps)
    grid = sampling_sigmas(
        NoiseSchedule.stable_diffusion(), num_steps, spacing=spacing, sigma_kind=kind, steps_offset=1,
        layout=layout, timestep_rounding=rounding,
    )
    torch.testing.assert_close(grid.sigmas, reference.sigmas, atol=0, rtol=1e-6)
    torch.testing.assert_close(grid.timesteps, reference.timesteps.float(), atol=1e-4, rtol=0)


def test_karras_and_exponential_grids_closed_form():
    sigmas = karras_sigmas(9, 0.03, 14.6, rho=7.0)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    np.testing.assert_allclose(np.diff(sigmas ** (1 / 7)), np.diff(sigmas ** (1 / 7))[0], rtol=1e-9)
    exponential = exponential_sigmas(9, 0.03, 14.6)
    np.testing.assert_allclose(np.diff(np.log(exponential)), np.log(0.03 / 14.6) / 8, rtol=1e-9)


def test_final_sigma_and_sigma_range():
    schedule = NoiseSchedule.stable_diffusion()
    grid = sampling_sigmas(schedule, 5, sigma_kind="karras", final_sigma=schedule.sigma_min, sigma_range=(0.1, 10.0))
    assert grid.sigmas[0].item() == pytest.approx(10.0) and grid.sigmas[-2].item() == pytest.approx(0.1)
    assert grid.sigmas[-1].item() == pytest.approx(schedule.sigma_min)
    assert grid.sigmas.shape == (6,) and grid.timesteps.shape == (5,)
    with pytest.raises(ValueError, match="layout"):
        sampling_sigmas(schedule, 5, sigma_kind="karras", layout="ddim")


@pytest.mark.parametrize("num_steps, original_steps", [(1, 50), (4, 50), (8, 50), (6, 20)])
def test_lcm_timesteps_match_diffusers(num_steps, original_steps):
    reference = diffusers.LCMScheduler(original_inference_steps=original_steps)
    reference.set_timesteps(num_steps)
    np.testing.assert_array_equal(lcm_timesteps(num_steps, original_steps), reference.timesteps.numpy())
