"""Attention kernels, chosen by name from one registry.

Every kernel computes softmax(scale q k^T) v on (B, T, heads, head_dim) arrays (keys and values may have
another length than the queries; scale is head_dim^-0.5 unless given), with the softmax statistics in
float32. The scale multiplies the queries, never the scores; a caller that folds it into its query
projection (models.layers.Attention) passes scale=1:

- `xla`: the reference numerics (those of jax.nn.dot_product_attention). It materialises the whole score
  matrix.
- `chunked`: blocks of (batch, queries) under a fixed byte budget for the float32 scores, each block the
  `xla` computation; keys longer than a block are streamed with an online (running max / running sum)
  softmax. Memory is bounded whatever the batch and lengths; any backend.
- `splash`: Pallas splash attention (TPU). Off TPU, and for sequences too short to fill its tiles, it runs
  `xla` instead. The choice is made when the program is lowered, so a CPU host compiling for a TPU slice
  (jax.experimental.topologies) gets the Pallas kernel. XLA cannot partition a Pallas kernel: on more than
  one device, trace under `jax.set_mesh(mesh)` and splash runs per shard over that mesh.
- `cudnn`: cuDNN flash attention (NVIDIA GPUs, bfloat16/float16). Elsewhere, in float32 or for head widths
  cuDNN lacks, it runs `xla`.
- `auto`: the best kernel for the platform (AUTO; `resolve_attention`).

Adding a kernel is one entry in KERNELS.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp


def scaled(q: jax.Array, scale: float) -> jax.Array:
    """q * scale, rounded once to q's dtype: the softmax scale applied to the queries (head_dim numbers per
    query) instead of to the scores (one number per key and query). Callers that fold the scale into the
    query projection pass scale=1 and nothing is computed."""
    return q if scale == 1 else (q.astype(jnp.float32) * scale).astype(q.dtype)


def default_scale(q: jax.Array, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None) -> jax.Array:
    """The whole score matrix at once; float32 scores and statistics. Unlike jax.nn.dot_product_attention it
    scales q rather than the scores and normalises the (queries x head_dim) output rather than the
    (queries x keys) probabilities, so every score-sized array is written once (scores) or not at all."""
    q = scaled(q, default_scale(q, scale))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / p.sum(axis=-1).transpose(0, 2, 1)[..., None]).astype(q.dtype)


def short_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None) -> jax.Array:
    """Attention over short sequences of many (batch) rows, as elementwise products and sums instead of
    matrix products: scores[b, i, j, h] = sum_d q[b, i, h, d] k[b, j, h, d]. On a TPU a (T x head_dim)
    matrix product per row and head pads T and head_dim to tiles of 8 x 128 (x8 for 16 frames, x3.2 for
    head_dim 40); as elementwise work the compiler lays the batch along the lanes and nothing is padded.
    Compiled for v5e, the temporal attention layer of the full-size UNet's first level (12 rows x 1024
    pixels, 16 frames, head_dim 40) accesses 3.3 GB this way and 11.0 GB as `xla` (projections included)."""
    q = scaled(q, default_scale(q, scale))
    f32 = lambda x: x.astype(jnp.float32)
    s = jnp.sum(f32(q)[:, :, None] * f32(k)[:, None], axis=-1)  # (b, tq, tk, heads)
    p = jnp.exp(s - s.max(axis=2, keepdims=True))
    p = p / p.sum(axis=2, keepdims=True)
    return jnp.sum(p[..., None] * f32(v)[:, None], axis=2).astype(q.dtype)


# ---------------------------------------------------------------------------------------------- chunked

# Float32 scores per block (batch x heads x queries x keys x 4 bytes), and keys per block: the fastest of a
# sweep at the UNet's shapes on a 2-core CPU (bench/attention.py, BENCHMARKS.md). Blocks of 4-8 MiB beat
# larger ones (32-128 MiB) by ~2x, and streaming keys in blocks of 256-512 beats one pass over all of them.
CHUNK_BYTES = 8 << 20
CHUNK_KEYS = 512


def _block(n: int, cap: int, align: int = 1) -> int:
    """The block size (a multiple of `align`, at most max(cap, align)) that pads `n` the least; ties go to the
    larger block."""
    cap = max(min(cap, n), align)  # a block beyond n only pads more
    return min(range(align, cap + 1, align), key=lambda b: (-(-n // b) * b, -b))


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _online_softmax(q: jax.Array, k: jax.Array, v: jax.Array, kv_block: int, kv_len: int) -> jax.Array:
    """Attention of q (b, tq, h, d; already scaled) over keys streamed in blocks of `kv_block` (k, v padded
    to a multiple of it; keys at positions >= kv_len are padding): a running max and sum per query, float32
    accumulators."""
    b, tq, h, d = q.shape
    num_blocks = k.shape[1] // kv_block

    def step(carry, j):
        m, l, acc = carry  # (b, h, tq), (b, h, tq), (b, h, tq, d)
        kj = jax.lax.dynamic_slice_in_dim(k, j * kv_block, kv_block, axis=1)
        vj = jax.lax.dynamic_slice_in_dim(v, j * kv_block, kv_block, axis=1)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kj, preferred_element_type=jnp.float32)
        if k.shape[1] != kv_len:
            s = jnp.where(j * kv_block + jnp.arange(kv_block) < kv_len, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
        return (m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv), None

    init = (jnp.full((b, h, tq), -jnp.inf, jnp.float32), jnp.zeros((b, h, tq), jnp.float32),
            jnp.zeros((b, h, tq, d), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, jnp.arange(num_blocks))
    return (acc / l[..., None]).astype(q.dtype).transpose(0, 2, 1, 3)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None, *,
                      block_bytes: int | None = None, kv_block: int | None = None) -> jax.Array:
    """Attention without the full score matrix: at most `block_bytes` (CHUNK_BYTES) of float32 scores live
    at once.

    Blocks of (batch rows, queries) run one after the other (lax.map); each is the `xla` computation when all
    keys fit in one block, else an online softmax over blocks of `kv_block` keys. Each block is
    rematerialised in the backward pass, so training does not store the scores either. Inputs small enough
    for one block go straight to `xla`.
    """
    block_bytes, kv_block = block_bytes or CHUNK_BYTES, kv_block or CHUNK_KEYS
    scale = default_scale(q, scale)
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    bk = _block(tk, kv_block)
    rows = max(1, block_bytes // (4 * h * bk))  # (batch x query) rows of scores per block
    if rows >= tq:
        bq, bb = tq, _block(b, rows // tq)
    else:
        bq, bb = _block(tq, rows), 1
    if (bb, bq, bk) == (b, tq, tk):
        return xla_attention(q, k, v, scale)
    nb, nq, nk = -(-b // bb), -(-tq // bq), -(-tk // bk)
    q = _pad_axis(_pad_axis(q, 0, nb * bb), 1, nq * bq)
    k, v = (_pad_axis(_pad_axis(x, 0, nb * bb), 1, nk * bk) for x in (k, v))

    @jax.checkpoint
    def block(i):
        bi, qi = jnp.divmod(i, nq)
        qb = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(q, bi * bb, bb, 0), qi * bq, bq, 1)
        kb, vb = (jax.lax.dynamic_slice_in_dim(x, bi * bb, bb, 0) for x in (k, v))
        if nk == 1:
            return xla_attention(qb, kb, vb, scale)
        return _online_softmax(scaled(qb, scale), kb, vb, bk, tk)

    out = jax.lax.map(block, jnp.arange(nb * nq))  # (nb * nq, bb, bq, h, d)
    out = out.reshape(nb, nq, bb, bq, h, -1).transpose(0, 2, 1, 3, 4, 5).reshape(nb * bb, nq * bq, h, -1)
    return out[:b, :tq]


# -------------------------------------------------------------------------------------------- splash

LANES = 128  # TPU vector lane width: splash tiles sequences in units of it
# Below one lane tile, padding would multiply the score work by (128 / T)^2 (64x for the temporal attention
# over 16 frames), and the T^2 scores per head are no larger than q, k and v (3 T head_dim): there is no
# traffic to save, so such calls (temporal attention; the 8x8 and 4x4 spatial levels) run `short_attention`
# where head_dim is under a lane tile, `xla` otherwise.
SPLASH_MIN_LEN = LANES
# Tile caps (each tile is the multiple of 128 under its cap that pads least). Not tuned: no TPU was at hand;
# a 512 x 512 compute tile of float32 scores is 1 MiB of VMEM.
SPLASH_BLOCK_Q = 512
SPLASH_BLOCK_KV = 1024
SPLASH_BLOCK_KV_COMPUTE = 512


def _shard_over_mesh(fn: Callable, batch: int, heads: int) -> Callable:
    """`fn` on (batch, heads, ...) arrays, run per shard when a mesh is set (`jax.set_mesh`): XLA cannot
    partition a Mosaic kernel. The batch is split over the mesh axes it divides, in mesh order, then heads
    over the rest they divide; other axes hold replicas."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn
    axes: tuple[list, list] = ([], [])
    for name, size in mesh.shape.items():
        for dim, n in zip(axes, (batch, heads)):
            if size > 1 and n % (size * math.prod(mesh.shape[a] for a in dim)) == 0:
                dim.append(name)
                break
    spec = jax.sharding.PartitionSpec(*(tuple(a) or None for a in axes))
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def splash_kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None, *,
                            interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly). Sequences are padded to its
    tiles: padded keys are masked out (segment ids), padded queries dropped; the scale is applied to q
    beforehand (nothing to do when the caller folded it into its projection). Sequences shorter than
    SPLASH_MIN_LEN run `xla`.

    q, k and v enter the kernel sequence-minor ((head_dim, T) per head): with TPU tiles of 128 lanes, a
    head_dim-minor array of head_dim 40 (the UNet's first level) occupies 128 lanes, 3.2x its size, and the
    transposition from the caller's (B, T, heads, head_dim) fuses into the projection that produces it.
    Compiled for v5e at the full-size UNet's shapes, this layout cuts the bytes accessed by a spatial
    attention layer (projections, kernel and output projection) from 6.35 to 1.54 GB, and by a
    cross-attention layer from 4.31 to 1.44 GB (12 rows per chip; zero-padding head_dim to 128, as before,
    gave 2.1-3.1 GB)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, tq, heads, _ = q.shape
    tk = k.shape[1]
    if min(tq, tk) < SPLASH_MIN_LEN:
        return (short_attention if q.shape[-1] < LANES else xla_attention)(q, k, v, scale)
    bq, bk = _block(tq, SPLASH_BLOCK_Q, LANES), _block(tk, SPLASH_BLOCK_KV, LANES)
    bk_compute = _block(bk, SPLASH_BLOCK_KV_COMPUTE, LANES)
    tq_pad, tk_pad = -(-tq // bq) * bq, -(-tk // bk) * bk
    seq_minor = splash.QKVLayout.SEQ_MINOR
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk_compute, block_q_dkv=bq,
                              block_kv_dkv=bk, block_kv_dkv_compute=bk_compute, use_fused_bwd_kernel=True,
                              q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor)
    layout = lambda x, t: _pad_axis(x, 1, t).transpose(0, 2, 1, 3)  # (B, heads, T, head_dim)
    q = scaled(q, default_scale(q, scale))

    def attend(q, k, v):  # one shard: (b, h, T, D)
        h = q.shape[1]
        kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((tq_pad, tk_pad))] * h),
                                        block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        segments = None
        if tk_pad != tk:
            segments = splash.SegmentIds(q=jnp.zeros((tq_pad,), jnp.int32),
                                         kv=(jnp.arange(tk_pad) >= tk).astype(jnp.int32))
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k, v)

    out = _shard_over_mesh(attend, b, heads)(layout(q, tq_pad), layout(k, tk_pad), layout(v, tk_pad))
    return out[:, :, :tq].transpose(0, 2, 1, 3)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None) -> jax.Array:
    """Splash where the program is lowered for a TPU, `xla` elsewhere (decided at lowering, not from the
    host's backend, so ahead-of-time compilation for a TPU slice gets the kernel)."""
    scale = default_scale(q, scale)
    return jax.lax.platform_dependent(q, k, v, tpu=functools.partial(splash_kernel_attention, scale=scale),
                                      default=functools.partial(xla_attention, scale=scale))


