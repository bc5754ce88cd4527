"""The attention-kernel registry: names and resolution, and every kernel against the `xla` reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3ddm_jax.models import attention
from m3ddm_jax.models.layers import Attention
from m3ddm_jax.models.unet3d import UNet3DConfig

F32_TOL = 1e-5  # issue 12: parity with `xla` in float32
# bfloat16 inputs: the kernels differ from `xla` only in the order of float32 accumulation and where the
# probabilities are rounded to bfloat16 (one rounding, relative 2^-8 of values <= max |v|).
BF16_TOL = 2 ** -7


def qkv(b, tq, tk, heads, head_dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda t: jnp.asarray(rng.standard_normal((b, t, heads, head_dim)), dtype)
    return draw(tq), draw(tk), draw(tk)


def max_diff(a, b):
    return float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())


# ------------------------------------------------------------------------------------------ registry


def test_registry_names_and_resolution():
    assert attention.NAMES == ("auto", *attention.KERNELS)
    for name, kernel in attention.KERNELS.items():
        assert kernel.fallback is None or kernel.fallback in attention.KERNELS, name
        for platform in ("cpu", "gpu", "tpu"):
            assert attention.resolve_attention(name, platform) == name
    for platform in ("cpu", "gpu", "tpu"):
        assert attention.resolve_attention("auto", platform) == attention.AUTO[platform]
        assert attention.AUTO[platform] in attention.KERNELS
    assert attention.resolve_attention("auto", "cuda") == attention.AUTO["gpu"]


def test_unknown_names_fail_at_construction_listing_the_registry():
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'.*'auto'.*'xla'.*'chunked'"):
        UNet3DConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        Attention(8, 2, rngs=nnx.Rngs(0), attention_impl="flash")
    with pytest.raises(ValueError, match="unknown attention_impl"):
        attention.resolve_attention("flash", "cpu")
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        attention.resolve_attention("auto", "metal")


@pytest.mark.parametrize("impl", attention.NAMES)
def test_attention_module_runs_every_name(impl):
    """Every name runs on this host inside the Attention module (off their platforms, kernels fall back) and
    agrees with the reference."""
    layer = Attention(16, 2, context_dim=12, rngs=nnx.Rngs(0), attention_impl=impl)
    ref = Attention(16, 2, context_dim=12, rngs=nnx.Rngs(0), attention_impl="xla")
    x = jax.random.normal(jax.random.key(1), (2, 24, 16))
    ctx = jax.random.normal(jax.random.key(2), (2, 20, 12))
    assert max_diff(nnx.jit(lambda m, x, c: m(x, c))(layer, x, ctx), ref(x, ctx)) <= F32_TOL


# ------------------------------------------------------------------------------------------- chunked

# (batch, queries, keys, heads, head_dim, block_bytes, kv_block): one block (straight to xla); batch blocks;
# query blocks with padding (37 queries); cross-attention with streamed, padded keys (online softmax); and
# the UNet's head widths.
CHUNKED_CASES = [
    (2, 16, 16, 2, 8, 1 << 20, 4096),
    (5, 16, 16, 2, 40, 2 * 2 * 16 * 16 * 4, 4096),
    (3, 37, 29, 2, 80, 2 * 8 * 29 * 4, 4096),
    (2, 70, 47, 2, 160, 2 * 16 * 8 * 4, 16),
    (1, 200, 1000, 8, 40, 8 * 64 * 256 * 4, 256),
]


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=lambda c: "b{}_q{}_k{}_h{}_d{}_bytes{}_kv{}".format(*c))
def test_chunked_matches_xla(case):
    b, tq, tk, heads, head_dim, block_bytes, kv_block = case
    fn = jax.jit(functools.partial(attention.chunked_attention, block_bytes=block_bytes, kv_block=kv_block))
    q, k, v = qkv(b, tq, tk, heads, head_dim)
    assert max_diff(fn(q, k, v), attention.xla_attention(q, k, v)) <= F32_TOL
    q, k, v = qkv(b, tq, tk, heads, head_dim, jnp.bfloat16)
    assert max_diff(fn(q, k, v), attention.xla_attention(q, k, v)) <= BF16_TOL


def test_chunked_gradients_match_xla():
    q, k, v = qkv(2, 37, 47, 2, 8)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
    chunked = functools.partial(attention.chunked_attention, block_bytes=2 * 8 * 16 * 4, kv_block=16)
    got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(attention.xla_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert max_diff(g, w) <= 1e-4 * float(jnp.abs(w).max())


def test_chunked_never_holds_the_score_matrix():
    """XLA's plan for `xla` holds the (batch, heads, T, T) float32 scores; `chunked` stays within a few blocks."""
    b, t, heads, block_bytes = 2, 1024, 2, 1 << 20
    spec = jax.ShapeDtypeStruct((b, t, heads, 8), jnp.float32)
    temp = lambda fn: jax.jit(fn).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    scores = b * heads * t * t * 4
    assert temp(attention.xla_attention) >= scores
    assert temp(functools.partial(attention.chunked_attention, block_bytes=block_bytes)) <= 4 * block_bytes
