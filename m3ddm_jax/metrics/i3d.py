"""Inception-v1 I3D (Carreira & Zisserman 2017), the Kinetics-400 video classifier behind FVD.

Follows the widely used PyTorch port `pytorch_i3d.py` (InceptionI3d): module and parameter names
(Conv3d_1a_7x7.conv3d.weight, Mixed_3b.b1b.bn.running_mean, logits.conv3d.bias, ...), TensorFlow 'SAME'
padding for convolutions, zero-padded 'SAME' max pools, BatchNorm eps 1e-3, and its head: a (2, 7, 7)
stride-1 average pool then the 1x1x1 `logits` convolution. Input: clips (B, T, H, W, 3) in [-1, 1];
FVD feeds 16 frames at 224x224 (`m3ddm_jax.metrics.fvd.video_features`), where the pooled map is 1x1x1.

Outputs: 'logits', the 400 Kinetics logits (pytorch_i3d's `forward`, and the features of the original
TensorFlow FVD), and 'pool', the 1024-d average-pooled features (pytorch_i3d's `extract_features`).
Longer or larger clips give several pooled positions; their mean is returned.
Weights: `m3ddm_jax.metrics.weights.load_i3d`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.metrics.layers import max_pool, precise_conv

HEAD_POOL = (2, 7, 7)
# Inception blocks: name -> (input channels, (b0, b1a, b1b, b2a, b2b, b3b) output channels).
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
# Endpoint order; max pools are (window, strides).
ENDPOINTS = (
    "Conv3d_1a_7x7", ("MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)), "Conv3d_2b_1x1", "Conv3d_2c_3x3",
    ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)), "Mixed_3b", "Mixed_3c",
    ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)), "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
    ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)), "Mixed_5b", "Mixed_5c",
)
# The strided layers: Conv3d_1a_7x7 and the four max pools.
TRUNK_STRIDES = ((2, 2, 2),) + tuple(e[2] for e in ENDPOINTS if isinstance(e, tuple))


class Unit3D(nnx.Module):
    """Conv3d ('SAME') -> BatchNorm (inference statistics) -> ReLU, each part optional as in pytorch_i3d.

    pytorch_i3d pads each axis of size n by max(k - s, 0) if n % s == 0 else max(k - n % s, 0), the extra
    pixel after. XLA's 'SAME' pads max((ceil(n / s) - 1) * s + k - n, 0), also the extra pixel after: the
    same total for every n, k and s, so 'SAME' reproduces it for any stride and input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1), *,
                 rngs: nnx.Rngs, batch_norm: bool = True, use_bias: bool = False, relu: bool = True):
        self.conv3d = precise_conv(in_channels, out_channels, kernel, strides=stride, padding="SAME",
                                   use_bias=use_bias, rngs=rngs)
        self.bn = (nnx.BatchNorm(out_channels, use_running_average=True, epsilon=1e-3, rngs=rngs)
                   if batch_norm else None)
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return jax.nn.relu(x) if self.relu else x


class InceptionModule(nnx.Module):
    """Four branches concatenated on channels: 1x1x1; 1x1x1 -> 3x3x3; 1x1x1 -> 3x3x3; 3x3x3 max -> 1x1x1."""

    def __init__(self, in_channels: int, out: tuple[int, ...], *, rngs: nnx.Rngs):
        self.b0 = Unit3D(in_channels, out[0], rngs=rngs)
        self.b1a = Unit3D(in_channels, out[1], rngs=rngs)
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3), rngs=rngs)
        self.b2a = Unit3D(in_channels, out[3], rngs=rngs)
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3), rngs=rngs)
        self.b3b = Unit3D(in_channels, out[5], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = max_pool(x, (3, 3, 3), (1, 1, 1), same=True)
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)],
                               axis=-1)


class InceptionI3d(nnx.Module):
    """I3D RGB stream: clips (B, T, H, W, 3) in [-1, 1] -> {'logits': (B, 400), 'pool': (B, 1024)}."""

    def __init__(self, num_classes: int = 400, *, rngs: nnx.Rngs):
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
        for name, (cin, out) in MIXED.items():
            setattr(self, name, InceptionModule(cin, out, rngs=rngs))
        self.logits = Unit3D(1024, num_classes, rngs=rngs, batch_norm=False, use_bias=True, relu=False)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        # Both outputs at once: the logits are a 1x1x1 convolution of the pool.
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"i3d: expected RGB clips (B, T, H, W, 3), got shape {x.shape}")
        size = x.shape[1:4]
        for stride in TRUNK_STRIDES:  # 'SAME' layers: ceil(n / stride)
            size = tuple(-(-n // s) for n, s in zip(size, stride))
        if any(n < k for n, k in zip(size, HEAD_POOL)):
            raise ValueError(f"i3d: a {x.shape[1]}x{x.shape[2]}x{x.shape[3]} clip shrinks to {size} positions at "
                             f"Mixed_5c, fewer than the {HEAD_POOL} head pool needs; give at least 9 frames of "
                             f"193x193 (FVD uses 16 frames resized to 224x224)")
        for endpoint in ENDPOINTS:
            if isinstance(endpoint, tuple):
                x = max_pool(x, endpoint[1], endpoint[2], same=True)
            else:
                x = getattr(self, endpoint)(x)
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *HEAD_POOL, 1), (1,) * 5, "VALID")
        pooled = x / (HEAD_POOL[0] * HEAD_POOL[1] * HEAD_POOL[2])
        return {"logits": jnp.mean(self.logits(pooled), axis=(1, 2, 3)), "pool": jnp.mean(pooled, axis=(1, 2, 3))}
