"""The pieces of the training objective: timestep sampling, targets, the object-masked loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def snr_timestep_weights(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """TextBoost's sampling weights p(t) ∝ log SNR(t_min) − log SNR(t): noisy steps are drawn more often."""
    log_snr = torch.log(alphas_cumprod / (1 - alphas_cumprod))
    weights = log_snr[0] - log_snr
    return weights / weights.sum()


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, weights: torch.Tensor | None = None):
    """n training timesteps, uniform or from `weights` (one per timestep)."""
    if weights is None:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (ε-models) or the velocity (v-models)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [H,W] → [1,1,h,w] by area averaging: border latents get fractional weight, and latents
    with no object pixel at all get exactly zero."""
    return F.adaptive_avg_pool2d(mask[None, None].float(), latent_size)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Squared error weighted by mask + background_weight·(1 − mask), normalised by that weight's area.

    Normalising by area keeps small objects from getting weak gradients. With background_weight 0 the
    loss is blind to everything outside the mask: its gradient there is exactly zero.
    """
    weight = mask + background_weight * (1 - mask)
    error = (prediction.float() - target.float()) ** 2
    return (error * weight).sum() / (weight.sum() * prediction.shape[1]).clamp(min=1e-8)
