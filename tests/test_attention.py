"""The attention-kernel registry: names and resolution, and every kernel against the `xla` reference."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from m3ddm_jax.models import attention
from m3ddm_jax.models.layers import Attention
from m3ddm_jax.models.unet3d import UNet3DConfig

F32_TOL = 1e-5  # issue 12: parity with `xla` in float32
# bfloat16 inputs: the kernels differ from `xla` in the order of float32 accumulation and in where values
# are rounded to bfloat16 (the probabilities in `xla` and `chunked`; q * scale in splash), each a relative
# 2^-9 error, and both round the output (half an ulp, 2^-9 relative): 2^-7 of the output's largest value
# covers that and is far below what a wrong mask, scale or block would give.
BF16_TOL = 2 ** -7


def bf16_tol(want):
    return BF16_TOL * float(jnp.abs(want.astype(jnp.float32)).max())


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
    agrees with attention written out from the module's projections (the module folds the softmax scale
    into its query projection)."""
    layer = Attention(16, 2, context_dim=12, rngs=nnx.Rngs(0), attention_impl=impl)
    x = jax.random.normal(jax.random.key(1), (2, 24, 16))
    ctx = jax.random.normal(jax.random.key(2), (2, 20, 12))
    heads = lambda y: y.reshape(*y.shape[:-1], 2, 8)
    want = jax.nn.dot_product_attention(heads(layer.to_q(x)), heads(layer.to_k(ctx)), heads(layer.to_v(ctx)))
    want = layer.to_out(want.reshape(2, 24, 16))
    assert max_diff(nnx.jit(lambda m, x, c: m(x, c))(layer, x, ctx), want) <= F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("impl", attention.NAMES)
def test_every_kernel_matches_jax_attention_and_takes_a_scale(impl, dtype):
    """Against jax.nn.dot_product_attention (an implementation outside the registry), at the default scale and
    at another one; short sequences (splash off TPU and below its tiles) included."""
    for shape in [(2, 37, 29, 2, 40), (6, 16, 16, 2, 40)]:
        q, k, v = qkv(*shape, dtype)
        for scale in (None, 0.3):
            want = jax.nn.dot_product_attention(q, k, v, scale=scale)
            got = jax.jit(functools.partial(attention.dot_product_attention, impl=impl, scale=scale))(q, k, v)
            assert max_diff(got, want) <= (F32_TOL if dtype == jnp.float32 else bf16_tol(want)), (shape, scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_short_attention_matches_xla(dtype):
    """The elementwise form for short sequences (splash's choice below its tiles at head widths under a lane
    tile: the temporal attention)."""
    q, k, v = qkv(24, 16, 16, 2, 40, dtype)
    want = attention.xla_attention(q, k, v)
    assert max_diff(jax.jit(attention.short_attention)(q, k, v), want) <= (
        F32_TOL if dtype == jnp.float32 else bf16_tol(want))


# ------------------------------------------------------------------------------------------- chunked

# (batch, queries, keys, heads, head_dim, block_bytes, kv_block): batch blocks (5 rows padded to 6); query
# blocks (37 queries padded to 40); cross-attention with streamed, padded keys (online softmax); 8 heads of
# streamed keys; the UNet's head widths. bfloat16 on the two block kinds (one pass, streamed keys).
CHUNKED_CASES = [
    ((5, 16, 16, 2, 40, 2 * 2 * 16 * 16 * 4, 4096), jnp.float32),
    ((3, 37, 29, 2, 80, 2 * 8 * 29 * 4, 4096), jnp.float32),
    ((3, 37, 29, 2, 80, 2 * 8 * 29 * 4, 4096), jnp.bfloat16),
    ((2, 70, 47, 2, 160, 2 * 16 * 8 * 4, 16), jnp.float32),
    ((2, 70, 47, 2, 160, 2 * 16 * 8 * 4, 16), jnp.bfloat16),
    ((1, 200, 1000, 8, 40, 8 * 64 * 256 * 4, 256), jnp.float32),
]


@pytest.mark.parametrize("case", CHUNKED_CASES,
                         ids=lambda c: "b{}_q{}_k{}_h{}_d{}_bytes{}_kv{}_".format(*c[0]) + c[1].__name__)
def test_chunked_matches_xla(case):
    (b, tq, tk, heads, head_dim, block_bytes, kv_block), dtype = case
    q, k, v = qkv(b, tq, tk, heads, head_dim, dtype)
    got = jax.jit(functools.partial(attention.chunked_attention, block_bytes=block_bytes, kv_block=kv_block))(q, k, v)
    want = attention.xla_attention(q, k, v)
    assert max_diff(got, want) <= (F32_TOL if dtype == jnp.float32 else bf16_tol(want))


def test_attention_bench_runs(tmp_path):
    """bench/attention.py (BENCHMARKS.md's figures) at its smallest case, with chunked forced to stream."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "bench" / "attention.py"), "--cases", "temporal_l2", "--iters", "1",
           "--kernels", "xla", "chunked:64K:8", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"].values()
    assert row["chunked:64K:8"]["max_abs_diff_vs_xla"] <= F32_TOL
    assert row["chunked:64K:8"]["temp_mib"] < row["xla"]["temp_mib"]


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


# -------------------------------------------------------------------------------------------- splash

# Pallas interpret mode runs the kernel's own program (tiling, online softmax, masking) with XLA on the CPU;
# the tolerances are those of `chunked` (F32_TOL, BF16_TOL): the same products, summed in another order.
SPLASH_CASES = [
    # Cross-attention with 200 queries and 130 keys: both padded to their tiles (keys masked), head_dim 40
    # padded to 128.
    ((2, 200, 130, 2, 40), jnp.float32),
    ((1, 128, 300, 2, 80), jnp.bfloat16),
]


@pytest.mark.parametrize("case", SPLASH_CASES, ids=lambda c: "b{}_q{}_k{}_h{}_d{}".format(*c[0]) + c[1].__name__)
def test_splash_interpret_matches_xla(case):
    shape, dtype = case
    q, k, v = qkv(*shape, dtype)
    got = jax.jit(functools.partial(attention.splash_kernel_attention, interpret=True))(q, k, v)
    want = attention.xla_attention(q, k, v)
    assert max_diff(got, want) <= (F32_TOL if dtype == jnp.float32 else bf16_tol(want))


def test_splash_runs_short_attention_or_xla_for_short_sequences_and_xla_off_tpu():
    assert attention.SPLASH_MIN_LEN > 16
    q, k, v = qkv(2, 16, 16, 2, 40)  # temporal attention over 16 frames, head_dim under a lane tile
    assert jnp.array_equal(attention.splash_kernel_attention(q, k, v), attention.short_attention(q, k, v))
    q, k, v = qkv(2, 16, 16, 2, 160)  # the deepest levels: head_dim 160
    assert jnp.array_equal(attention.splash_kernel_attention(q, k, v), attention.xla_attention(q, k, v))
    q, k, v = qkv(1, 256, 256, 2, 40)
    assert jnp.array_equal(jax.jit(attention.splash_attention)(q, k, v), jax.jit(attention.xla_attention)(q, k, v))


@pytest.fixture(scope="module")
def tpu_devices():
    """The 4 devices of a v5e:2x2 slice, from libtpu's ahead-of-time compiler (no TPU needed)."""
    pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to guard; parallel tests share libtpu
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices


def compile_for_tpu(fn, devices, *shapes, dtype=jnp.bfloat16):
    """`fn` compiled for `devices` (a mesh over them, set while tracing) on arrays of `shapes`, split over the
    mesh where their leading dimension allows; returns the lowered program's text."""
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    spec = lambda s: jax.sharding.PartitionSpec("data" if s[0] % len(devices) == 0 else None)
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, dtype, sharding=jax.sharding.NamedSharding(mesh, spec(s)))
                                      for s in shapes))
    lowered.compile()
    return lowered.as_text()


