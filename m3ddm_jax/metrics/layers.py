"""Convolution and pooling for the metric networks (LPIPS' AlexNet, I3D), channels-last activations.

`TorchConv` keeps its kernel in PyTorch's (O, I, *k) layout under the name `weight`: the shared mapping
(convert/mapping.py) converts only 2-D convolutions to Flax layout, and a PyTorch-layout kernel lets the
3-D convolutions of I3D load through the same key and shape checks unchanged. XLA picks its own physical
layout either way. Metric convolutions run at HIGHEST precision: a reduced-precision default (TF32 on
GPUs, bfloat16 passes on TPUs) would shift the scores.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_DIMENSION_NUMBERS = {2: ("NHWC", "OIHW", "NHWC"), 3: ("NDHWC", "OIDHW", "NDHWC")}


class TorchConv(nnx.Module):
    """An N-d convolution (N = 2 or 3) over channels-last input with a PyTorch-layout kernel.

    `padding` is PyTorch's symmetric integer padding, or 'SAME' for TensorFlow's (extra pixel after), which
    is what pytorch_i3d's dynamic padding computes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], *, rngs: nnx.Rngs,
                 stride: int | Sequence[int] = 1, padding: int | str = 0, use_bias: bool = True):
        kernel_size = tuple(kernel_size)
        nd = len(kernel_size)
        self.strides = (stride,) * nd if isinstance(stride, int) else tuple(stride)
        self.padding = padding if isinstance(padding, str) else ((padding, padding),) * nd
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=0)
        self.weight = nnx.Param(init(rngs.params(), (out_channels, in_channels) + kernel_size, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight.value
        y = jax.lax.conv_general_dilated(x, w, self.strides, self.padding,
                                         dimension_numbers=_DIMENSION_NUMBERS[w.ndim - 2],
                                         precision=jax.lax.Precision.HIGHEST)
        return y if self.bias is None else y + self.bias.value


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
