"""Convolution and pooling for the metric networks (LPIPS' AlexNet, I3D), channels-last activations.

Convolutions are the package's `models.layers.conv` (Flax layout, loaded through the shared mapping), pinned
to float32 at HIGHEST precision: a reduced-precision default (TF32 on GPUs, bfloat16 passes on TPUs) would
shift the scores.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.models import layers


def precise_conv(in_channels: int, out_channels: int, kernel_size: Sequence[int], *, rngs: nnx.Rngs,
                 **kwargs) -> nnx.Conv:
    """`models.layers.conv` (same keyword arguments: strides, padding, use_bias) in float32 at HIGHEST."""
    return layers.conv(in_channels, out_channels, kernel_size, rngs=rngs, dtype=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST, **kwargs)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int], *, same: bool = False) -> jax.Array:
    """Max pooling over the spatial axes of (N, *spatial, C), no padding (PyTorch's MaxPoolNd, floor mode).

    `same=True` first zero-pads to TensorFlow 'SAME' output sizes, as pytorch_i3d's MaxPool3dSamePadding
    does with F.pad: the pad value is 0, not -inf.
    """
    if same:
        pads = []
        for n, k, s in zip(x.shape[1:-1], window, strides):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), "VALID")
