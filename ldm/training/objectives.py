"""What is trained: each objective is a module whose forward turns a batch into a scalar loss.

The trainer (`ldm.training.loop`) only sees these modules, so one loop (optimiser, bf16 autocast, EMA, DDP,
checkpoints) serves both stages of latent diffusion:
- stage 1, `AutoencoderObjective`: image -> encoder -> posterior sample -> decoder -> reconstruction + small KL;
- stage 2, `TextToImageObjective`: latent -> add noise at a random timestep -> UNet (cross-attending to the text
  transformer) predicts the noise / v / x0 -> mean squared error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNet
from ldm.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class AutoencoderObjective(nn.Module):
    """MSE + L1 reconstruction plus kl_weight x KL(q(z|x) || N(0, I)), all per pixel / per image means.

    Plain L1 tends to stall on flat-colour images; MSE pulls the early steps along and L1 sharpens edges later.
    """

    def __init__(self, vae: AutoencoderKL, mse: float = 1.0, l1: float = 1.0, kl: float = 1e-6):
        super().__init__()
        self.vae = vae
        self.weights = {"mse": mse, "l1": l1, "kl": kl}

    def forward(self, images: torch.Tensor, *, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        posterior = self.vae.encode(images)
        reconstruction = self.vae.decode(posterior.sample(generator)).float()
        terms = {
            "mse": F.mse_loss(reconstruction, images),
            "l1": F.l1_loss(reconstruction, images),
            "kl": posterior.kl().float().mean(),
        }
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return loss, {name: value.item() for name, value in terms.items()}


def start_posterior_narrow(vae: AutoencoderKL, log_variance: float) -> None:
    """Bias the encoder's log-variance outputs to `log_variance`: with the default (~0, unit variance) the
    posterior noise drowns the latents at the start and reconstruction barely moves."""
    output = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    with torch.no_grad():
        output.bias[vae.config.latent_channels:].fill_(log_variance)


class TokenClassifier(nn.Module):
    """An auxiliary loss on the text transformer's token states: a linear head must recover each labelled token's
    class (label -100: no label). It makes a jointly trained encoder carry what the diffusion loss alone lets it
    drop: the shapes encoder passed colours and shapes on but not the relation word. Not part of the exported
    model."""

    def __init__(self, hidden_size: int, classes: int, weight: float):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"token_labels.weight={weight!r} must be > 0")
        self.head, self.weight = nn.Linear(hidden_size, classes), weight

    def forward(self, states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        labelled = labels >= 0
        if not labelled.any():  # cross-entropy over no tokens is NaN
            return states.new_zeros(()), {}
        logits = self.head(states[labelled].float())
        loss = F.cross_entropy(logits, labels[labelled])
        accuracy = (logits.argmax(-1) == labels[labelled]).float().mean()
        return self.weight * loss, {"token_loss": loss.item(), "token_accuracy": accuracy.item()}


def noised(latents: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw of q(x_t | x_0) and what the UNet must predict from it."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    alpha_bar = alphas_cumprod.to(latents.device)[timesteps.to(latents.device)].view(-1, 1, 1, 1)
    signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    target = {"epsilon": noise, "v_prediction": signal * noise - sigma * latents, "sample": latents}
    return signal * latents + sigma * noise, target[prediction_type]


@dataclass(frozen=True)
class CaptionContrast:
    """A margin loss that makes the UNet use what a contradicting caption changes (e.g. the opposite relation).

    The diffusion loss alone left the shapes UNet's error the same for "left of" and "right of" at every noise
    level: nothing in it needs the relation more than a little. Here an image is noised once at a timestep >=
    `min_timestep` (where the layout is still open) and denoised with its caption and with one it contradicts;
    the log of the wrong caption's error over the right one's must reach `margin`."""

    weight: float = 0.2
    margin: float = 0.05
    min_timestep: int = 800

    def __post_init__(self):
        if not self.weight > 0 or not self.margin > 0:
            raise ValueError(f"caption_contrast weight={self.weight!r} and margin={self.margin!r} must be > 0")

    def __call__(self, right: torch.Tensor, wrong: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """`right`, `wrong`: (K,) mean squared errors with the true and the contradicting captions."""
        gap = wrong.log() - right.log()
        loss = F.relu(self.margin - gap).mean()
        return self.weight * loss, {"contrast_loss": loss.item(), "contrast_gap": gap.mean().item()}


@dataclass(frozen=True)
class CaptionConsistency:
    """Distillation across captions of one image: the UNet's prediction with a caption must match its prediction
    with a reference caption that says the same (e.g. its English translation), the reference's side held fixed.

    A jointly trained encoder learns each language only from its own captions; this hands one language what the
    model already does with the other, densely (a whole prediction per image rather than a noisy target), as
    multilingual CLIP students are distilled from an English teacher (Carlsson et al. 2022)."""

    weight: float = 1.0

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"caption_consistency weight={self.weight!r} must be > 0")

    def __call__(self, student: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """`student`, `reference`: (K, C, H, W) predictions with the caption and with its reference caption."""
        loss = F.mse_loss(student.float(), reference.float().detach())
        return self.weight * loss, {"consistency_loss": loss.item()}


@dataclass(frozen=True)
class ChangedRegion:
    """Per-cell loss weights for edit training: 1 + `weight` where the edit changes the latents, 1 elsewhere.

    A cell counts as changed when the mean absolute difference of its source and target latents (unscaled, over
    channels) exceeds `threshold`; 0.5 is about half the shapes latents' standard deviation. A weight in (-1, 0)
    weights the unchanged cells more instead. Weight 2 (the changed cells hold a moved object's old place, where
    copies were left behind) cut `shapes-edit`'s preservation from 0.68 to 0.54 in 2,000 steps; weight -0.5 for
    1,500 steps raised it from 0.69 to 0.82, at 3 points of success, and 2,000 more at -0.25 then took success from
    0.83 to 0.86 with preservation kept (the shipped `shapes-edit`, README)."""

    weight: float = 1.0
    threshold: float = 0.5

    def __post_init__(self):
        if not self.weight > -1 or not self.threshold > 0:
            raise ValueError(f"changed_region weight={self.weight!r} must be > -1 (weights stay positive) and "
                             f"threshold={self.threshold!r} > 0")

    def __call__(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) weights for (B, C, H, W) source and target latents."""
        changed = (target.float() - source.float()).abs().mean(dim=1, keepdim=True) > self.threshold
        return 1 + self.weight * changed.float()


