"""Choosing one edit among candidates (ldm.candidates): closed-form cases."""

import torch

from ldm.candidates import CANDIDATE_SEED_STRIDE, candidate_generators, choose_candidates


def flat_images(*levels: float) -> torch.Tensor:
    """(1, K, 3, 2, 2) candidates, candidate k a flat image of grey level levels[k]."""
    return torch.tensor(levels).view(1, -1, 1, 1, 1).expand(1, len(levels), 3, 2, 2)


def test_without_a_source_weight_the_medoid_wins():
    # mean distance to the others: 0.1 -> (0.05 + 0.8) / 2, 0.15 -> (0.05 + 0.75) / 2, 0.9 -> (0.8 + 0.75) / 2
    candidates, source = flat_images(0.1, 0.15, 0.9), torch.full((1, 3, 2, 2), 0.9)
    assert choose_candidates(candidates, source, 0.0).tolist() == [1]


def test_the_source_weight_breaks_near_ties_towards_the_smaller_change():
    candidates, black = flat_images(0.1, 0.15, 0.9), torch.zeros(1, 3, 2, 2)
    # score = mean distance to the others + weight * distance to the source: 0.425 + 0.1 w, 0.4 + 0.15 w, 0.775 + 0.9 w
    assert choose_candidates(candidates, black, 0.4).tolist() == [1]  # 0.465 against 0.46
    assert choose_candidates(candidates, black, 1.0).tolist() == [0]  # 0.525 against 0.55
    assert choose_candidates(candidates, torch.full((1, 3, 2, 2), 0.9), 10.0).tolist() == [2]  # the source itself


def test_each_image_chooses_among_its_own_candidates():
    candidates = torch.cat([flat_images(0.1, 0.15, 0.9), flat_images(0.9, 0.2, 0.85)])
    assert choose_candidates(candidates, torch.zeros(2, 3, 2, 2), 0.0).tolist() == [1, 2]
    assert choose_candidates(candidates[:, :1], torch.zeros(2, 3, 2, 2), 0.0).tolist() == [0, 0]


def test_candidate_generators_keep_the_image_generator_first_and_never_share_noise():
    images = [torch.Generator().manual_seed(seed) for seed in (7, 8)]
    drawn = candidate_generators(images, 3)
    assert drawn[0] is images[0] and drawn[3] is images[1]
    assert drawn[1].initial_seed() == 7 + CANDIDATE_SEED_STRIDE
    assert drawn[5].initial_seed() == (8 + 2 * CANDIDATE_SEED_STRIDE) % 2**32
    noise = torch.stack([torch.randn(4, generator=generator) for generator in drawn])
    assert torch.cdist(noise, noise).add(torch.eye(6)).min() > 0
