"""The light global-frame encoder: VAE latents of the 16 global frames -> cross-attention tokens.

Five ResNet bottleneck stages (4->8->16->32->64->128 channels, stride 2 in the third) and an unpadded 3x3
conv to 320 channels. BatchNorm always uses its running statistics: the official model runs it in eval
mode, and the unconditional context is this encoder applied to zero latents, so its BN shifts are part of
the learned behaviour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.models.layers import Dtype, conv

STAGE_CHANNELS = (8, 16, 32, 64, 128)
STAGE_STRIDES = (1, 1, 2, 1, 1)
STAGE_DEPTH = 2
BOTTLENECK_REDUCTION = 4


class ConvBN(nnx.Module):
    """Bias-free conv -> BatchNorm (eps 1e-5, running statistics) -> optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, relu: bool, *, rngs: nnx.Rngs,
                 dtype: Dtype):
        self.relu = relu
        self.convolution = conv(cin, cout, (kernel, kernel), strides=stride, use_bias=False, rngs=rngs, dtype=dtype)
        self.normalization = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-5, momentum=0.9, dtype=dtype,
                                           param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.normalization(self.convolution(x))
        return nnx.relu(x) if self.relu else x


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus a projected or identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype: Dtype):
        mid = cout // BOTTLENECK_REDUCTION
        self.shortcut = (ConvBN(cin, cout, 1, stride, False, rngs=rngs, dtype=dtype)
                         if cin != cout or stride != 1 else None)
        self.layer = nnx.List([ConvBN(cin, mid, 1, 1, True, rngs=rngs, dtype=dtype),
                               ConvBN(mid, mid, 3, stride, True, rngs=rngs, dtype=dtype),
                               ConvBN(mid, cout, 1, 1, False, rngs=rngs, dtype=dtype)])

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut(x)
        for layer in self.layer:
            x = layer(x)
        return nnx.relu(x + residual)


class Stage(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.layers = nnx.List([Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, rngs=rngs,
                                           dtype=dtype) for i in range(STAGE_DEPTH)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class GlobalFrameEncoder(nnx.Module):
    """(n, h, w, 4) latents -> (n, ceil(h/2) - 2, ceil(w/2) - 2, out_dim) features."""

    def __init__(self, in_channels: int = 4, out_dim: int = 320, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        stages, cin = [], in_channels
        for cout, stride in zip(STAGE_CHANNELS, STAGE_STRIDES):
            stages.append(Stage(cin, cout, stride, rngs=rngs, dtype=dtype))
            cin = cout
        self.resnet_layer = nnx.List(stages)
        self.convolution = conv(cin, out_dim, (3, 3), padding=0, rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array) -> jax.Array:
        if min(latents.shape[1:3]) < 5:
            raise ValueError(f"global-frame latents must be at least 5x5, got {latents.shape[1:3]}")
        x = latents
        for stage in self.resnet_layer:
            x = stage(x)
        return self.convolution(x)

    def tokens(self, latents: jax.Array, rows: int) -> jax.Array:
        """(rows * g, h, w, 4) latents -> (rows, g * h' * w', out_dim): frame-major, then row-major tokens."""
        feats = self(latents)
        return feats.reshape(rows, -1, feats.shape[-1])