class TextToImageObjective(nn.Module):
    """The latent diffusion loss with a text transformer trained jointly (or frozen, by requires_grad=False),
    plus an optional `TokenClassifier` on its token states, `CaptionContrast` and `CaptionConsistency`."""

    def __init__(self, unet: UNet, text_model: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 token_classifier: TokenClassifier | None = None, caption_contrast: CaptionContrast | None = None,
                 caption_consistency: CaptionConsistency | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if caption_contrast is not None and not 0 <= caption_contrast.min_timestep < len(schedule.alphas_cumprod):
            raise ValueError(f"caption_contrast min_timestep={caption_contrast.min_timestep} must lie in "
                             f"[0, {len(schedule.alphas_cumprod)})")
        self.unet, self.text_model = unet, text_model
        self.token_classifier, self.caption_contrast = token_classifier, caption_contrast
        self.caption_consistency = caption_consistency
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float(), persistent=False)

    def forward(self, latents: torch.Tensor, token_ids: torch.Tensor, *, image_condition: torch.Tensor | None = None,
                token_labels: torch.Tensor | None = None, contradicted: tuple[torch.Tensor, torch.Tensor] | None = None,
                referenced: tuple[torch.Tensor, torch.Tensor] | None = None, loss_weights: torch.Tensor | None = None,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """`image_condition`: latents concatenated to the noisy ones on the channel axis (InstructPix2Pix);
        `token_labels`: (B, T) classes for the token classifier; `contradicted`: (rows, token ids of a caption
        each of those rows' images contradicts) for the caption contrast; `referenced`: (rows, token ids of each
        of those rows' reference caption) for the caption consistency; `loss_weights`: (B, 1, H, W) weights of
        the squared error per latent cell (e.g. `ChangedRegion`), a weighted mean so the loss keeps its scale."""
        timesteps = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=generator)
        noisy, target = noised(latents, timesteps, self.alphas_cumprod, self.prediction_type, generator)
        context = self.text_model(token_ids).last_hidden_state  # (B, T, D)
        unet_input = noisy if image_condition is None else torch.cat([noisy, image_condition], dim=1)
        prediction = self.unet(unet_input, timesteps.to(latents.device), context)
        squared_error = (prediction.float() - target).square()
        if loss_weights is None:
            loss = squared_error.mean()
        else:
            loss = (loss_weights * squared_error).sum() / (loss_weights.sum() * squared_error.shape[1])
        extras = []
        if self.token_classifier is not None and token_labels is not None:
            extras.append(self.token_classifier(context, token_labels))
        if self.caption_contrast is not None and contradicted is not None and len(contradicted[0]):
            extras.append(self._contrast(latents, context, image_condition, *contradicted, generator))
        if self.caption_consistency is not None and referenced is not None and len(referenced[0]):
            extras.append(self._consistency(latents, context, image_condition, *referenced, generator))
        if not extras:
            return loss, {}
        metrics = {"diffusion_loss": loss.item()}
        for _, extra_metrics in extras:
            metrics.update(extra_metrics)
        return loss + sum(extra_loss for extra_loss, _ in extras), metrics

    def _contrast(self, latents: torch.Tensor, context: torch.Tensor, image_condition: torch.Tensor | None,
                  rows: torch.Tensor, wrong_ids: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One noisy latent per contradicted row, denoised with the right and the wrong caption (or instruction,
        beside the same source latents) in one batch."""
        count = len(rows)
        timesteps = torch.randint(self.caption_contrast.min_timestep, len(self.alphas_cumprod), (count,),
                                  generator=generator)
        noisy, target = noised(latents[rows], timesteps, self.alphas_cumprod, self.prediction_type, generator)
        if image_condition is not None:
            noisy = torch.cat([noisy, image_condition[rows]], dim=1)
        contexts = torch.cat([context[rows], self.text_model(wrong_ids).last_hidden_state])
        prediction = self.unet(noisy.repeat(2, 1, 1, 1), timesteps.repeat(2).to(latents.device), contexts)
        errors = (prediction.float() - target.repeat(2, 1, 1, 1)).square().mean(dim=(1, 2, 3))
        return self.caption_contrast(*errors.split(count))

    def _consistency(self, latents: torch.Tensor, context: torch.Tensor, image_condition: torch.Tensor | None,
                     rows: torch.Tensor, reference_ids: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One noisy latent per referenced row at any timestep, denoised with its caption and, without gradient,
        with the reference caption."""
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(rows),), generator=generator).to(latents.device)
        noisy, _ = noised(latents[rows], timesteps, self.alphas_cumprod, self.prediction_type, generator)
        if image_condition is not None:
            noisy = torch.cat([noisy, image_condition[rows]], dim=1)
        with torch.no_grad():
            reference = self.unet(noisy, timesteps, self.text_model(reference_ids).last_hidden_state)
        return self.caption_consistency(self.unet(noisy, timesteps, context[rows]), reference)
