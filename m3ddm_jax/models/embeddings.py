"""Sinusoidal embeddings of timesteps, fps and temporal positions, and their MLPs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.models.layers import Dtype, linear
from m3ddm_jax.sharding import EMBED, MLP


def sinusoidal_embedding(x: jax.Array, dim: int, *, max_period: float, flip_sin_to_cos: bool = True,
                         freq_shift: float = 0.0) -> jax.Array:
    """(N,) values -> (N, dim) float32: frequencies exp(-ln(max_period) k / (half - freq_shift)).

    `max_period` differs between models (1000 for the M3DDM timestep, 30 for its fps, 10000 for SD 1.5),
    so it is always passed from the model config.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(x, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding: linear_1, linear_2)."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
        self.linear_1 = linear(in_dim, out_dim, axes=(EMBED, MLP), rngs=rngs, dtype=dtype)
        self.linear_2 = linear(out_dim, out_dim, axes=(MLP, EMBED), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))
