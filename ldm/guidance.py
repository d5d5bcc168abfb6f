"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network, so samplers never see it.

The wrapper runs the unconditional and conditional branches in one batched forward and mixes their predictions
(eps, v or x0: the denoiser's map to x0 is affine in the prediction, so mixing here equals mixing x0). The editing
pipelines add image conditioning the same way: extra latent channels next to x_t (`WithConcatenatedLatents`) and
InstructPix2Pix's three-branch guidance over text and image (`InstructPix2PixGuidance`).
"""

from __future__ import annotations

from typing import Callable

import torch


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, amount: float) -> torch.Tensor:
    """Pull the guided prediction's per-image std back to the conditional one's (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16): fixes over-exposure at high guidance."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return amount * rescaled + (1 - amount) * guided


class ClassifierFreeGuidance:
    """net(x_t, t, context) with guidance: `negative` and `positive` are the (B, T, D) text tokens of each branch."""

    def __init__(self, net: Callable[..., torch.Tensor], negative: torch.Tensor, positive: torch.Tensor,
                 scale: float, rescale: float = 0.0):
        self.net = net
        self.context = torch.cat([negative, positive])
        self.scale = scale
        self.rescale = rescale

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        both = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), context=self.context, **cond)
        unconditional, conditional = both.chunk(2)
        guided = unconditional + self.scale * (conditional - unconditional)
        return rescale_guidance(guided, conditional, self.rescale) if self.rescale else guided


class Conditioned:
    """net(x_t, t, context) bound to one text context: the unguided case."""

    def __init__(self, net: Callable[..., torch.Tensor], context: torch.Tensor):
        self.net = net
        self.context = context

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x_t, t, context=self.context, **cond)


class WithConcatenatedLatents:
    """net(x_t, t, ...) whose input gets extra latent channels appended: the mask and masked-image latents of a
    9-channel inpainting UNet, the image latents of an 8-channel InstructPix2Pix UNet. `latents` (B, C, h, w) are
    repeated when guidance batches x_t (B -> k*B); they are not scaled with x_t, as the models were trained."""

    def __init__(self, net: Callable[..., torch.Tensor], latents: torch.Tensor):
        self.net = net
        self.latents = latents

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        extra = self.latents.to(x_t.dtype).repeat(x_t.shape[0] // self.latents.shape[0], 1, 1, 1)
        return self.net(torch.cat([x_t, extra], dim=1), t, **cond)


class InstructPix2PixGuidance:
    """Three-way guidance of InstructPix2Pix (Brooks et al. 2023, eq. 3): one batched forward over the branches
    (text + image, image only, neither), with the negative prompt standing for "no text" and zero latents for
    "no image", mixed as neither + s_T (text - image) + s_I (image - neither). `image_latents` are the edited
    image's latents, concatenated to x_t's channels."""

    def __init__(self, net: Callable[..., torch.Tensor], negative: torch.Tensor, positive: torch.Tensor,
                 image_latents: torch.Tensor, text_scale: float, image_scale: float):
        branches = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        self.net = WithConcatenatedLatents(net, branches)
        self.context = torch.cat([positive, negative, negative])
        self.text_scale = text_scale
        self.image_scale = image_scale

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        out = self.net(torch.cat([x_t] * 3), torch.cat([t] * 3), context=self.context, **cond)
        text_and_image, image, neither = out.chunk(3)
        return neither + self.text_scale * (text_and_image - image) + self.image_scale * (image - neither)
