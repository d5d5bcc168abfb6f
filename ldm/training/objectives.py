"""What is trained: each objective is a module whose forward turns a batch into a scalar loss.

The trainer (`ldm.training.loop`) only sees these modules, so one loop (optimiser, bf16 autocast, EMA, DDP,
checkpoints) serves both stages of latent diffusion:
- stage 1, `AutoencoderObjective`: image -> encoder -> posterior sample -> decoder -> reconstruction + small KL;
- stage 2, `TextToImageObjective`: latent -> add noise at a random timestep -> UNet (cross-attending to the text
  transformer) predicts the noise / v / x0 -> mean squared error.
"""

from __future__ import annotations

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


class TextToImageObjective(nn.Module):
    """The latent diffusion loss with a text transformer trained jointly (or frozen, by requires_grad=False),
    plus an optional `TokenClassifier` on its token states."""

    def __init__(self, unet: UNet, text_model: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 token_classifier: TokenClassifier | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.unet, self.text_model = unet, text_model
        self.token_classifier = token_classifier
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float(), persistent=False)

    def forward(self, latents: torch.Tensor, token_ids: torch.Tensor, image_condition: torch.Tensor | None = None,
                token_labels: torch.Tensor | None = None, *,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """`image_condition`: latents concatenated to the noisy ones on the channel axis (InstructPix2Pix);
        `token_labels`: (B, T) classes for the token classifier."""
        batch = latents.shape[0]
        timesteps = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        alpha_bar = self.alphas_cumprod[timesteps.to(latents.device)].view(-1, 1, 1, 1)
        signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        noisy = signal * latents + sigma * noise  # q(x_t | x_0)
        target = {"epsilon": noise, "v_prediction": signal * noise - sigma * latents, "sample": latents}
        context = self.text_model(token_ids).last_hidden_state  # (B, T, D)
        unet_input = noisy if image_condition is None else torch.cat([noisy, image_condition], dim=1)
        prediction = self.unet(unet_input, timesteps.to(latents.device), context)
        loss = F.mse_loss(prediction.float(), target[self.prediction_type])
        if self.token_classifier is None or token_labels is None:
            return loss, {}
        token_loss, metrics = self.token_classifier(context, token_labels)
        return loss + token_loss, {"diffusion_loss": loss.item(), **metrics}
