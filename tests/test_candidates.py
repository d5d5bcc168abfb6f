"""Choosing one image among candidates (ldm.candidates): seeds, and the fit score in closed form."""

import math

import pytest
import torch

from ldm.candidates import (
    CANDIDATE_SEED_STRIDE, LIKELIHOOD_WEIGHT, SCORING_TIMESTEP_SHARES, candidate_generators, prompt_fit,
)
from ldm.schedules import NoiseSchedule


def test_candidate_generators_keep_the_image_generator_first_and_never_share_noise():
    images = [torch.Generator().manual_seed(seed) for seed in (7, 8)]
    drawn = candidate_generators(images, 3)
    assert drawn[0] is images[0] and drawn[3] is images[1]
    assert drawn[1].initial_seed() == 7 + CANDIDATE_SEED_STRIDE
    assert drawn[5].initial_seed() == (8 + 2 * CANDIDATE_SEED_STRIDE) % 2**32
    noise = torch.stack([torch.randn(4, generator=generator) for generator in drawn])
    assert torch.cdist(noise, noise).add(torch.eye(6)).min() > 0


class ShrinkingDenoiser:
    """D(x, sigma) = factor * x, the factor chosen by the context (a (N, 1, 1) tensor): the error of a clean latent
    z noised to z + sigma eps is ((factor - 1) z + factor sigma eps) / sigma, known in closed form."""

    def __init__(self):
        self.timesteps = []

    def __call__(self, x, sigma, *, timestep, context):
        self.timesteps.append(timestep)
        return context.view(-1, 1, 1, 1) * x


def test_prompt_fit_is_the_log_error_ratio_plus_a_little_likelihood():
    schedule = NoiseSchedule.stable_diffusion()
    latents = torch.zeros(2, 4, 3, 3)  # clean latents 0: the error is factor * eps, so log error = 2 log factor + log mean eps^2
    positive, negative = torch.tensor([0.5, 0.25]).view(2, 1, 1), torch.tensor([1.0, 1.0]).view(2, 1, 1)
    denoiser = ShrinkingDenoiser()
    fit = prompt_fit(denoiser, latents, 2, [torch.Generator().manual_seed(3)], schedule, positive, negative)
    # both candidates share each timestep's noise, so the noise term cancels from their difference
    difference = -(1 + LIKELIHOOD_WEIGHT) * 2 * (math.log(0.5) - math.log(0.25))
    assert fit.shape == (1, 2)
    assert float(fit[0, 0] - fit[0, 1]) == pytest.approx(difference, abs=1e-5)
    assert int(fit.argmax()) == 1  # the candidate the prompt denoises better
    expected = [round(share * 1000) for share in SCORING_TIMESTEP_SHARES]
    assert sorted(set(denoiser.timesteps)) == expected


def test_prompt_fit_noise_follows_the_image_seed_not_the_batch():
    schedule, denoiser = NoiseSchedule.stable_diffusion(), ShrinkingDenoiser()
    latents = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    positive, negative = torch.full((4, 1, 1), 0.5), torch.ones(4, 1, 1)
    together = prompt_fit(denoiser, latents, 2, [torch.Generator().manual_seed(s) for s in (5, 6)], schedule,
                          positive, negative)
    alone = prompt_fit(denoiser, latents[2:], 2, [torch.Generator().manual_seed(6)], schedule, positive[2:],
                       negative[2:])
    torch.testing.assert_close(together[1:], alone)