def test_splash_compiles_for_tpu(tpu_devices):
    """The Pallas kernel itself (not the fallback) compiles for a TPU at the UNet's cross-attention shape, on
    one chip, and on 4 through the per-shard wrapper: data parallel (forward and gradient), and over heads
    when the batch does not split."""
    q, kv = (4, 4096, 8, 40), (4, 3136, 8, 40)  # a row's 16 frames x 16x16 queries; 16 x 14x14 global tokens
    grad = jax.grad(lambda q, k, v: attention.splash_attention(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
    heads_only = ((2,) + q[1:], (2,) + kv[1:])
    for fn, devices, shapes in [(attention.splash_attention, tpu_devices[:1], (q, kv, kv)),
                                (grad, tpu_devices, (q, kv, kv)),
                                (attention.splash_attention, tpu_devices, heads_only + heads_only[1:])]:
        assert "tpu_custom_call" in compile_for_tpu(fn, devices, *shapes)


@pytest.mark.slow
def test_unet_with_splash_compiles_for_tpu(tpu_devices):
    """A tiny UNet forward with attention_impl='splash', data parallel over a v5e:2x2 slice (~1-3 min)."""
    from m3ddm_jax import pretrained

    cfg = UNet3DConfig(block_out_channels=(16, 32, 32, 32), attention_heads=2, norm_num_groups=8,
                       attention_impl="splash", dtype="bfloat16")
    graphdef, state = nnx.split(pretrained.abstract_model(cfg))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=tpu_devices)
    place = lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
    state = jax.tree.map(lambda x: place(x, jax.sharding.PartitionSpec()), state)
    split = jax.sharding.PartitionSpec("data")
    # 16x16 latents: 256 tokens per frame and 4 x 6x6 = 144 global tokens reach splash; 8x8 and 4x4 run xla.
    sample = place(jax.ShapeDtypeStruct((4, 4, 16, 16, 9), jnp.float32), split)
    tokens = place(jax.ShapeDtypeStruct((4, 144, 320), jnp.float32), split)
    with jax.set_mesh(mesh):
        lowered = jax.jit(lambda st, x, tok: nnx.merge(graphdef, st)(x, 501, 8.0, tok)).lower(state, sample, tokens)
    assert "tpu_custom_call" in lowered.as_text()
    lowered.compile()


# --------------------------------------------------------------------------------------------- cudnn


def test_cudnn_selection():
    """cuDNN (no GPU here: the selection only) takes bfloat16/float16 with head_dim a multiple of 8, up to 128
    before Hopper and 256 from it; everything else, and every other platform, runs xla."""
    ok = lambda dtype, d, platform="gpu", cap="8.0": attention.cudnn_supported(dtype, d, platform, cap)
    assert ok(jnp.bfloat16, 40) and ok(jnp.float16, 80) and ok(jnp.bfloat16, 128)
    assert not ok(jnp.float32, 40)  # float32: the reference path
    assert not ok(jnp.bfloat16, 36)  # not a multiple of 8
    assert not ok(jnp.bfloat16, 160) and ok(jnp.bfloat16, 160, cap="9.0") and not ok(jnp.bfloat16, 264, cap="9.0")
    assert not ok(jnp.bfloat16, 40, platform="cpu") and not ok(jnp.bfloat16, 40, platform="tpu")
    q, k, v = qkv(2, 24, 20, 2, 40, jnp.bfloat16)
    assert jnp.array_equal(attention.cudnn_attention(q, k, v), attention.xla_attention(q, k, v))
