"""Parameter averaging of models that share one architecture (a "model soup").

Two fine-tunes of one parent often err in different places; the mean of their weights can keep what each learned
(weights.md measures it on the embedded `shapes` model). Every network — UNet, VAE, text encoder — is averaged
tensor by tensor in float32; configs, tokenizer, scheduler and recommended settings come from the first model,
so its measured latent scaling factor is the one kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ldm.loading import Components

# Measured statistics, not architecture: models fine-tuned on different data re-measure them.
MEASURED_CONFIG_FIELDS = ("scaling_factor", "shift_factor")


def _architecture(components: Components, name: str) -> dict:
    """What must agree for an average to mean anything; tensor names and shapes are checked separately."""
    if name == "text_encoder":
        model = components.text_encoder.model
        config = model.config.to_dict() if hasattr(model, "config") else {}  # OpenCLIP: its shapes say it all
        return {"class": type(model).__name__, **config}
    config = dataclasses.asdict(getattr(components, name).config)
    return {key: value for key, value in config.items() if key not in MEASURED_CONFIG_FIELDS}


def _check_same_architecture(models: Sequence[Components]) -> None:
    for name in models[0].networks:
        reference = _architecture(models[0], name)
        for index, model in enumerate(models[1:], start=2):
            other = _architecture(model, name)
            differing = sorted(key for key in reference.keys() | other.keys() if reference.get(key) != other.get(key))
            if differing:
                raise ValueError(f"model {index}'s {name} differs from model 1's in {differing}; only models of "
                                 "one architecture can be averaged")


def mean_state_dict(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                    what: str = "model") -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i], key by key, in float32, returned in the first state's dtypes. Integer tensors
    (token ids, counters) are not averaged: they must be equal."""
    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        if state.keys() != first.keys():
            missing, extra = sorted(first.keys() - state.keys()), sorted(state.keys() - first.keys())
            raise ValueError(f"{what} {index + 1} has other tensors than model 1 (missing {missing[:3]}, extra "
                             f"{extra[:3]}); only models of one architecture can be averaged")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise ValueError(f"{what} {index + 1}: {key} has shape {tuple(tensor.shape)}, model 1 "
                                 f"{tuple(first[key].shape)}; only models of one architecture can be averaged")
    mean = {}
    for key, reference in first.items():
        if not reference.is_floating_point():
            if any(not torch.equal(state[key], reference) for state in states[1:]):
                raise ValueError(f"{what}: the integer tensor {key} differs between models; it cannot be averaged")
            mean[key] = reference.clone()
            continue
        total = sum(weight * state[key].float() for weight, state in zip(weights, states))
        mean[key] = total.to(reference.dtype)
    return mean


def normalized_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """Equal weights when none are given; otherwise positive weights, one per model, scaled to sum to 1."""
    if count < 2:
        raise ValueError(f"averaging needs at least two models, got {count}")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} models; give one weight per model")
    if any(not weight > 0 for weight in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    return [weight / sum(weights) for weight in weights]


def average_models(models: Sequence[Components], weights: Sequence[float] | None = None) -> Components:
    """The first model with every network's weights replaced (in place) by the weighted mean over `models`."""
    weights = normalized_weights(len(models), weights)
    _check_same_architecture(models)
    for name, network in models[0].networks.items():
        states = [model.networks[name].state_dict() for model in models]
        network.load_state_dict(mean_state_dict(states, weights, what=name))
    return models[0]
