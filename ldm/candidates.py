"""Choosing one image among several candidates drawn with different noise, by the model's own judgement.

A small model's misses (a wrong count, a colour on the wrong object, a bystander redrawn in another colour, an
added object drawn twice) come and go from seed to seed. The model tells them apart better than it avoids them,
as a diffusion classifier does (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier"): each
candidate is noised at a few timesteps and denoised once with its prompt (or instruction) and once with the
negative prompt, and the choice maximises

    mean over timesteps of  log error(negative) - (1 + LIKELIHOOD_WEIGHT) * log error(prompt)

(errors in noise units; each timestep's noise the same for all of an image's candidates): how much better the
prompt explains the candidate than the negative prompt does, plus a little of how well it explains it at all. An
instruction model keeps its input image in both branches, so the score asks what the instruction adds.
Measured on the embedded models (README): 4 text-to-image candidates took ShapeEval from 0.829 to 0.877; 5 edit
candidates took success / preservation from 0.866 / 0.821 (the first draw) to 0.884 / 0.893, where the medoid of the
candidates used before gave 0.853 / 0.888.
"""

from __future__ import annotations

import torch

# Candidate j > 0 of an image draws from a generator seeded seed + j * CANDIDATE_SEED_STRIDE (mod 2**32: the CPU
# generator reads only a seed's low 32 bits), far from seed + k, the seeds of the batch's other images (A1111's
# rule), so no two candidates share noise. Candidate 0 uses the image's own generator, so one candidate is exactly
# the plain call.
CANDIDATE_SEED_STRIDE = 0x9E3779B9  # 2**32 / golden ratio: multiples stay far from each other and from small k
# The noise that scores an image's candidates comes from a generator seeded seed + SCORING_SEED_OFFSET: its own
# stream, the same whatever the batch, so a seed gives the same choice alone or in a batch.
SCORING_SEED_OFFSET = 0x5851F42D
# Where on the training schedule candidates are scored (shares of its timesteps): late, where the layout, counts
# and colours are still open and the prompt decides them. Chosen on 220 ShapeEval prompts x 8 draws (README).
SCORING_TIMESTEP_SHARES = (0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
LIKELIHOOD_WEIGHT = 0.25


def candidate_generators(generators: list[torch.Generator], count: int) -> list[torch.Generator]:
    """`count` generators per image, image-major: the image's own, then ones seeded from its initial seed."""
    return [generator if j == 0 else
            torch.Generator(generator.device).manual_seed((generator.initial_seed() + j * CANDIDATE_SEED_STRIDE)
                                                          % 2**32)
            for generator in generators for j in range(count)]


def prompt_fit(denoiser, latents: torch.Tensor, count: int, generators: list[torch.Generator], schedule,
               positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The fit score above of each candidate: `latents` (N * count, C, h, w) clean latents, image-major, `positive`
    and `negative` their (N * count, T, D) text tokens, `generators` one per image (N), `denoiser` D(x, sigma,
    timestep=, context=) -> x0 of the network trained on `schedule`. Returns (N, count), higher = better."""
    timesteps = [round(share * schedule.num_train_timesteps) for share in SCORING_TIMESTEP_SHARES]
    scoring = [torch.Generator().manual_seed((generator.initial_seed() + SCORING_SEED_OFFSET) % 2**32)
               for generator in generators]
    # (timesteps, N * count, C, h, w): one draw per image and timestep, shared by the image's candidates
    noise = torch.stack([torch.randn((len(timesteps), *latents.shape[1:]), generator=g) for g in scoring], 1)
    noise = noise.repeat_interleave(count, dim=1).to(latents.device)
    context = torch.cat([negative, positive])  # both branches in one batched call, as guidance runs them
    fit = torch.zeros(latents.shape[0], device=latents.device)
    for timestep, eps in zip(timesteps, noise):
        sigma = float(schedule.sigmas[timestep])
        noisy = (latents + sigma * eps).repeat(2, 1, 1, 1)
        denoised = denoiser(noisy, sigma, timestep=timestep, context=context).float()
        errors = ((denoised - latents.repeat(2, 1, 1, 1)) / sigma).square().mean(dim=(1, 2, 3)).log()
        with_negative, with_prompt = errors.chunk(2)
        fit += with_negative - (1 + LIKELIHOOD_WEIGHT) * with_prompt
    return (fit / len(timesteps)).unflatten(0, (-1, count))
