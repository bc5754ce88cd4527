"""LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), as the `lpips` package computes it.

Frames in [-1, 1] -> scaling layer -> AlexNet relu1..relu5 -> unit-normalise each feature vector over
channels (eps 1e-10) -> squared difference -> learned 1x1 heads (no bias) -> spatial mean -> sum of the
five layers. Always over the whole frame: the score is a spatial mean of deep features whose receptive
fields cross any region boundary, so the protocol computes it per frame, not per region.
Weights: `m3ddm_jax.metrics.weights.load_lpips`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.metrics.layers import max_pool, precise_conv

# lpips.ScalingLayer: ImageNet statistics of frames mapped to [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision AlexNet `features`: (in, out, kernel, stride, padding, max-pool before), and each conv's index
# in that Sequential (the state-dict names features.0, features.3, ...).
ALEXNET = ((3, 64, 11, 4, 2, False), (64, 192, 5, 1, 2, True), (192, 384, 3, 1, 1, True),
           (384, 256, 3, 1, 1, False), (256, 256, 3, 1, 1, False))
ALEXNET_INDICES = (0, 3, 6, 8, 10)


class AlexNetFeatures(nnx.Module):
    """torchvision's AlexNet `features`, returning the five ReLU outputs LPIPS compares."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.convs = nnx.List([precise_conv(i, o, (k, k), strides=s, padding=p, rngs=rngs)
                               for i, o, k, s, p, _ in ALEXNET])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        feats = []
        for conv, (*_, pool_first) in zip(self.convs, ALEXNET):
            if pool_first:
                x = max_pool(x, (3, 3), (2, 2))
            x = jax.nn.relu(conv(x))
            feats.append(x)
        return feats


class LPIPS(nnx.Module):
    """Learned perceptual distance per frame: (..., H, W, 3) pairs in [-1, 1] -> (...).

    Call it jitted, as m3ddm_jax.jitting does for every model (`model_jit` of a function of
    (Static graphdef, state, pred, target) that nnx.merges them), in a loop over batches."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.alexnet = AlexNetFeatures(rngs=rngs)
        self.lin = nnx.List([precise_conv(o, 1, (1, 1), use_bias=False, rngs=rngs) for _, o, *_ in ALEXNET])

    def __call__(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        if pred.shape != target.shape or pred.shape[-1:] != (3,):
            raise ValueError(f"lpips: `pred` {pred.shape} and `target` {target.shape} must be RGB frames "
                             f"(..., H, W, 3) of the same size")
        lead, frame = pred.shape[:-3], pred.shape[-3:]
        x = jnp.concatenate([pred.reshape(-1, *frame), target.reshape(-1, *frame)]).astype(jnp.float32)
        x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        total = 0.0
        for feat, lin in zip(self.alexnet(x), self.lin):
            feat = feat / (jnp.sqrt(jnp.sum(jnp.square(feat), axis=-1, keepdims=True)) + 1e-10)
            a, b = jnp.split(feat, 2)
            total = total + jnp.mean(lin(jnp.square(a - b))[..., 0], axis=(-2, -1))
        return total.reshape(lead)
