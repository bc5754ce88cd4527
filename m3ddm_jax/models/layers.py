"""Layers shared by the M3DDM UNet, its global-frame encoder and the SD VAE.

Activations are channels-last. Parameters are float32; `dtype` is the compute dtype. Kernels carry
`logical_axes` metadata that `m3ddm_jax.sharding` maps onto mesh axes; the modules themselves hold no
sharding policy.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.models import attention
from m3ddm_jax.sharding import CONV_IN, CONV_OUT, EMBED, HEADS, NORM

Dtype = Any


def make_rngs(seed: int = 0) -> nnx.Rngs:
    """Rngs whose counters are array refs.

    With plain counters, tracing a model's construction (nnx.eval_shape, nnx.jit) is quadratic in flax
    0.12: every counter update inspects a tracer's sharding, which walks the whole trace. Abstract
    construction of the UNet drops from ~15 s to ~1.5 s.
    """
    with nnx.var_defaults(ref=True):
        return nnx.Rngs(seed)


def random_init(abstract_model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Fills a shape-only model (from nnx.eval_shape) with random parameters generated on the host.

    Flax's initialisers cost ~10 ms per tensor eagerly on CPU (~20 s for the UNet) or a long compile under
    jit; benchmarks and from-scratch runs only need well-scaled values: kernels N(0, 1/fan_in), norm
    scales and BatchNorm variances 1, biases and means 0.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_model)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        shape, name = tuple(var.shape), path[-1]
        if name == "kernel":
            value = rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(math.prod(shape[:-1])))
        elif name in ("scale", "var"):
            value = np.ones(shape, np.float32)
        else:
            value = np.zeros(shape, np.float32)
        leaves.append((path, var.replace(value.astype(var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _init(init, axes):
    return nnx.with_metadata(init, logical_axes=axes)


def linear(in_features: int, out_features: int, *, axes: tuple[str, str], rngs: nnx.Rngs, dtype: Dtype,
           use_bias: bool = True) -> nnx.Linear:
    """A dense layer whose kernel's (input, output) dimensions carry the logical `axes` (m3ddm_jax.sharding
    names); its bias carries the output's."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=_init(nnx.initializers.lecun_normal(), axes),
                      bias_init=_init(nnx.initializers.zeros_init(), axes[-1:]), rngs=rngs)


def conv(in_channels: int, out_channels: int, kernel_size: Sequence[int], *, rngs: nnx.Rngs, dtype: Dtype,
         strides: int | Sequence[int] = 1, padding: int | str = "same_torch", use_bias: bool = True,
         precision: jax.lax.PrecisionLike = None) -> nnx.Conv:
    """A convolution with PyTorch's symmetric integer padding (`padding=k//2` by default).

    PyTorch pads both sides by the same amount; 'SAME' in XLA pads asymmetrically for stride 2, which
    would shift every downsampled feature map by half a pixel. `precision` is the backend's default unless
    given (the metric networks ask for HIGHEST).
    """
    kernel_size = tuple(kernel_size)
    if padding == "same_torch":
        padding = tuple((k // 2, k // 2) for k in kernel_size)
    elif isinstance(padding, int):
        padding = tuple((padding, padding) for _ in kernel_size)
    axes = (None,) * len(kernel_size) + (CONV_IN, CONV_OUT)
    return nnx.Conv(in_channels, out_channels, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
                    dtype=dtype, param_dtype=jnp.float32, precision=precision,
                    kernel_init=_init(nnx.initializers.lecun_normal(), axes),
                    bias_init=_init(nnx.initializers.zeros_init(), (CONV_OUT,)), rngs=rngs)


def scaled_linear(layer: nnx.Linear, x: jax.Array, scale: float) -> jax.Array:
    """layer(x) * scale, with the scale applied to the layer's float32 parameters before they are cast to the
    compute dtype."""
    kernel = (layer.kernel.value * scale).astype(layer.dtype)
    y = jnp.dot(x.astype(layer.dtype), kernel, precision=layer.precision)
    return y if layer.bias is None else y + (layer.bias.value * scale).astype(layer.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm whose statistics span every axis after the first `batch_axes` (float32 statistics).

    On a video (B, F, H, W, C): `batch_axes=1` normalises jointly over frames, as PyTorch's GroupNorm does
    on a 5-D tensor (the official resnet, temporal and output norms); `batch_axes=2` normalises each frame
    on its own (the official spatial-transformer norm, which folds frames into the batch first).
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float, *, dtype: Dtype = jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32), logical_axes=(NORM,))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32), logical_axes=(NORM,))

    def __call__(self, x: jax.Array, *, batch_axes: int = 1) -> jax.Array:
        c = x.shape[-1]
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(batch_axes, x.ndim - 1)) + (x.ndim,)
        # Two passes (mean, then the mean squared deviation): the one-pass E[x^2] - E[x]^2 loses the VAE
        # encoder's reference parity (3e-4 against 1e-4) to float32 cancellation.
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale.value + self.bias.value).astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head attention with PyTorch naming: to_q, to_k, to_v, to_out (to_out.0 in PyTorch).

    `heads` is the number of heads; the head width is query_dim // heads. With `context=None` it is
    self-attention (keys and values project from `x`). `attention_impl` names the kernel
    (m3ddm_jax.models.attention: a KERNELS name or 'auto').
    """

    def __init__(self, query_dim: int, heads: int, *, context_dim: int | None = None, qkv_bias: bool = False,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, attention_impl: str = "xla"):
        if query_dim % heads:
            raise ValueError(f"Attention: width {query_dim} does not split into {heads} heads")
        context_dim = context_dim or query_dim
        self.heads = heads
        self.attention_impl = attention.check_attention_impl(attention_impl)
        self.to_q = linear(query_dim, query_dim, axes=(EMBED, HEADS), use_bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.to_k = linear(context_dim, query_dim, axes=(EMBED, HEADS), use_bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.to_v = linear(context_dim, query_dim, axes=(EMBED, HEADS), use_bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.to_out = linear(query_dim, query_dim, axes=(HEADS, EMBED), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: (N, T, C); context: (N, S, C_ctx) or None. Returns (N, T, C)."""
        context = x if context is None else context
        n, t, c = x.shape
        split = lambda y: y.reshape(*y.shape[:-1], self.heads, c // self.heads)
        # The softmax scale is folded into the query projection's (C x C) weights: no pass over the queries
        # or the scores for it.
        q = split(scaled_linear(self.to_q, x, (c // self.heads) ** -0.5))
        k, v = split(self.to_k(context)), split(self.to_v(context))
        out = attention.dot_product_attention(q, k, v, impl=self.attention_impl, scale=1.0)
        return self.to_out(out.reshape(n, t, c))
