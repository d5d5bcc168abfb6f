"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network, so samplers never see it.

The wrapper runs the unconditional and conditional branches in one batched forward and mixes their predictions
(eps, v or x0: the denoiser's map to x0 is affine in the prediction, so mixing here equals mixing x0).
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
