"""A weight-free, exactly invertible latent space: space-to-depth by `factor`.

It stands in for the SD VAE where no pretrained weights may be downloaded (the embedded demo, tests): the
UNet, the objective and the sampler run unchanged on (H/f, W/f, 3 f^2) "latents", and decoded samples
are real pictures, so outpainting quality can be judged without a VAE.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.models.vae import LatentCodec


@dataclasses.dataclass(frozen=True)
class PixelSpaceConfig:
    factor: int = 2
    in_channels: int = 3
    scaling_factor: float = 1.0
    dtype: str = "float32"

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.factor ** 2

    @property
    def downsample_factor(self) -> int:
        return self.factor


class PixelSpace(LatentCodec, nnx.Module):
    def __init__(self, config: PixelSpaceConfig, *, rngs: nnx.Rngs | None = None):
        del rngs  # no parameters; the argument keeps one constructor signature for every latent space
        self.config = config

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        n, h, w, c = images.shape
        f = self.config.factor
        if h % f or w % f:
            raise ValueError(f"PixelSpace: image size {h}x{w} is not a multiple of {f}")
        z = images.astype(jnp.float32).reshape(n, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        z = z.reshape(n, h // f, w // f, f * f * c)
        return z, jnp.zeros_like(z)

    def decode(self, z: jax.Array) -> jax.Array:
        n, h, w, _ = z.shape
        f, c = self.config.factor, self.config.in_channels
        x = z.astype(jnp.float32).reshape(n, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h * f, w * f, c)
