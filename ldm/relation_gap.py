"""Does a text-to-image model use what a caption says about where things are?

ShapeEval needs hundreds of images to show a weak preference for the right layout. The denoising error shows it
directly: on unseen two-object scenes, noise each image at a timestep and compare the UNet's error with the true
caption against its error with a caption the image contradicts. The mean log ratio of the two errors (the "gap")
is 0 when the UNet ignores the difference and grows as it relies on it. Swapped colours are the reference: a
model that reads colours shows a clear gap for them in the middle of the schedule.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ldm.data.shapes import OppositeRelation, Scene, relation, relation_phrase, render, sample_scene, to_tensor
from ldm.evaluation import LANGUAGES, markdown_table

GAP_TIMESTEPS = (100, 300, 500, 700, 850, 950)
CONTRADICTIONS = ("opposite relation", "swapped colours")


def pair_scenes(count: int, seed: int = 0) -> list[Scene]:
    """Two objects of different colours with a clear relation, drawn from their own generator (not a training
    seed's)."""
    rng, scenes = np.random.default_rng([0x6A9, seed]), []
    while len(scenes) < count:
        scene = sample_scene(rng, scene_kinds={"pair": 1.0})
        if scene.objects[0].color != scene.objects[1].color:
            scenes.append(scene)
    return scenes


def captions_and_contradictions(scene: Scene, language: str) -> tuple[str, dict[str, str]]:
    """The scene's relation caption (without sizes or background) and, per contradiction, a caption it
    contradicts in that one respect."""
    a, b = scene.objects
    where = relation(a, b)
    true = relation_phrase(a, where, b, language, with_size=False)
    swapped = relation_phrase(replace(a, color=b.color), where, replace(b, color=a.color), language, with_size=False)
    return true, {"opposite relation": OppositeRelation()(true), "swapped colours": swapped}


@torch.no_grad()
def relation_gaps(model: str, scenes: int = 64, timesteps: Sequence[int] = GAP_TIMESTEPS, seed: int = 0,
                  languages: Sequence[str] = LANGUAGES) -> dict[tuple[str, str], dict[int, float]]:
    """{(contradiction, language): {timestep: mean log(wrong caption's error / true caption's error)}}."""
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 1:
        raise ValueError(f"scenes={scenes!r} must be an integer >= 1")
    from ldm.diffusers_schedulers import schedule_from_config
    from ldm.loading import load_components
    from ldm.training.objectives import noised

    components = load_components(model)
    unet, vae, text = components.unet.float().eval(), components.vae.float().eval(), components.text_encoder
    text.model.float().eval()
    alphas_cumprod = schedule_from_config(components.scheduler_config).alphas_cumprod.float()
    prediction_type = components.scheduler_config.get("prediction_type", "epsilon")
    if not all(0 <= timestep < len(alphas_cumprod) for timestep in timesteps):
        raise ValueError(f"timesteps {list(timesteps)} must lie in [0, {len(alphas_cumprod)})")
    world = pair_scenes(scenes, seed)
    latents = vae.scale_latents(vae.encode(torch.stack([to_tensor(render(scene)) for scene in world])).mean)
    gaps = {}
    for language in languages:
        described = [captions_and_contradictions(scene, language) for scene in world]
        true = text.encode([caption for caption, _ in described]).tokens.float()
        wrong = {kind: text.encode([others[kind] for _, others in described]).tokens.float()
                 for kind in CONTRADICTIONS}
        for timestep in timesteps:
            generator = torch.Generator().manual_seed(seed * 1000 + timestep)  # the same noise for every caption
            at = torch.full((len(world),), timestep)
            noisy, target = noised(latents, at, alphas_cumprod, prediction_type, generator)

            def error(context: torch.Tensor) -> torch.Tensor:
                return (unet(noisy, at, context).float() - target).square().mean(dim=(1, 2, 3))

            right = error(true)
            for kind in CONTRADICTIONS:
                gaps.setdefault((kind, language), {})[timestep] = (error(wrong[kind]) / right).log().mean().item()
    return gaps


def gap_table(gaps: dict[tuple[str, str], dict[int, float]]) -> str:
    timesteps = sorted({timestep for row in gaps.values() for timestep in row})
    return markdown_table("contradiction, language", [f"t={timestep}" for timestep in timesteps],
                          [(f"{kind}, {language}", [row.get(timestep) for timestep in timesteps])
                           for (kind, language), row in gaps.items()])