# --------------------------------------------------------------------------------------------- cudnn


def cudnn_supported(dtype, head_dim: int, platform: str, compute_capability: str | None = None) -> bool:
    """Whether cuDNN's flash attention takes these inputs: an NVIDIA GPU, bfloat16 or float16, head_dim a
    multiple of 8 up to 128 (256 from Hopper, compute capability 9.0, on)."""
    if platform != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8:
        return False
    hopper = compute_capability is not None and tuple(map(int, compute_capability.split("."))) >= (9, 0)
    return head_dim <= (256 if hopper else 128)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None) -> jax.Array:
    """cuDNN flash attention where `cudnn_supported`, else `xla`. Decided on the host's backend: cuDNN's
    lowering can only be traced with a GPU attached."""
    platform = jax.default_backend()
    capability = getattr(jax.devices()[0], "compute_capability", None) if platform == "gpu" else None
    if cudnn_supported(q.dtype, q.shape[-1], platform, capability):
        return jax.nn.dot_product_attention(q, k, v, scale=default_scale(q, scale), implementation="cudnn")
    return xla_attention(q, k, v, scale)


# ---------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """A registry entry: fn(q, k, v, scale) -> out on (B, T, heads, head_dim) arrays (scale None:
    head_dim^-0.5), and what to know about it."""
    fn: Callable[[jax.Array, jax.Array, jax.Array, float | None], jax.Array]
    platforms: tuple[str, ...]  # where it runs as itself (jax.default_backend() names)
    fallback: str | None  # what runs elsewhere and for inputs it does not support
    description: str


KERNELS: dict[str, AttentionKernel] = {
    "xla": AttentionKernel(xla_attention, ("cpu", "gpu", "tpu"), None,
                           "the reference numerics; materialises the score matrix"),
    "chunked": AttentionKernel(chunked_attention, ("cpu", "gpu", "tpu"), None,
                               "blocks of queries (and keys, online softmax) under a fixed score budget"),
    "splash": AttentionKernel(splash_attention, ("tpu",), "xla",
                              f"Pallas splash attention; sequences under {SPLASH_MIN_LEN} tokens run xla"),
    "cudnn": AttentionKernel(cudnn_attention, ("gpu",), "xla",
                             "cuDNN flash attention; bfloat16/float16 and head widths cuDNN takes, else xla"),
}

# 'auto' per platform. CPU: where the UNet's calls need more than one block, `chunked` is 1.3-3.7x faster than
# `xla` and plans 16-21 MiB of temporaries where `xla` plans up to 3 GiB per sample row; the other calls are
# the same program (bench/attention.py, BENCHMARKS.md).
AUTO = {"cpu": "chunked", "gpu": "cudnn", "tpu": "splash"}

NAMES = ("auto", *KERNELS)


def check_attention_impl(name: str) -> str:
    """`name` if it names a kernel or 'auto', else a ValueError listing the registry."""
    if name not in NAMES:
        raise ValueError(f"unknown attention_impl {name!r}; expected one of {', '.join(map(repr, NAMES))}")
    return name


def resolve_attention(name: str, platform: str) -> str:
    """The concrete kernel `name` stands for on `platform` ('cpu', 'gpu', 'tpu'; 'cuda'/'rocm' mean 'gpu').

    'auto' becomes AUTO[platform]; a concrete name is returned as it is (off its platforms a kernel runs its
    fallback by itself). Code that compiles for another platform than the host's (ahead-of-time compilation
    for a TPU slice) calls this with the target platform and passes the result to the model."""
    check_attention_impl(name)
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform not in AUTO:
        raise ValueError(f"unknown platform {platform!r}; expected one of {sorted(AUTO)}")
    return AUTO[platform] if name == "auto" else name


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
                          scale: float | None = None) -> jax.Array:
    """Softmax attention on (B, T, heads, head_dim) queries and (B, S, heads, head_dim) keys and values, the
    scores scaled by `scale` (head_dim^-0.5 if None), with the kernel `impl` (a KERNELS name or 'auto')."""
    return KERNELS[resolve_attention(impl, jax.default_backend())].fn(q, k, v, scale)
