"""Adapters that turn a network trained on a discrete VP schedule into a denoiser D(x, sigma) -> x0.

Samplers only ever see D: they never learn whether the network predicts noise, velocity or the clean sample,
nor what timesteps it was trained on (k-diffusion's CompVisDenoiser / CompVisVDenoiser, in one class).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from ldm.schedules import NoiseSchedule

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiscreteTimeDenoiser:
    """D(x, sigma, **cond) -> x0 for `net(x_t, t, **cond) -> prediction` trained on `schedule`.

    x is the VE sample x0 + sigma * eps; the network sees the VP sample x_t = x / sqrt(sigma^2 + 1) at timestep t.
    Pass `timestep=` when the sampling plan knows the exact timestep of sigma (diffusers feeds integers to DDIM,
    DPM-Solver and UniPC even on Karras grids); otherwise t comes from sigma by log-sigma interpolation.
    The network runs in its own dtype (fp16/bf16 weights get fp16/bf16 inputs); x0 comes back in x's dtype.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        schedule: NoiseSchedule,
        prediction_type: PredictionType = "epsilon",
        dtype: torch.dtype | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is not supported; choose one of {', '.join(PREDICTION_TYPES)}."
            )
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.dtype = dtype

    def _model_dtype(self, fallback: torch.dtype) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        parameters = getattr(self.net, "parameters", None)
        first = next(parameters(), None) if parameters is not None else None
        return first.dtype if first is not None else fallback

    def _timesteps(self, sigma: torch.Tensor, timestep, batch: int, device: torch.device) -> torch.Tensor:
        if timestep is None:
            timestep = torch.from_numpy(self.schedule.timestep_of(sigma.detach().cpu().double().numpy()))
        return torch.as_tensor(timestep, dtype=torch.float32).to(device).reshape(-1).expand(batch)

    def __call__(self, x: torch.Tensor, sigma, *, timestep=None, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        t = self._timesteps(sigma, timestep, x.shape[0], x.device)
        sigma = sigma.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))  # per-sample or shared, broadcast over C, H, W
        x_t = x / (sigma**2 + 1) ** 0.5
        output = self.net(x_t.to(self._model_dtype(x.dtype)), t, **cond)
        prediction = getattr(output, "sample", output).to(x.dtype)  # diffusers models wrap it in an output object
        return self.denoised(x, sigma, prediction)

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """x0 from the network's prediction at VE sample x and noise level sigma."""
        if self.prediction_type == "epsilon":
            return x - sigma * prediction
        if self.prediction_type == "v_prediction":  # v = alpha * eps - sigma_vp * x0 (Salimans & Ho 2022)
            return prediction * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return prediction
